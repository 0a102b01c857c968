"""Apply draft versions to a running SGLang server through its weight-update HTTP API.

One version = one session, as SGLang 0.5.23 requires (scheduler_components/weight_updater.py:309
refuses a second `begin`, :233 refuses an update outside a session):
  POST /begin_weight_update        {"selector": "draft"}
  POST /update_weights_from_tensor {"serialized_named_tensors": [b64 per TP rank], "selector": "draft",
                                    "weight_version": "<v>", "flush_cache": false}
  POST /end_weight_update          {}
Tensors travel as torch ForkingPickler payloads (SGLang's MultiprocessingSerializer): on a GPU they are
CUDA-IPC handles, so the updater must run on the SGLang host and keep the tensors alive until the
update call returns. `d2t`/`t2d` are never sent: llama_eagle3.py:350 would rebuild `hot_token_id`
from d2t, which the EAGLE worker cached at start. `flush_cache` is off because SGLang refuses to
flush while requests run (weight_updater.py:125), and a swap must not interrupt them: stale
draft KV entries only cost acceptance until they are evicted; the target still verifies every token.
A failed step raises `SGLangUpdateError`; the subscriber then keeps the previous version serving.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import time

import httpx
import torch
from multiprocessing.reduction import ForkingPickler

import torch.multiprocessing  # noqa: F401  (registers torch tensor reductions with ForkingPickler)

from serving.http import error_text

log = logging.getLogger(__name__)

NEVER_SENT = ("d2t", "t2d")


class SGLangUpdateError(RuntimeError):
    pass


@dataclasses.dataclass
class SGLangWeightsConfig:
    url: str = "http://127.0.0.1:30000"
    api_key: str = ""           # SGLang --admin-api-key (or --api-key): sent as a Bearer token
    tp_size: int = 1            # one serialized payload per TP rank (tp_worker.py:194)
    device: str = "cuda"        # where tensors are staged for CUDA IPC; "cpu" for a CPU SGLang build
    send_embedding: bool = False  # our embedding is frozen to the target's: nothing to update
    timeout_s: float = 120.0


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """Exactly what SGLang's MultiprocessingSerializer.serialize(obj, output_str=True) produces."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class SGLangWeightUpdater:
    """`on_version` handler for `WeightSubscriber`: pushes each version into SGLang's draft runner."""

    def __init__(self, cfg: SGLangWeightsConfig):
        self.cfg = cfg
        self.version = 0
        self.applied = 0
        self.last_ms = 0.0

    def _post(self, route: str, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        try:
            r = httpx.post(self.cfg.url.rstrip("/") + route, json=body, headers=headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as e:
            raise SGLangUpdateError(f"SGLang {route} at {self.cfg.url} unreachable: {e!r}") from None
        if r.status_code != 200:
            raise SGLangUpdateError(f"SGLang {route} answered {error_text(r)}")
        out = r.json() if r.content else {}
        if not out.get("success", False):
            raise SGLangUpdateError(f"SGLang {route} failed: {out.get('message', out)}")
        return out

    def named_tensors(self, state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        skip = NEVER_SENT + (() if self.cfg.send_embedding else ("embed_tokens.weight",))
        return [(k, v.to(self.cfg.device)) for k, v in state.items() if k not in skip]

    def __call__(self, version: int, state: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        named = self.named_tensors(state)  # kept alive until the update call returns (CUDA IPC)
        payload = [serialize_named_tensors(named) for _ in range(self.cfg.tp_size)]
        self._post("/begin_weight_update", {"selector": "draft"})
        try:
            self._post("/update_weights_from_tensor", {
                "serialized_named_tensors": payload, "selector": "draft", "load_format": None,
                "weight_version": str(version), "flush_cache": False})
        finally:  # always close the session, or SGLang refuses the next begin
            try:
                self._post("/end_weight_update", {})
            except SGLangUpdateError as e:
                log.error("closing the weight-update session failed: %s", e)
        n = len(named)
        del named
        self.version, self.applied = version, self.applied + 1
        self.last_ms = (time.perf_counter() - t0) * 1e3
        log.info("SGLang draft now at version %d (%d tensors, %.0f ms)", version, n, self.last_ms)
