"""SGLang adapter: responses and recorded verify objects -> RequestTraces, and the sidecar end to end.

Ground truth comes from our embedded engine on a tiny random Llama; `tests/sglang_shapes.py` lays
the same request out exactly as SGLang 0.5.23 would (source lines cited there), and the adapter must
recover the engine's trace from it. SGLang itself needs a GPU: the end-to-end test uses a fake SGLang
HTTP server (named so) that answers /generate in those shapes and posts the plugin's records.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from aurora_jax.validate import TraceLimits, validate
from bridge.traces import cut_steps
from serving.http import HttpServer
from serving.sglang.plugin import Sender, records_from_verify
from serving.sglang.sidecar import SGLangEngine, SidecarConfig, TreeSink
from serving.sglang.traces import (SGLangTraceError, StepRecord, served_version, step_from_record,
                                   trace_from_generate)
from serving.spec_decode import EagleDrafter, SpecConfig, SpecDecoder
from serving.trace_client import TraceClientConfig
from tests.conftest import JsonHttpServer, wait_for
from tests.sglang_shapes import eagle_sample_call, generate_response, sglang_block, tree_paths
from tests.test_spec_decode import H, PROMPTS, V, _draft
from tests.test_spec_decode import target as target  # noqa: F401  (fixture)

SPEC = SpecConfig(topk=2, num_steps=3, num_draft_tokens=5)


def _truth(target, prompt, n, drafted=True, rid="r"):
    dec = SpecDecoder(target, EagleDrafter(_draft(target), SPEC) if drafted else None, SPEC, topk=4)
    return dec.generate(prompt, n, request_id=rid).trace


def _same_rows(got, want, L, start=0):
    np.testing.assert_array_equal(got.tokens, want.tokens[start:L])
    np.testing.assert_allclose(got.aux_hidden, want.aux_hidden[start:L].astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(got.target_ids, want.target_ids[start:L])
    np.testing.assert_allclose(got.target_logprobs, want.target_logprobs[start:L], rtol=1e-6)


def test_generate_response_converts_to_the_engines_trace(target):
    want = _truth(target, PROMPTS[1], 10, drafted=False)
    resp = generate_response(want, "a", weight_version="3")
    got, cut = trace_from_generate(PROMPTS[1], resp, request_id="a", topk=4)
    L = want.num_tokens - 1  # SGLang never feeds the last token back: no features for it
    assert cut == 0 and got.prompt_len == len(PROMPTS[1]) and got.draft_version == 3
    _same_rows(got, want, L)
    validate(got, TraceLimits(vocab_size=V, target_hidden_size=H))


def test_prefix_cached_prompt_rows_start_the_trace_later(target):
    """Leading rows missing: a cached prefix, or the earlier chunks of a chunked prefill (only the last
    chunk stores rows); either way the response has the last rows only."""
    want = _truth(target, PROMPTS[1], 8, drafted=False)
    got, cut = trace_from_generate(PROMPTS[1], generate_response(want, "b", cached=4), request_id="b", topk=4)
    assert cut == 4 and got.prompt_len == len(PROMPTS[1]) - 4
    _same_rows(got, want, want.num_tokens - 1, start=4)
    validate(got, TraceLimits(vocab_size=V, target_hidden_size=H))


def test_a_request_spanning_versions_is_labelled_with_the_oldest(target):
    want = _truth(target, PROMPTS[1], 10, drafted=False)
    resp = generate_response(want, "s", weight_version="4")
    resp["meta_info"]["weight_versions"] = [dict(version="3", start=0, end=4), dict(version="4", start=4, end=10)]
    got, _ = trace_from_generate(PROMPTS[1], resp, request_id="s", topk=4)
    assert got.draft_version == 3 and served_version(resp["meta_info"]) == 4


def test_missing_fields_get_a_clear_error(target):
    want = _truth(target, PROMPTS[0], 6, drafted=False)
    resp = generate_response(want, "c")
    del resp["meta_info"]["hidden_states"]
    with pytest.raises(SGLangTraceError, match="enable-return-aux-hidden-states"):
        trace_from_generate(PROMPTS[0], resp, request_id="c", topk=4)
    resp = generate_response(want, "c")
    resp["meta_info"]["output_top_logprobs"][2] = None
    with pytest.raises(SGLangTraceError, match=r"top logprobs\[.*\] has no top logprobs"):
        trace_from_generate(PROMPTS[0], resp, request_id="c", topk=4)


def test_recorded_verify_objects_convert_to_the_engines_trees(target):
    """Two requests verified in the same batches: the plugin's records, converted, are the engine's
    trees (same nodes, parents, accepted paths) whatever SGLang's local node order."""
    rng = np.random.default_rng(0)
    truths = [_truth(target, p, 14, rid=f"q{i}") for i, p in enumerate(PROMPTS)]
    records = {t.request_id: [] for t in truths}
    for k in range(max(len(t.steps) for t in truths)):
        live = [t for t in truths if k < len(t.steps) and len(t.steps[k].tokens) == SPEC.num_draft_tokens]
        if not live:
            continue
        blocks = [sglang_block(t.steps[k], int(t.tokens[t.steps[k].trunk_pos]), rng) for t in live]
        call = eagle_sample_call(blocks, [t.request_id for t in live], [t.steps[k].trunk_pos for t in live], V, rng)
        recs = records_from_verify(*call, topk=4)
        for t, b, rec, i in zip(live, blocks, recs, range(len(live))):
            got = step_from_record(rec)
            assert got.trunk_pos == t.steps[k].trunk_pos and tree_paths(got) == tree_paths(t.steps[k])
            # rejected nodes carry the target's top-k from the verify logits row of their block index
            logp = torch.log_softmax(call[2].next_token_logits, -1)
            for node, ids, lps in zip(got.target_nodes, got.target_ids, got.target_logprobs):
                local = next(int(b[4][j]) for j in range(len(b[4]))
                             if tree_paths_key(t.steps[k], j) == tree_paths_key(got, int(node)))
                want = torch.topk(logp[i * len(b[0]) + local], 4)
                assert ids.tolist() == want.indices.tolist()
                np.testing.assert_allclose(lps, want.values.numpy(), rtol=0, atol=1e-5)
            records[t.request_id].append(rec)
    assert all(records.values())


