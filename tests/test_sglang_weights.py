"""Draft hot-swap into SGLang over its weight-update HTTP API, against a fake SGLang server.

SGLang cannot run here (GPU only), so `FakeSGLangServer` is a real HTTP server that implements the
weight-update and pause routes with the semantics of the pinned release (sessions as in
srt/managers/scheduler_components/weight_updater.py:232-335, pause/continue as http_server.py:1831-1855)
and decodes payloads as SGLang's scheduler does: in another process, with SGLang's allow-list
unpickler (tests/sglang_unpickle.py; srt/managers/tp_worker.py:194, srt/utils/common.py:3085). A
payload that process cannot decode "crashes" the fake, as it would kill SGLang's scheduler. It loads
what it receives into our torch EAGLE3 draft, which has SGLang's checkpoint key names.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from flax import nnx
from multiprocessing.reduction import ForkingPickler

import torch.multiprocessing  # noqa: F401  (registers tensor reductions)

from aurora_jax.config import WeightSyncConfig
from aurora_jax.model import Eagle3Draft
from aurora_jax.weight_sync import WeightPublisher, WeightSyncServer
from bridge.eagle3 import DraftConfig
from serving.eagle3 import Eagle3Draft as TorchDraft
from serving.sglang.weights import SGLangUpdateError, SGLangWeightsConfig, SGLangWeightUpdater, serialize_named_tensors
from serving.weight_sync import WeightSubscriber, WeightSubscriberConfig
from tests.conftest import JsonHttpServer, wait_for
from tests.sglang_unpickle import Decoder
from tests.test_bridge import BF16_ATOL, assert_serves_like_flax

CFG = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  vocab_size=60, target_hidden_size=16, param_dtype="bfloat16")
SELECTORS = ("target", "draft", "all")


class FakeSGLangServer:
    """Fake of SGLang 0.5.23's weight-update routes (SGLang itself needs a GPU); real HTTP, real decoding."""

    def __init__(self, tp_size=1, api_key="", fail_update=False):
        self.draft = TorchDraft(CFG).to(torch.bfloat16)
        self.calls, self.session, self.weight_version, self.paused, self.crashed = [], None, None, False, ""
        self.tp_size, self.api_key, self.fail_update = tp_size, api_key, fail_update
        self.decoder = Decoder()
        self.server = JsonHttpServer(self._route)
        self.url = self.server.url

    def _route(self, path, body, headers):
        if self.api_key and headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}
        if self.crashed:
            return 503, {"detail": f"scheduler died: {self.crashed}"}
        self.calls.append((path, body))
        return self.handle(path, body)

    def handle(self, path, body):
        fail = lambda msg: (400, {"success": False, "message": msg})  # noqa: E731
        ok = (200, {"success": True, "message": "Success"})
        if path in ("/pause_generation", "/continue_generation"):
            if path == "/pause_generation" and body.get("mode", "abort") not in ("abort", "retract", "in_place"):
                return 422, {"detail": "mode"}
            self.paused = path == "/pause_generation"
            return 200, {"message": f"Generation {'paused' if self.paused else 'continued'} successfully.",
                         "status": "ok"}
        if path == "/begin_weight_update":
            if body.get("selector", "all") not in SELECTORS:
                return 422, {"detail": "selector"}
            if self.session is not None:
                return fail("a weight-update session is already open; call end_weight_update() first")
            self.session = body.get("selector", "all")
            return ok
        if path == "/update_weights_from_tensor":
            if self.session is None:
                return fail("update_weights_from_tensor must run between begin_weight_update() and "
                            "end_weight_update()")
            payloads = body["serialized_named_tensors"]
            if len(payloads) != self.tp_size:
                return fail(f"expected {self.tp_size} payloads, one per TP rank")
            try:
                named = self.decoder.decode(payloads[0])  # rank 0's own, in another process
            except RuntimeError as e:  # uncaught in SGLang (weight_updater.py:241): the scheduler exits
                self.crashed = str(e)
                return 503, {"detail": f"scheduler died: {e}"}
            if self.fail_update:
                return fail("Failed to update parameter online: injected")
            if body.get("selector") == "draft":
                missing, unexpected = self.draft.load_state_dict(named, strict=False)
                if unexpected:
                    return fail(f"unexpected {unexpected}")
            self.weight_version = body.get("weight_version")
            return ok
        if path == "/end_weight_update":
            if self.session is None:
                return fail("no weight-update session is open; call begin_weight_update() first")
            self.session = None
            return ok
        return 404, {"detail": "Not Found"}

    def close(self):
        self.server.close()
        self.decoder.close()


