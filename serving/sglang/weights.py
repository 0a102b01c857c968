"""Apply draft versions to a running SGLang server through its weight-update HTTP API.

One version = one session, as SGLang 0.5.23 requires (scheduler_components/weight_updater.py:314
refuses a second `begin`, :237 refuses an update outside a session), inside a pause:
  POST /pause_generation           {"mode": "in_place"}      (requests stay resident, KV kept)
  POST /begin_weight_update        {"selector": "draft"}
  POST /update_weights_from_tensor {"serialized_named_tensors": [b64 per TP rank], "selector": "draft",
                                    "weight_version": "<v>", "flush_cache": false}
  POST /end_weight_update          {}
  POST /continue_generation        {}                          (always, even after a failure)
Why the pause: without it each of the three session calls takes the tokenizer manager's model-update
writer lock (tokenizer_control_mixin.py:481), which waits until every in-flight /generate has ended
(each holds the reader lock for its whole life, tokenizer_manager.py:941), and new requests queue
behind it: three drains per swap. While paused the calls skip the lock (:473-479), so a swap costs a
scheduler pause of the copy's length, and requests span versions (`meta_info.weight_versions`).
`flush_cache` is off because SGLang refuses to flush while requests run or are queued and then fails
the whole update call (weight_updater.py:120-131); stale draft KV entries only cost acceptance until
they are evicted, and the target still verifies every token.

Never sent: `d2t`/`t2d` (SGLang builds `hot_token_id` from d2t once, when the EAGLE worker starts,
eagle_worker_v2.py:365-369, so a version with another vocabulary map is refused here before any call)
and `embed_tokens` (the EAGLE3 draft shares the target's embedding tensor, eagle_worker_v2.py:363:
loading into it would overwrite the target's).

Payloads are what SGLang's `MultiprocessingSerializer.deserialize` reads with its allow-list
unpickler (utils/common.py:3085, :3144). CUDA tensors travel as CUDA-IPC handles (torch's
ForkingPickler reduction, the device named by UUID, which SGLang's rebuild maps to its own index,
utils/patch_torch.py:89), so the updater runs on the SGLang host and keeps them alive until the call
returns. CPU tensors travel by value (plain pickle): ForkingPickler would send a shared-memory file
descriptor that only a child process can receive, and SGLang's scheduler would die on it.
A failed step raises `SGLangUpdateError`; the subscriber then keeps the previous version serving.
"""

from __future__ import annotations

import base64
import io
import logging
import pickle
import time

import httpx
import numpy as np
import torch
from multiprocessing.reduction import ForkingPickler

import torch.multiprocessing  # noqa: F401  (registers torch tensor reductions with ForkingPickler)
from torch.multiprocessing import reductions

from bridge.eagle3 import VOCAB_KEYS
from serving.channel import bearer
from serving.http import error_text
from serving.sglang.config import SGLangWeightsConfig

log = logging.getLogger(__name__)

NEVER_SENT = (*sorted(VOCAB_KEYS), "embed_tokens.weight")
_CUDA_DEVICE_ARG = 6  # index of the device in rebuild_cuda_tensor's arguments (SGLang's patch_torch.py:50)


class SGLangUpdateError(RuntimeError):
    pass