def tree_paths_key(step, k):
    path = []
    while k >= 0:
        path.append(int(step.tokens[k]))
        k = int(step.parents[k])
    return tuple(reversed(path))


def test_malformed_records_are_refused():
    ok = dict(rid="x", trunk_pos=3, tokens=[5, 6, 7], next_token=[1, -1, -1], next_sibling=[-1, 2, -1],
              accepted=[0, 2])
    step = step_from_record(StepRecord(**ok))
    assert step.parents.tolist() == [-1, -1] and step.accepted.tolist() == [False, True]
    for bad, msg in [(dict(next_sibling=[-1, 1, -1]), "malformed"), (dict(next_token=[1, -1, -1], next_sibling=[-1, -1, -1]),
                                                                      "not reachable"),
                     (dict(accepted=[1]), "start at the root"), (dict(tokens=[5, 6]), "disagree")]:
        with pytest.raises(SGLangTraceError, match=msg):
            step_from_record(StepRecord(**{**ok, **bad}))


def test_tree_sink_refuses_bad_posts_and_keeps_serving():
    sink = TreeSink("127.0.0.1:0", max_body_bytes=4096)
    ok = dict(rid="r1", trunk_pos=3, tokens=[5, 6], next_token=[1, -1], next_sibling=[-1, -1], accepted=[0, 1])
    try:
        for body, code in [(b"not json", 400), (b'{"rid": "x"}', 400), (b'[{"rid": "x", "color": 1}]', 400),
                           (b"[" + b"1," * 5000 + b"1]", 413)]:
            r = httpx.post(sink.url, content=body, headers={"Content-Type": "application/json"}, timeout=10)
            assert r.status_code == code, (body[:30], r.text)
        assert sink.malformed == 3
        assert httpx.post(sink.url, json=[ok], timeout=10).status_code == 204
        assert [r.tokens for r in sink.take("r1", 1, wait_s=1)] == [[5, 6]] and sink.received == 1
    finally:
        sink.close()


