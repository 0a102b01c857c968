"""Serving side of WeightSync: subscribe to the trainer, assemble versions, hand ready state_dicts on.

A background thread keeps one Subscribe stream open (reconnecting with backoff), assembles each
version, verifies its checksums and calls `on_version(version, state_dict)` with torch tensors
ready for an atomic swap between decode steps. A version that fails verification, or was trained
for a different draft than the one served (its config.json differs in a shape, RoPE or norm eps),
is dropped with a logged reason (`last_error`, `rejected`); the engine keeps serving the previous one.
One exception: a subscriber given `on_adopt` (an engine serving a day-0, untrained draft, which has no
vocabulary or shape of its own to keep) adopts the trainer's draft config and vocabulary with the
first version it accepts; from then on it checks every version against that.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import grpc
import numpy as np

from bridge.eagle3 import DraftConfig, LayoutError
from bridge.proto import aurora_pb2 as pb
from serving.channel import ChannelConfig
from bridge.weights import SUBSCRIBE_METHOD, VersionAssembler, WeightError
from serving.ratelimit import EveryWindow

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WeightSubscriberConfig(ChannelConfig):
    address: str = "127.0.0.1:50052"  # the trainer's weight_sync.address
    name: str = "engine"
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    max_version_bytes: int = 8 << 30


def to_torch_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy (bf16 via ml_dtypes) -> torch, sharing the assembled buffer (no copy). torch is imported
    here, not with the module: the subscriber's config is read where torch is not wanted (the demo)."""
    from bridge.torch_io import tensor_from_numpy

    out = {}
    for k, a in arrays.items():
        a = np.require(a, requirements="W") if not a.flags.writeable else a  # torch wants writable memory
        out[k] = tensor_from_numpy(a)
    return out


class WeightSubscriber:
    def __init__(self, cfg: WeightSubscriberConfig, on_version: Callable[[int, dict[str, torch.Tensor]], None],
                 have_version: int = 0, draft_config: DraftConfig | None = None,
                 on_adopt: Callable[[int, dict[str, torch.Tensor], DraftConfig], None] | None = None):
        self.cfg, self.on_version = cfg, on_version
        self._metadata = cfg.metadata()  # an unset env: secret is a start-up error, not a dead thread
        self.draft_config = draft_config  # what is served here; None = not checked
        self.on_adopt = on_adopt  # until the first accepted version: take the trainer's draft config instead
        self.version = have_version
        self.received = 0
        self.rejected = 0
        self.last_error = ""
        self._failures = EveryWindow(log)
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="weight-subscriber", daemon=True)

    def start(self) -> "WeightSubscriber":
        self._thread.start()
        return self

    def _channel(self):
        return self.cfg.channel([("grpc.max_receive_message_length", 64 << 20)])

    def _run(self) -> None:
        backoff = self.cfg.backoff_s
        meta = self._metadata
        while not self._stop.is_set():
            try:
                with self._channel() as ch:
                    sub = ch.unary_stream(SUBSCRIBE_METHOD, request_serializer=pb.SubscribeRequest.SerializeToString,
                                          response_deserializer=None)  # raw WeightChunk bytes: the data is copied once
                    self._call = sub(pb.SubscribeRequest(have_version=self.version, subscriber=self.cfg.name),
                                     metadata=meta)
                    asm = VersionAssembler(self.cfg.max_version_bytes)
                    for chunk in self._call:
                        backoff = self.cfg.backoff_s
                        self._failures.reset()
                        try:
                            done = asm.add(chunk)
                        except WeightError as e:
                            self.rejected += 1
                            self.last_error = str(e)
                            log.error("%s; keeping draft version %d", e, self.version)
                            continue
                        if done is not None:
                            self._deliver(*done)
                            del done  # its arrays stay alive only where the engine holds them (buffer reuse)
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                self.last_error = f"{e.code().name}: {e.details()}"
                self._failures.warning("weight subscription to %s failed (%s); retrying in %.1fs", self.cfg.address,
                                       self.last_error, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.cfg.backoff_max_s)

    def _mismatch(self, version: int, config: dict | None) -> str:
        if self.draft_config is None or config is None:
            return ""
        try:
            diff = self.draft_config.differences(DraftConfig.from_hf(config))
        except (LayoutError, TypeError, ValueError) as e:
            return f"weight version {version}: its draft_config is not an EAGLE3 config.json: {e}"
        return (f"weight version {version} was trained for a different draft than the one served here "
                f"(field: (served, trainer's)): {diff}") if diff else ""

    def _deliver(self, version: int, arrays: dict[str, np.ndarray], config: dict | None = None) -> None:
        if version <= self.version:
            return
        if self.on_adopt is not None and config is not None:
            return self._adopt(version, arrays, config)
        mismatch = self._mismatch(version, config)
        if mismatch:
            self.rejected += 1
            self.last_error = mismatch
            log.error("%s; keeping draft version %d", mismatch, self.version)
            return
        t0 = time.perf_counter()
        try:
            self.on_version(version, to_torch_state_dict(arrays))
        except Exception as e:  # the engine refused it: keep the previous version
            self.rejected += 1
            self.last_error = f"weight version {version}: engine rejected it: {e}"
            log.exception("engine rejected draft version %d; keeping %d", version, self.version)
            return
        self.version = version
        self.received += 1
        log.info("draft version %d ready in %.1f ms", version, (time.perf_counter() - t0) * 1e3)

    def _adopt(self, version: int, arrays: dict[str, np.ndarray], config: dict) -> None:
        try:
            cfg = DraftConfig.from_hf(config)
            self.on_adopt(version, to_torch_state_dict(arrays), cfg)
        except Exception as e:
            self.rejected += 1
            self.last_error = f"weight version {version}: could not adopt the trainer's draft: {e}"
            log.exception("could not adopt draft version %d; keeping %d", version, self.version)
            return
        log.info("adopted the trainer's draft config with version %d: %s", version,
                 self.draft_config.differences(cfg) if self.draft_config is not None else cfg)
        self.draft_config, self.on_adopt = cfg, None
        self.version = version
        self.received += 1

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)
