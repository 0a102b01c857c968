"""The embedded engine behind real HTTP: OpenAI-style requests, streaming, metrics, trace export."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from apps.demo import free_port
from serving.engine import DraftSource, Engine, EngineConfig
from serving.http import HttpServer
from serving.spec_decode import SpecConfig
from serving.target import TargetConfig
from serving.trace_client import TraceClientConfig

CORPUS = ["the quick brown fox jumps over the lazy dog", "speculative decoding drafts tokens and the target verifies",
          "online training keeps the draft fresh", "hello world, this is a tiny model"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _post(url, body, timeout=60):
    r = httpx.post(url, json=body, timeout=timeout)
    return r.status_code, r.text, r.headers.get("Content-Type")


def _get(url):
    return httpx.get(url, timeout=30).raise_for_status().text


def _engine(model_dir, traces: TraceClientConfig | None, mode="untrained"):
    cfg = EngineConfig(target=TargetConfig(path=str(model_dir), topk=4), draft=DraftSource(mode=mode),
                       spec=SpecConfig(topk=2, num_steps=3, num_draft_tokens=4), traces=traces or TraceClientConfig(),
                       export_traces=traces is not None, max_new_tokens=24)
    engine = Engine(cfg)
    return engine, HttpServer(engine, port=0).start()


def test_openai_style_requests_streaming_metrics_and_traces(model_dir, server_factory):
    ingest = server_factory(limits=dict(vocab_size=202), model=dict(vocab_size=202, target_hidden_size=32))
    engine, http = _engine(model_dir, TraceClientConfig(address=ingest.address, batch_size=1))
    try:
        assert json.loads(_get(http.url + "/health"))["status"] == "ok"
        code, body, _ = _post(http.url + "/v1/completions",
                              dict(model="aurora-target", prompt="the quick brown", max_tokens=12, temperature=0))
        r = json.loads(body)
        assert code == 200 and r["object"] == "text_completion" and r["usage"]["completion_tokens"] <= 12
        assert isinstance(r["choices"][0]["text"], str) and r["choices"][0]["finish_reason"] in ("stop", "length")
        # the same request with the target alone gives the same text (greedy is lossless)
        ref_engine = Engine(EngineConfig(target=TargetConfig(path=str(model_dir), topk=4), draft=DraftSource("none"),
                                         export_traces=False, max_new_tokens=24))
        ids = engine.tokenizer("the quick brown")["input_ids"]
        ref = ref_engine.complete(ids, max_new_tokens=12, eos=engine.tokenizer.eos_token_id)
        ref_engine.close()
        assert r["choices"][0]["text"] == engine.tokenizer.decode(ref["output"], skip_special_tokens=True)
        # a side-by-side's baseline: the same engine decodes this request target-only, one token per forward
        code, body, _ = _post(http.url + "/v1/completions", dict(prompt="the quick brown", max_tokens=12,
                                                                 temperature=0, speculative=False))
        plain = json.loads(body)
        assert plain["choices"][0]["text"] == r["choices"][0]["text"]
        assert plain["aurora"]["target_forwards"] == plain["usage"]["completion_tokens"]

        code, body, ctype = _post(http.url + "/v1/chat/completions", dict(
            model="aurora-target", stream=True, max_tokens=10, messages=[dict(role="user", content="hello world")]))
        assert code == 200 and ctype.startswith("text/event-stream")
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 3
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        # concurrent requests are interleaved and all answered
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda p: _post(http.url + "/v1/completions", dict(prompt=p, max_tokens=8)),
                                 ["hello", "online training", "the lazy dog", "tiny model"]))
        assert all(c == 200 for c, _, _ in outs)

        for bad, why in [(dict(prompt=""), "prompt: a non-empty string"),
                         (dict(prompt="x", max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
                         (dict(prompt="x", temperature="hot"), "temperature: Input should be a valid number"),
                         (dict(prompt="x", speculative="no"), "speculative: Input should be a valid boolean")]:
            code, text, _ = _post(http.url + "/v1/completions", bad)
            assert code == 400 and why in json.loads(text)["error"]["message"]

        engine.client.flush(30)
        metrics = _get(http.url + "/metrics")
        assert "aurora_requests_total 7.0" in metrics and "aurora_draft_version 0.0" in metrics
        assert "aurora_traces_sent_total 7.0" in metrics and "aurora_accept_length" in metrics
        traces = ingest.buffer.entries()
        assert len(traces) == 7 and all(e.trace.tokens.size > e.trace.prompt_len for e in traces)
        assert sum(len(e.trace.steps) for e in traces) > 0
    finally:
        http.stop()
        engine.close()


def test_trainer_offline_requests_still_served_and_drops_counted(model_dir):
    dead = free_port()  # nothing listens there
    engine, http = _engine(model_dir, TraceClientConfig(address=f"127.0.0.1:{dead}", max_queue=1, batch_size=1,
                                                        rpc_timeout_s=0.5))
    try:
        t0 = time.perf_counter()
        for p in ["hello", "the quick", "online"]:
            assert _post(http.url + "/v1/completions", dict(prompt=p, max_tokens=6))[0] == 200
        assert time.perf_counter() - t0 < 30
        metrics = _get(http.url + "/metrics")
        dropped = float(next(l.split()[1] for l in metrics.splitlines() if l.startswith("aurora_traces_dropped_total")))
        assert dropped >= 1 and "aurora_traces_sent_total 0.0" in metrics
    finally:
        http.stop()
        engine.close()


def test_tier_import_boundaries():
    """serving/ never imports JAX; aurora_jax/ never imports torch (docs/design.md layout)."""
    import subprocess
    import sys
    code = ("import sys, serving.engine, serving.http, serving.trace_client, serving.weight_sync, bridge.traces;"
            "assert 'jax' not in sys.modules, 'serving imported jax'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    code = ("import sys, aurora_jax.loop, aurora_jax.export, aurora_jax.weight_sync, apps.cli;"
            "assert 'torch' not in sys.modules, 'aurora_jax imported torch'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_serve_command_loads_its_config(model_dir):
    from bridge.config import load_config
    cfg = load_config(EngineConfig, "configs/serve-cpu.yaml", [f"target.path={model_dir}", "draft.mode=none"])
    assert cfg.spec.topk == 4 and cfg.draft.mode == "none" and cfg.traces.address.endswith(":50051")


def _raw(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict | str]:
    """One raw HTTP exchange (for what a well-behaved client library would never send)."""
    data = data.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n", 1)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(data)
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def test_abusive_requests_get_a_clear_4xx_and_the_server_keeps_serving(model_dir):
    """What a fuzzer or an attacker sends: each gets an OpenAI-style error with the right status
    before any decoding work, and a normal request still succeeds after all of them."""
    engine, http = _engine(model_dir, None, mode="none")
    url = http.url + "/v1/completions"
    try:
        context = engine.max_context  # 256 for this tiny model
        for body, code, why in [
                (dict(prompt="the lazy dog " * 200, max_tokens=8), 400, f"maximum context length is {context} tokens"),
                (dict(prompt="x", model="gpt-4"), 404, "The model `gpt-4` does not exist"),
                (dict(prompt="x", max_tokens=10_000), 400, "max_tokens: 10000 is over this server's limit"),
                (dict(prompt="x", seed=2**70), 400, "seed: Input should be less than"),
                (dict(messages=[]), 400, "messages: List should have at least 1 item")]:
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            got, text, _ = _post(http.url + route, body)
            err = json.loads(text)["error"]
            assert got == code and why in err["message"], (body, err)
        port = http.port
        post = lambda body, extra="": (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"  # noqa
                                       f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
        for raw, code in [(post(b'{"prompt": "\xff\xfe"}'), 400),  # not UTF-8
                          (post(b'{"prompt": "x", "max_tokens": NaN}'), 400),
                          (post(b'{"prompt": "x", "max_tokens": Infinity}'), 400),
                          (post(b"[1, 2]"), 400),
                          (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400),
                          (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}", 400),
                          (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9437184\r\n\r\n", 413),
                          (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404)]:
            status, body = _raw(port, raw)
            assert status == code, (raw[:80], status, body)
        # chunked transfer encoding is HTTP/1.1: one answer, and a valid one
        chunked = b'{"prompt": "hello", "max_tokens": 4}'
        status, body = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunked):x}".encode() + b"\r\n"
                                  + chunked + b"\r\n0\r\n\r\n")
        assert status == 200 and body["usage"]["completion_tokens"] <= 4
        big = b'{"prompt": "' + b"x" * (9 << 20) + b'"}'  # 9 MiB, chunked: no length to refuse it by
        status, body = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(big):x}".encode() + b"\r\n"
                                  + big + b"\r\n0\r\n\r\n")
        assert status == 413 and "over the 8388608-byte limit" in body["error"]["message"], (status, body)
        # 20 simultaneous connections: all answered (no resets from a small listen backlog)
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(20) as pool:
            outs = list(pool.map(lambda i: _post(url, dict(prompt=f"hello {i}", max_tokens=2))[0], range(20)))
        assert outs == [200] * 20
        code, body, _ = _post(url, dict(prompt="online training", max_tokens=4))
        assert code == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
    finally:
        http.stop()
        engine.close()


def test_streamed_concurrent_and_solo_requests_give_the_same_text(model_dir):
    """Greedy in float32: a request's text does not depend on streaming or on the requests batched
    with it (the oracle is each prompt sent alone, not streamed)."""
    import concurrent.futures as cf

    engine, http = _engine(model_dir, None)
    prompts = ["the quick brown", "online training keeps", "hello world, this", "speculative decoding"]
    url = http.url + "/v1/completions"
    body = lambda p, **kw: dict(prompt=p, max_tokens=16, temperature=0, **kw)  # noqa: E731
    try:
        solo = [json.loads(_post(url, body(p))[1])["choices"][0]["text"] for p in prompts]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            together = [json.loads(r[1])["choices"][0]["text"] for r in pool.map(lambda p: _post(url, body(p)), prompts)]
            streams = list(pool.map(lambda p: _post(url, body(p, stream=True))[1], prompts))
        streamed = []
        for text in streams:
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            streamed.append("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]))
        assert any(solo) and together == solo and streamed == solo
        assert engine.snapshot()["mean_batch"] > 1  # the concurrent ones did share forwards
    finally:
        http.stop()
        engine.close()


def test_an_engine_error_in_a_stream_is_an_error_event_not_a_clean_stop(model_dir):
    engine, http = _engine(model_dir, None, mode="none")
    try:
        real_submit = engine.submit

        def failing_submit(*a, **kw):
            h = real_submit(*a, **kw)
            h.events = __import__("queue").Queue()
            h.events.put({"error": "engine failed: boom"})
            return h
        engine.submit = failing_submit
        code, body, _ = _post(http.url + "/v1/completions", dict(prompt="hello", max_tokens=4, stream=True))
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert code == 200 and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "boom" in err["message"]
        code, text, _ = _post(http.url + "/v1/completions", dict(prompt="hello", max_tokens=4))
        assert code == 400 and "boom" in json.loads(text)["error"]["message"]
    finally:
        http.stop()
        engine.close()


def test_refused_traces_are_counted_by_field_and_repeated_failures_logged_once_a_window(model_dir, server_factory,
                                                                                       caplog):
    import logging

    from serving.ratelimit import EveryWindow

    ingest = server_factory(limits=dict(vocab_size=50), model=dict(vocab_size=50, target_hidden_size=32))
    engine, http = _engine(model_dir, TraceClientConfig(address=ingest.address, batch_size=1), mode="none")
    try:
        assert _post(http.url + "/v1/completions", dict(prompt="the quick brown fox", max_tokens=4))[0] == 200
        engine.client.flush(30)
        metrics = _get(http.url + "/metrics")
        assert 'aurora_traces_rejected_by_field_total{field="tokens"} 1.0' in metrics  # token ids >= 50
        assert "aurora_traces_rejected_total 1.0" in metrics
    finally:
        http.stop()
        engine.close()

    log = logging.getLogger("test.ratelimit")
    limited = EveryWindow(log, window_s=0.2)
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        for _ in range(10):
            limited.warning("trainer down: %s", "refused")
        time.sleep(0.25)
        limited.warning("trainer down: %s", "refused")
    lines = [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]
    assert lines == ["trainer down: refused", "trainer down: refused (9 more since the last such line)"]


def test_a_failing_decode_round_answers_its_requests_and_the_engine_keeps_serving(model_dir):
    """An exception inside a round (a bug, a broken draft) is every running request's error, counted,
    instead of a dead scheduler thread and requests that wait forever."""
    engine, http = _engine(model_dir, None)
    real = engine.decoder.step_many
    calls = []

    def broken(reqs):
        calls.append(len(reqs))
        if len(calls) == 1:
            raise RuntimeError("planted failure")
        return real(reqs)
    engine.decoder.step_many = broken
    try:
        first = engine.complete([5, 6, 7], max_new_tokens=8)
        assert first["error"] == "decoding failed: RuntimeError: planted failure"
        second = engine.complete([5, 6, 7], max_new_tokens=8)
        assert "error" not in second and len(second["output"]) == 8
        code, body, _ = _post(http.url + "/v1/completions", dict(model="aurora-target", prompt="the quick", max_tokens=4))
        assert code == 200
        assert engine.snapshot()["errors"] == 1
    finally:
        http.stop()
        engine.close()