class FakeSGLang:
    """Fake SGLang server (SGLang needs a GPU): answers /generate as 0.5.23 would, from our engine,
    and, with a draft, posts each verify step's records through the plugin's real Sender first."""

    def __init__(self, target, sink_url=None):
        self.target, self.sink = target, Sender(sink_url) if sink_url else None
        self.truth, self.bodies = {}, []
        self.rng = np.random.default_rng(1)
        self.server = JsonHttpServer(lambda path, body, headers: (200, self.generate(body)))
        self.url = self.server.url

    def generate(self, body):
        self.bodies.append(body)
        rid, n = body["rid"], body["sampling_params"]["max_new_tokens"]
        t = _truth(self.target, body["input_ids"], n, drafted=self.sink is not None, rid=rid)
        self.truth[rid] = t
        if self.sink is not None:
            full = [s for s in t.steps if len(s.tokens) == SPEC.num_draft_tokens]
            for s in full:
                block = sglang_block(s, int(t.tokens[s.trunk_pos]), self.rng)
                self.sink.put(records_from_verify(*eagle_sample_call([block], [rid], [s.trunk_pos], V, self.rng),
                                                  topk=4))
            t.steps = full
        return generate_response(t, rid, weight_version="2", spec_verify_ct=len(t.steps) if self.sink else None)

    def close(self):
        self.server.close()