@pytest.fixture
def trainer_side():
    server = WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0", max_chunk_bytes=4096)).start()
    yield server, WeightPublisher(server)
    server.stop(grace=0)


def test_versions_from_the_trainer_land_in_the_sglang_draft(trainer_side):
    server, publish = trainer_side
    sgl = FakeSGLangServer(tp_size=2, api_key="s3cret")
    upd = SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, api_key="s3cret", tp_size=2, device="cpu"))
    sub = WeightSubscriber(WeightSubscriberConfig(address=server.address), upd).start()
    try:
        for v in (1, 2):
            model = Eagle3Draft(CFG, rngs=nnx.Rngs(v))
            publish(v, nnx.state(model))
            assert wait_for(lambda: upd.version == v), sub.last_error
            assert_serves_like_flax(model, sgl.draft.state_dict(), atol=BF16_ATOL)  # decoded in another process
        assert [p for p, _ in sgl.calls] == ["/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
                                             "/end_weight_update", "/continue_generation"] * 2
        pause, begin, update, end, cont = (b for _, b in sgl.calls[:5])
        assert pause == {"mode": "in_place"} and begin == {"selector": "draft"} and end == {} and cont == {}
        assert update["selector"] == "draft" and update["flush_cache"] is False
        assert sgl.weight_version == "2" and sgl.session is None and not sgl.paused and sub.rejected == 0
        sent = sgl.decoder.decode(update["serialized_named_tensors"][1])
        assert sent and not {"d2t", "t2d", "embed_tokens.weight"} & set(sent)  # see serving/sglang/weights.py
    finally:
        sub.close()
        sgl.close()


def test_a_failed_update_keeps_the_previous_draft_and_closes_the_session(trainer_side):
    server, publish = trainer_side
    sgl = FakeSGLangServer()
    upd = SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, device="cpu"))
    sub = WeightSubscriber(WeightSubscriberConfig(address=server.address), upd).start()
    try:
        first = Eagle3Draft(CFG, rngs=nnx.Rngs(1))
        publish(1, nnx.state(first))
        assert wait_for(lambda: upd.version == 1)
        sgl.fail_update = True
        publish(2, nnx.state(Eagle3Draft(CFG, rngs=nnx.Rngs(2))))
        assert wait_for(lambda: sub.rejected == 1)
        assert "update_weights_from_tensor answered HTTP 400: Failed to update parameter online" in sub.last_error
        assert upd.version == 1 and sub.version == 1 and sgl.weight_version == "1"
        assert sgl.session is None and [p for p, _ in sgl.calls[-2:]] == ["/end_weight_update", "/continue_generation"]
        assert not sgl.paused  # neither the session nor the pause is left open
        assert_serves_like_flax(first, sgl.draft.state_dict(), atol=BF16_ATOL)
        sgl.fail_update = False
        publish(3, nnx.state(Eagle3Draft(CFG, rngs=nnx.Rngs(3))))
        assert wait_for(lambda: upd.version == 3), sub.last_error
    finally:
        sub.close()
        sgl.close()


