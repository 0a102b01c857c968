"""WeightSync: the trainer serves each published draft version to subscribed serving engines.

The publish hook (`WeightPublisher`) turns the draft's trained weights into SGLang's state_dict
layout (the frozen embedding never travels; the vocabulary maps d2t/t2d do, so a day-0 engine can
adopt the trainer's draft vocabulary with the first version and later ones can be checked against
it; SGLang's updater never forwards them) and hands the packed version to the server, which
streams it to every subscriber; a subscriber that connects
late, or reconnects, gets the latest version at once. Auth and TLS work as on the ingest endpoint.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import numpy as np
from flax import nnx

from aurora_jax.config import WeightSyncConfig
from bridge.config import resolve_secret
from aurora_jax.ingest import BearerAuth, StreamSlots, bind
from aurora_jax.model import flat_state
from bridge.eagle3 import DraftConfig, to_torch_layout
from bridge.proto import aurora_pb2 as pb
from bridge.weights import SERVICE, pack_version

log = logging.getLogger(__name__)

NOT_SENT = ("embed_tokens",)  # frozen: the engine already has the target's


class WeightSyncServer:
    def __init__(self, cfg: WeightSyncConfig):
        self.cfg = cfg
        self._cond = threading.Condition()
        self._latest: tuple[int, list[bytes] | None] = (0, [])  # serialized WeightChunks (framed once, sent to
        # all), None while the next version is packed
        self._stopped = False
        self.subscribers = 0
        token = resolve_secret(cfg.auth_token)
        limit = cfg.max_chunk_bytes + (64 << 10)
        self.slots = StreamSlots(cfg.max_subscribers, "WeightSync subscribers")
        self._server = grpc.server(futures.ThreadPoolExecutor(self.slots.pool_size, thread_name_prefix="weights"),
                                   options=[("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)],
                                   interceptors=[BearerAuth(token, open_methods=())] if token else [])
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self._subscribe, pb.SubscribeRequest.FromString, None)}),))  # chunks go out as packed
        self.port = bind(self._server, cfg.address, cfg.tls_cert, cfg.tls_key, "weight_sync.address")
        self.address = f"{cfg.address.rpartition(':')[0]}:{self.port}"

    def start(self) -> "WeightSyncServer":
        self._server.start()
        log.info("WeightSync listening on %s", self.address)
        return self

    def publish(self, version: int, sd: dict[str, np.ndarray], draft_config: dict | None = None) -> None:
        with self._cond:  # the superseded version's chunks go first: packing reuses their memory instead of
            self._latest = (self._latest[0], None)  # faulting in fresh pages; a joining subscriber waits for the new one
        chunks = pack_version(version, sd, self.cfg.max_chunk_bytes, draft_config)
        with self._cond:
            self._latest = (version, chunks)
            self._cond.notify_all()

    @property
    def version(self) -> int:
        return self._latest[0]

    def _subscribe(self, request, context):
        self.slots.enter(context)
        try:
            yield from self._stream(request, context)
        finally:
            self.slots.leave()

    def _stream(self, request, context):
        have = request.have_version
        with self._cond:
            self.subscribers += 1
        log.info("weight subscriber %r connected (has version %d)", request.subscriber, have)
        try:
            while context.is_active():
                with self._cond:
                    self._cond.wait_for(lambda: self._latest[0] > have and self._latest[1] is not None
                                        or self._stopped, timeout=1.0)
                    if self._stopped:
                        return
                    version, chunks = self._latest
                if version <= have or chunks is None:
                    continue
                yield from chunks
                have, chunks = version, None  # not kept alive while waiting for the next version
        finally:
            with self._cond:
                self.subscribers -= 1

    def stop(self, grace: float | None = 1.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._server.stop(grace).wait()


class WeightPublisher:
    """The trainer's publish hook: (version, draft state) -> a WeightSync version."""

    def __init__(self, server: WeightSyncServer, draft: DraftConfig | None = None):
        self.server = server
        self.draft_config = draft.to_hf() if draft is not None else None  # sent along: servers check it

    def __call__(self, version: int, state: nnx.State) -> None:
        flat = {k: np.asarray(v.get_value()) for k, v in flat_state(state).items()}
        trained = {k: a for k, a in flat.items() if k not in NOT_SENT}
        self.server.publish(version, to_torch_layout(trained, partial=True), self.draft_config)
