"""How a serving host reaches a trainer endpoint (TraceIngest, WeightSync): the address, and how it
proves who it is (a bearer token, "env:NAME" reading $NAME as on the trainer; TLS with the CA that
signed the trainer's certificate)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc

from bridge.config import resolve_secret


@dataclasses.dataclass
class ChannelConfig:
    address: str = ""
    auth_token: str = ""  # sent as `authorization: Bearer <token>`; "env:NAME" reads $NAME
    tls_root_cert: str = ""  # PEM of the CA that signed the trainer's cert; "" = plaintext

    def channel(self, options: list) -> grpc.Channel:
        if self.tls_root_cert:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(self.tls_root_cert).read_bytes())
            return grpc.secure_channel(self.address, creds, options=options)
        return grpc.insecure_channel(self.address, options=options)

    def metadata(self) -> list[tuple[str, str]]:
        return [(k.lower(), v) for k, v in bearer(self.auth_token).items()]


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a token ("env:NAME" reads $NAME; an unset one fails here)."""
    token = resolve_secret(token)
    return {"Authorization": f"Bearer {token}"} if token else {}