def test_errors_say_what_went_wrong():
    sgl = FakeSGLangServer(api_key="right")
    sd = {k: v for k, v in TorchDraft(CFG).state_dict().items()}
    try:
        with pytest.raises(SGLangUpdateError, match=r"/pause_generation answered HTTP 401"):
            SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, api_key="wrong", device="cpu"))(1, sd)
    finally:
        sgl.close()
    with pytest.raises(SGLangUpdateError, match="unreachable"):
        SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, device="cpu", timeout_s=2))(1, sd)


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    """"env:NAME" as for every other token: read at start, an unset variable named."""
    with pytest.raises(ValueError, match=r"\$AURORA_TEST_SGLANG_KEY, which is not set"):
        SGLangWeightUpdater(SGLangWeightsConfig(api_key="env:AURORA_TEST_SGLANG_KEY", device="cpu"))
    monkeypatch.setenv("AURORA_TEST_SGLANG_KEY", "right")
    sgl = FakeSGLangServer(api_key="right")
    try:
        upd = SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, api_key="env:AURORA_TEST_SGLANG_KEY", device="cpu"))
        upd(1, {k: v for k, v in TorchDraft(CFG).state_dict().items()})
        assert upd.version == 1
    finally:
        sgl.close()


def test_a_session_left_open_is_closed_and_the_swap_goes_on():
    """A begin that timed out here can open the session there later (it waits for the writer lock):
    the next swap must not fail for good on "already open"."""
    sgl = FakeSGLangServer()
    try:
        sgl.session = "draft"
        upd = SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, device="cpu", pause=False))
        upd(1, {k: v for k, v in TorchDraft(CFG).to(torch.bfloat16).state_dict().items()})
        assert upd.version == 1 and sgl.session is None and sgl.weight_version == "1"
        assert [p for p, _ in sgl.calls] == ["/begin_weight_update", "/end_weight_update", "/begin_weight_update",
                                             "/update_weights_from_tensor", "/end_weight_update"]
    finally:
        sgl.close()


def test_cpu_payloads_decode_in_another_process_as_sglang_would():
    named = [(k, v) for k, v in TorchDraft(CFG).to(torch.bfloat16).state_dict().items() if k not in ("d2t", "t2d")]
    dec = Decoder()
    try:
        got = dec.decode(serialize_named_tensors(named))  # by value
        assert list(got) == [k for k, _ in named] and all(torch.equal(got[k], v) for k, v in named)
        buf = io.BytesIO()  # what `device: cpu` sent before: torch's shared-memory reduction
        ForkingPickler(buf).dump(named)
        with pytest.raises(RuntimeError, match="AuthenticationError"):
            dec.decode(base64.b64encode(buf.getvalue()).decode())
        blocked = base64.b64encode(__import__("pickle").dumps(print)).decode()  # not on the allow-list
        with pytest.raises(RuntimeError, match=r"Blocked unsafe global \(builtins.print\)"):
            dec.decode(blocked)
    finally:
        dec.close()


def test_a_version_with_another_vocabulary_map_is_refused_before_any_call(trainer_side):
    server, publish = trainer_side
    sgl = FakeSGLangServer()
    model = Eagle3Draft(CFG, rngs=nnx.Rngs(1))
    served = {"d2t": np.asarray(model.d2t.get_value()).astype(np.int64)}
    upd = SGLangWeightUpdater(SGLangWeightsConfig(url=sgl.url, device="cpu"), served_vocab=served)
    sub = WeightSubscriber(WeightSubscriberConfig(address=server.address), upd).start()
    try:
        publish(1, nnx.state(model))
        assert wait_for(lambda: upd.version == 1), sub.last_error
        other = Eagle3Draft(CFG, rngs=nnx.Rngs(2))
        other.d2t.set_value(other.d2t.get_value() + 1)
        publish(2, nnx.state(other))
        assert wait_for(lambda: sub.rejected == 1)
        assert "its d2t differs from the served draft's" in sub.last_error and upd.version == 1
        assert len(sgl.calls) == 5 and sgl.weight_version == "1"  # version 2 made no call at all
    finally:
        sub.close()
        sgl.close()