class _Tok:
    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [ord(c) % V for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("with_draft", [False, True])
def test_sidecar_serves_openai_requests_and_exports_traces(target, server_factory, with_draft):
    server = server_factory(limits=dict(vocab_size=V), model=dict(vocab_size=V, target_hidden_size=H))
    engine = SGLangEngine(SidecarConfig(topk=4, with_draft=with_draft, max_new_tokens=12,
                                        traces=TraceClientConfig(address=server.address)), tokenizer=_Tok())
    fake = FakeSGLang(target, engine.sink.url if with_draft else None)
    engine.cfg.sglang_url = fake.url
    http = HttpServer(engine, "127.0.0.1", 0).start()
    try:
        for prompt in ("the quick", "online speculative"):
            out = httpx.post(http.url + "/v1/completions", json=dict(prompt=prompt, max_tokens=12), timeout=60).json()
            assert out["usage"]["completion_tokens"] == 12
        body = fake.bodies[0]  # what the sidecar asked SGLang for
        assert body["return_hidden_states"] is True and body["top_logprobs_num"] == 4
        assert body["return_logprob"] is True and body["logprob_start_len"] == 0
        wait_for(lambda: len(list(server.buffer.entries())) >= 2, timeout=20)
        stored = {e.trace.request_id: e.trace for e in server.buffer.entries()}
        assert set(stored) == set(fake.truth)
        for rid, got in stored.items():
            want = fake.truth[rid]
            _same_rows(got, want, want.num_tokens - 1)
            assert got.draft_version == 2
            validate(got, TraceLimits(vocab_size=V, target_hidden_size=H))
            want_steps = cut_steps(want.steps, want.num_tokens - 1)  # the trace ends one token earlier
            assert len(got.steps) == (len(want_steps) if with_draft else 0)
            for a, b in zip(sorted(got.steps, key=lambda s: s.trunk_pos), want_steps):
                assert a.trunk_pos == b.trunk_pos and tree_paths(a) == tree_paths(b)
        metrics = httpx.get(http.url + "/metrics", timeout=10).text
        assert "aurora_requests_total 2" in metrics
        assert engine.snapshot()["trace_errors"] == 0
    finally:
        http.stop()
        engine.close()
        fake.close()


def test_sidecar_makes_no_trace_from_temperature_scaled_logprobs(target, server_factory):
    """Without SGLANG_RETURN_ORIGINAL_LOGPROB, SGLang's output logprobs at T != 0, 1 are of logits / T."""
    server = server_factory(limits=dict(vocab_size=V), model=dict(vocab_size=V, target_hidden_size=H))
    for original, traced in [(False, 0), (True, 1)]:
        engine = SGLangEngine(SidecarConfig(topk=4, max_new_tokens=6, original_logprobs=original,
                                            traces=TraceClientConfig(address=server.address)), tokenizer=_Tok())
        fake = FakeSGLang(target)
        engine.cfg.sglang_url = fake.url
        try:
            before = len(server.buffer.entries())
            for t in (0.0, 0.7):
                assert "error" not in engine.complete(PROMPTS[0], max_new_tokens=6, temperature=t)
            engine.client.flush(20)
            assert len(server.buffer.entries()) - before == 1 + traced
            assert engine.snapshot()["traces_skipped"] == 1 - traced
        finally:
            engine.close()
            fake.close()


@pytest.mark.parametrize("config", ["configs/llama3.1-8b-sglang.yaml", "configs/qwen3-8b-sglang.yaml"])
@pytest.mark.parametrize("mode", ["draft", "no-draft"])
def test_launch_command_uses_only_pinned_flags(config, mode):
    """Every flag sglang-launch passes is a server arg the conformance test found in the pinned wheel."""
    from bridge.config import load_config
    from serving.sglang import pinned
    from serving.sglang.launch import SGLangLaunchConfig, sglang_command
    cfg = load_config(SGLangLaunchConfig, config, [f"sglang.mode={mode}", "sglang.api_key=k", "sglang.admin_api_key=a",
                                                   "sglang.disable_radix_cache=true", "sglang.chunked_prefill_size=16384"])
    cmd = sglang_command(cfg)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = {a[2:].replace("-", "_") for a in cmd if a.startswith("--")}
    assert flags <= set(pinned.SERVER_ARGS), flags - set(pinned.SERVER_ARGS)
    assert ("speculative_draft_model_path" in flags) == (mode == "draft")
    assert ("enable_return_aux_hidden_states" in flags) == (mode == "no-draft")


def test_launch_reads_api_keys_from_the_environment(monkeypatch):
    from bridge.config import load_config
    from serving.sglang.launch import SGLangLaunchConfig, sglang_command
    monkeypatch.setenv("AURORA_TEST_ADMIN_KEY", "adm1n")
    cfg = load_config(SGLangLaunchConfig, "configs/llama3.1-8b-sglang.yaml", ["sglang.admin_api_key=env:AURORA_TEST_ADMIN_KEY"])
    cmd = sglang_command(cfg)
    assert cmd[cmd.index("--admin-api-key") + 1] == "adm1n"


@pytest.mark.parametrize("mode", ["draft", "no-draft"])
def test_launch_sets_the_environment_traces_need(mode, capsys):
    """Output logprobs at temperature != 0, 1 are the raw distribution only with this variable set."""
    from bridge.config import load_config
    from serving.sglang.launch import SGLangLaunchConfig, run
    cfg = load_config(SGLangLaunchConfig, "configs/llama3.1-8b-sglang.yaml", [f"sglang.mode={mode}"])
    assert run(cfg, dry_run=True) == 0
    line = capsys.readouterr().out
    assert line.startswith("SGLANG_RETURN_ORIGINAL_LOGPROB=1 ") and "sglang.launch_server" in line
    assert ("AURORA_TREE_SINK=" in line) == (mode == "draft")


def test_launch_config_errors_are_clear():
    from bridge.config import ConfigError, load_config
    from serving.sglang.launch import SGLangLaunchConfig
    with pytest.raises((ConfigError, ValueError), match="draft_path"):
        load_config(SGLangLaunchConfig, "configs/llama3.1-8b-sglang.yaml", ["sglang.draft_path="])


@pytest.mark.parametrize("model", ["llama3.1-8b", "qwen3-8b"])
def test_gpu_loop_configs_load_and_agree(model):
    """The GPU-host configs parse, and the trainer's draft matches what SGLang will load."""
    from aurora_jax.config import TrainerConfig
    from apps.demo import DemoConfig
    from bridge.config import load_config
    from serving.sglang.launch import SGLangLaunchConfig
    demo = load_config(DemoConfig, f"configs/{model}-sglang-demo.yaml", [])
    trainer = load_config(TrainerConfig, demo.trainer_config, [])
    launch = load_config(SGLangLaunchConfig, demo.serve_config, [])
    assert demo.serving == "sglang" and launch.sglang.mode == "draft"
    assert trainer.model.hidden_size == trainer.limits.target_hidden_size == 4096
    assert trainer.model.vocab_size == trainer.limits.vocab_size and trainer.model.draft_vocab_size == 32000
    assert launch.sidecar.topk <= trainer.batch.topk and launch.sglang.num_steps <= 8