class _IpcPickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors name their device by UUID (as SGLang's own patched reduction
    does), so every TP rank opens the right GPU whatever its CUDA_VISIBLE_DEVICES / --base-gpu-id."""


def _reduce_cuda_by_uuid(t: torch.Tensor):
    fn, args = reductions.reduce_tensor(t)
    if t.is_cuda:
        args = (*args[:_CUDA_DEVICE_ARG], str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid),
                *args[_CUDA_DEVICE_ARG + 1:])
    return fn, args


_IpcPickler.register(torch.Tensor, _reduce_cuda_by_uuid)
_IpcPickler.register(torch.nn.Parameter, _reduce_cuda_by_uuid)


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """A payload SGLang's MultiprocessingSerializer.deserialize reads: base64 of a pickle; by value
    for CPU tensors, CUDA-IPC handles for CUDA ones (see module doc)."""
    devices = {t.device.type for _, t in named}
    if len(devices) > 1:
        raise ValueError(f"tensors on several device types {sorted(devices)}")
    buf = io.BytesIO()
    if devices == {"cuda"}:
        _IpcPickler(buf).dump(named)
    else:
        pickle.dump([(k, t.contiguous()) for k, t in named], buf, protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class SGLangWeightUpdater:
    """`on_version` handler for `WeightSubscriber`: pushes each version into SGLang's draft runner."""

    def __init__(self, cfg: SGLangWeightsConfig, served_vocab: dict[str, np.ndarray] | None = None):
        self.cfg = cfg
        self._headers = bearer(cfg.api_key)  # "env:NAME" read once, at start
        self.served_vocab = served_vocab or {}  # the served draft's d2t (as loaded by SGLang at start)
        self.version = 0
        self.applied = 0
        self.last_ms = 0.0

    def _post(self, route: str, body: dict, ok=lambda out: out.get("success", False)) -> dict:
        try:
            r = httpx.post(self.cfg.url.rstrip("/") + route, json=body, headers=self._headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as e:
            raise SGLangUpdateError(f"SGLang {route} at {self.cfg.url} unreachable: {e!r}") from None
        if r.status_code != 200:
            raise SGLangUpdateError(f"SGLang {route} answered {error_text(r)}")
        out = r.json() if r.content else {}
        if not ok(out):
            raise SGLangUpdateError(f"SGLang {route} failed: {out.get('message', out)}")
        return out

    def named_tensors(self, state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        return [(k, v.to(self.cfg.device)) for k, v in state.items() if k not in NEVER_SENT]

    def check(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """A version whose vocabulary map differs from the one SGLang cached at start would put its
        lm_head rows on the wrong tokens: refused, before any call."""
        for k, served in self.served_vocab.items():
            if k in state and not np.array_equal(state[k].cpu().numpy().astype(np.int64), served.astype(np.int64)):
                raise SGLangUpdateError(f"weight version {version}: its {k} differs from the served draft's; SGLang "
                                        "reads the vocabulary map once at start (restart it with a draft of this map)")

    def __call__(self, version: int, state: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        self.check(version, state)
        named = self.named_tensors(state)  # kept alive until the update call returns (CUDA IPC)
        payload = [serialize_named_tensors(named)] * self.cfg.tp_size  # the same bytes for every rank
        update = {"serialized_named_tensors": payload, "selector": "draft", "load_format": None,
                  "weight_version": str(version), "flush_cache": False}
        if self.cfg.pause:
            self._control("/pause_generation", {"mode": "in_place"})
        try:
            self._session(update)
        finally:
            if self.cfg.pause:  # never leave the server paused
                self._control("/continue_generation", {})
        n = len(named)
        del named
        self.version, self.applied = version, self.applied + 1
        self.last_ms = (time.perf_counter() - t0) * 1e3
        log.info("SGLang draft now at version %d (%d tensors, %.0f ms)", version, n, self.last_ms)

    def _session(self, update: dict) -> None:
        try:  # begin inside the try: a begin that timed out here may still open the session there
            try:
                self._post("/begin_weight_update", {"selector": "draft"})
            except SGLangUpdateError as e:
                if "already open" not in str(e):
                    raise
                log.warning("a weight-update session was left open (%s); closing it and beginning again", e)
                self._post("/end_weight_update", {})
                self._post("/begin_weight_update", {"selector": "draft"})
            self._post("/update_weights_from_tensor", update)
        finally:  # always close the session, or SGLang refuses the next begin
            try:
                self._post("/end_weight_update", {})
            except SGLangUpdateError as e:
                if "no weight-update session" not in str(e):
                    log.error("closing the weight-update session failed: %s", e)

    def _control(self, route: str, body: dict) -> None:
        """/pause_generation and /continue_generation answer {"status": "ok"} (http_server.py:1838)."""
        out = self._post(route, body, ok=lambda o: o.get("status") == "ok")
        log.debug("SGLang %s: %s", route, out.get("message"))
