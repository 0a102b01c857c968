"""Typed configuration of the trainer process (loaded with `bridge.config.load_config`)."""

from __future__ import annotations

import dataclasses
import os

from aurora_jax.buffer import BufferConfig
from aurora_jax.validate import TraceLimits


@dataclasses.dataclass
class IngestConfig:
    """The TraceIngest gRPC endpoint. Loopback by default: expose it deliberately."""

    address: str = "127.0.0.1:50051"  # host:port; port 0 picks a free one
    auth_token: str = ""  # bearer token required from clients; "env:NAME" reads $NAME; "" = no auth
    tls_cert: str = ""  # PEM paths; both set = TLS on
    tls_key: str = ""
    max_workers: int = 16  # concurrent streams served

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.max_workers <= 0:
            raise ValueError("max_workers must be positive")


def resolve_secret(value: str) -> str:
    """'env:NAME' -> $NAME (so tokens stay out of YAML files); anything else as is."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"secret refers to ${name}, which is not set")
        return os.environ[name]
    return value


@dataclasses.dataclass
class TrainerConfig:
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    limits: TraceLimits = dataclasses.field(default_factory=TraceLimits)
    buffer: BufferConfig = dataclasses.field(default_factory=BufferConfig)
