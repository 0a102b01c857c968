"""Fuzzing the two doors (hypothesis): random mutations of valid traces through a real ingest
server, and random request bodies through the real HTTP front. Whatever arrives, the answer names
what was wrong, the servers keep serving, and nothing valid around a bad input is lost. Bounded in
examples so `make test` stays short; `HYPOTHESIS_PROFILE=long` tries many more.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aurora_jax.ingest import INVALID_ARGUMENT, OK, RESOURCE_EXHAUSTED
from bridge.chunks import chunk_messages
from bridge.proto import aurora_pb2 as pb
from bridge.traces import encode, to_proto
from tests.conftest import make_trace, push_raw
from tests.test_serving_http import _engine, model_dir  # noqa: F401  (model_dir: the tiny model fixture)

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every tensor of a RequestTrace, as a path from the message (ints index repeated fields).
TENSORS = [("tokens",), ("aux_hidden",), ("target", "ids"), ("target", "logprobs"), ("steps", 0, "tokens"),
           ("steps", 0, "parents"), ("steps", 0, "accepted"), ("steps", 1, "target_nodes"),
           ("steps", 1, "target", "ids"), ("steps", 1, "target", "logprobs")]
FIELD = re.compile(r"^(request '[^']*': )?(payload|request_id|prompt_len|tokens|aux_hidden|target(\.\w+)?|"
                   r"steps\[\d+\](\.\w+)*(\.target\.\w+)?|chunk\.\w+): ")


def _at(m, path):
    for p in path:
        m = m[p] if isinstance(p, int) else getattr(m, p)
    return m


mutation = st.one_of(
    st.tuples(st.just("dtype"), st.integers(-3, 40)),
    st.tuples(st.just("dim"), st.integers(0, 3), st.sampled_from([0, 1, -1, 7, 2**31, 2**62])),
    st.tuples(st.just("ndim"), st.integers(0, 70)),
    st.tuples(st.just("cut"), st.integers(1, 64)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("scalar"), st.sampled_from(["prompt_len", "trunk_pos"]), st.integers(-5, 10**6)),
    st.tuples(st.just("id"), st.text(max_size=300)),
)


def _mutate(m: pb.RequestTrace, path, how) -> None:
    t = _at(m, path)
    kind = how[0]
    if kind == "dtype":
        t.dtype = how[1] % 64
    elif kind == "dim" and len(t.shape):
        t.shape[how[1] % len(t.shape)] = max(how[2], 0) if how[2] >= 0 else t.shape[how[1] % len(t.shape)] + 1
    elif kind == "ndim":
        t.shape[:] = [1] * how[1]
    elif kind == "cut":
        t.data = t.data[:-how[1]]
    elif kind == "bytes":
        t.data = how[1]
    elif kind == "scalar":
        target = m if how[1] == "prompt_len" else m.steps[0]
        setattr(target, how[1], max(how[2], 0))
    elif kind == "id":
        m.request_id = how[1]


@given(path=st.sampled_from(TENSORS), how=mutation, seed=st.integers(0, 2**16))
def test_mutated_traces_are_refused_by_field_and_lose_nothing_around_them(server_factory, path, how, seed):
    server = _server(server_factory)
    before, after = make_trace(2 * seed, seed=1), make_trace(2 * seed + 1, seed=1)
    m = to_proto(make_trace(seed, seed=2))
    _mutate(m, path, how)
    rid = f"fuzz-{seed}"
    acks = push_raw(server.address, [*chunk_messages(before.request_id, [encode(before)], 4096),
                                     *chunk_messages(rid, [m.SerializeToString()], 4096),
                                     *chunk_messages(after.request_id, [encode(after)], 4096)])
    assert [a.code for a in acks[::2]] == [OK, OK] and len(acks) == 3, acks
    bad = acks[1]
    if bad.code != OK:  # some mutations leave a valid trace (e.g. a token id still in range)
        assert bad.code in (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) and FIELD.search(bad.message), bad.message
        assert len(bad.message) < 5000 and len(bad.request_id) < 300
    ids = {e.trace.request_id for e in server.buffer.entries()}
    assert {before.request_id, after.request_id} <= ids


_servers: dict = {}


def _server(factory):
    """One ingest server for all examples of a test run (hypothesis calls the test many times)."""
    if id(factory) not in _servers:
        _servers.clear()
        _servers[id(factory)] = factory(limits=dict(max_trace_bytes=1 << 20))
    return _servers[id(factory)]


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                                        max_size=3), max_leaves=8)
request_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional=dict(prompt=json_values | st.text(max_size=30), max_tokens=json_values,
                                            temperature=json_values, seed=json_values, stream=json_values,
                                            speculative=json_values, model=json_values, messages=json_values)),
)


@pytest.fixture(scope="module")
def http_front(model_dir):  # noqa: F811
    engine, http = _engine(model_dir, None, mode="none")
    yield http
    http.stop()
    engine.close()


@given(body=request_bodies, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_request_bodies_get_a_json_answer_and_the_server_keeps_serving(http_front, body, route):
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and 1 <= body["max_tokens"]:
        body["max_tokens"] = min(body["max_tokens"], 3)  # keep decoding work small
    r = httpx.post(http_front.url + route, content=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=60)
    status, text = r.status_code, r.text
    assert status in (200, 400, 404, 413, 422, 429), (status, text)
    if status != 200:
        err = json.loads(text)["error"]
        assert err["message"] and err["type"], err
    assert httpx.get(http_front.url + "/health", timeout=10).json()["status"] == "ok"
