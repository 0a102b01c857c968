"""Real TraceIngest server on 127.0.0.1 with the real client library."""

import re
import signal
import subprocess
import sys
import time

import grpc
import ml_dtypes
import numpy as np
import pytest

from aurora_jax.buffer import BufferConfig, ReplayBuffer
from aurora_jax.ingest import INVALID_ARGUMENT, OK, RESOURCE_EXHAUSTED
from bridge.proto import aurora_pb2 as pb
from bridge.proto import aurora_pb2_grpc as pb_grpc
from bridge.tensors import to_wire
from bridge.chunks import chunk_messages
from bridge.traces import encode, to_proto
from serving.trace_client import TraceClient, TraceClientConfig
from tests.conftest import VOCAB, make_trace, push_payload, push_raw, push_trace, wait_for
from tests.test_wire import assert_traces_equal


def client_for(server, **kw):
    kw.setdefault("backoff_initial_s", 0.02)
    return TraceClient(TraceClientConfig(address=server.address, **kw))


@pytest.mark.parametrize("chunk", [1 << 20, 1500])  # whole traces, and every trace split into many chunks
def test_pushed_equals_buffered_bit_exact(server_factory, chunk):
    server = server_factory()
    traces = [make_trace(i, num_tokens=40 + i, hidden_dtype=[np.float32, np.float16, ml_dtypes.bfloat16][i % 3])
              for i in range(24)]
    client = client_for(server, batch_size=5, max_chunk_bytes=chunk)
    for t in traces:
        client.submit(t)
    assert client.flush(timeout=30)
    assert client.stats()["acked"] == 24 and client.stats()["dropped"] == 0
    client.close()
    got = {e.trace.request_id: e.trace for e in server.buffer.entries()}
    assert len(got) == 24
    for t in traces:
        assert_traces_equal(got[t.request_id], t)
    stats = pb_grpc.TraceIngestStub(grpc.insecure_channel(server.address)).Stats(pb.StatsRequest())
    assert stats.accepted == 24 and stats.buffered == 24 and stats.rejected == 0


def _mutate(fn):
    """Payload of a fresh trace after `fn` edits its RequestTrace message."""
    def make(i):
        m = to_proto(make_trace(100 + i))
        fn(m)
        return m.request_id, m.SerializeToString()
    return make


def _set(tensor_path, value):
    def fn(m):
        obj = m
        for p in tensor_path[:-1]:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        to_wire(value(obj) if callable(value) else value, getattr(obj, tensor_path[-1]))
    return fn


def _aux_with_nan(m):
    a = np.frombuffer(m.aux_hidden.data, ml_dtypes.bfloat16).copy().reshape(tuple(m.aux_hidden.shape))
    a[3, 7] = np.nan
    to_wire(a, m.aux_hidden)


MALFORMED = {
    "token id >= vocab": (_set(["tokens"], np.full(64, VOCAB, np.int32)), r"tokens: token id 1000 at index \[0\] outside"),
    "negative token id": (_set(["tokens"], np.full(64, -1, np.int32)), r"tokens: token id -1"),
    "NaN hidden state": (_aux_with_nan, r"aux_hidden: non-finite value nan at index \[3, 7\]"),
    "hidden rows != T": (_set(["aux_hidden"], np.zeros((63, 96), np.float32)), r"aux_hidden: shape \[63, 96\] does not match expected \[64, 96\]"),
    "hidden width not 3H": (_set(["aux_hidden"], np.zeros((64, 95), np.float32)), r"aux_hidden: shape \[64, 95\] does not match expected \[64, 96\]"),
    "hidden as int": (_set(["aux_hidden"], np.zeros((64, 96), np.int32)), r"aux_hidden: dtype int32 not allowed"),
    "tokens as int64": (_set(["tokens"], np.zeros(64, np.int64)), r"tokens: dtype int64 not allowed, expected int32"),
    "bytes disagree with shape": (lambda m: m.tokens.shape.__setitem__(0, 65), r"tokens: data has 256 bytes, expected 260"),
    "child before parent": (_set(["steps", "1", "parents"], lambda s: np.arange(len(s.parents.shape) and s.parents.shape[0], dtype=np.int32)),
                            r"steps\[1\]\.parents: node 0 has parent 0; a parent must be -1 or an earlier node"),
    "accepted token not on trunk": (_set(["steps", "0", "accepted"], lambda s: np.ones(s.accepted.shape[0], bool)),
                                    r"steps\[0\]\.accepted: accepted node"),
    "trunk_pos out of range": (lambda m: setattr(m.steps[2], "trunk_pos", 64), r"steps\[2\]\.trunk_pos: 64 outside \[0, 64\)"),
    "NaN target logprob": (_set(["target", "logprobs"], np.full((64, 4), np.nan, np.float32)), r"target\.logprobs: non-finite"),
    "positive logprob": (_set(["target", "logprobs"], np.full((64, 4), 0.5, np.float32)), r"target\.logprobs: log-probability 0.5 > 0"),
    "top-k over limit": (lambda m: (_set(["target", "ids"], np.zeros((64, 100), np.int32))(m), _set(["target", "logprobs"], np.zeros((64, 100), np.float32))(m)),
                         r"target\.ids: k=100 outside \[1, max_topk=64\]"),
    "prompt_len > T": (lambda m: setattr(m, "prompt_len", 65), r"prompt_len: 65 outside \[1, 64\]"),
    "missing target": (lambda m: m.ClearField("target"), r"target: missing"),
    "missing hidden": (lambda m: m.ClearField("aux_hidden"), r"aux_hidden: missing"),
    "rejected-node target without nodes": (lambda m: m.steps[0].ClearField("target_nodes"), r"steps\[0\]\.target_nodes: missing"),
    "request id differs from chunks": (lambda m: setattr(m, "request_id", "other"), r"request_id: 'other' does not match"),
    "a shape numpy cannot build": (lambda m: (m.tokens.shape.__setitem__(slice(None), [0, 2**62]), setattr(m.tokens, "data", b"")),
                                   r"tokens: dimension outside \[0, 2147483647\] in shape \[0, 4611686018427387904\]"),
    "65 dimensions": (lambda m: (m.tokens.shape.__setitem__(slice(None), [1] * 65), setattr(m.tokens, "data", b"\0" * 4)),
                      r"tokens: 65 dimensions, at most 8"),
    "parent below -1": (_set(["steps", "1", "parents"], lambda s: np.full(s.parents.shape[0], -2, np.int32)),
                        r"steps\[1\]\.parents: node 0 has parent -2; a parent must be -1 or an earlier node"),
}


def test_malformed_traces_get_status_naming_field_and_lose_nothing(server_factory):
    server = server_factory()
    good = [make_trace(i) for i in range(3)]
    for t in good:
        assert push_trace(server.address, t).code == OK
    for i, (name, (fn, pattern)) in enumerate(MALFORMED.items()):
        rid, payload = _mutate(fn)(i)
        ack = push_payload(server.address, make_trace(100 + i).request_id, payload)
        assert ack.code == INVALID_ARGUMENT, name
        assert re.search(pattern, ack.message), f"{name}: {ack.message}"
    ack = push_payload(server.address, "junk", b"\x0a\xff\xff\xff\xff")
    assert ack.code == INVALID_ARGUMENT and "payload: not a serialized RequestTrace" in ack.message
    # A bad trace in the middle of a stream does not stop the good ones around it: a NaN, a shape
    # numpy cannot build, and a bad trace with a 1.1 MB request id (its ack must stay small).
    around = []
    for k, name in enumerate(["NaN hidden state", "a shape numpy cannot build", "NaN hidden state"]):
        rid, bad = _mutate(MALFORMED[name][0])(k)
        if k == 2:
            m = pb.RequestTrace.FromString(bad)
            m.request_id = rid = "x" * 1_100_000
            bad = m.SerializeToString()
        t1, t2 = make_trace(51 + 2 * k), make_trace(52 + 2 * k)
        acks = push_raw(server.address, [*chunk_messages(t1.request_id, [encode(t1)], 4096),
                                         *chunk_messages(rid, [bad], 4096),
                                         *chunk_messages(t2.request_id, [encode(t2)], 4096)])
        assert [a.code for a in acks] == [OK, INVALID_ARGUMENT, OK], name
        assert len(acks[1].request_id) < 300 and len(acks[1].message) < 5000
        around += [t1, t2]
    got = {e.trace.request_id: e.trace for e in server.buffer.entries()}
    assert set(got) == {t.request_id for t in good + around}
    for t in good + around:
        assert_traces_equal(got[t.request_id], t)
    assert server.servicer.rejected == len(MALFORMED) + 4


def test_size_limits(server_factory):
    server = server_factory(limits=dict(max_trace_bytes=200_000, max_chunk_bytes=100_000))
    big = make_trace(0, num_tokens=600, hidden=64)  # ~240 KB
    ack = push_payload(server.address, big.request_id, encode(big), max_chunk=50_000)
    assert ack.code == RESOURCE_EXHAUSTED and "exceeds max_trace_bytes=200000" in ack.message
    assert ack.retry_after_ms == 0  # not worth retrying
    # One gRPC message over the limit: the transport refuses it, naming the size.
    with pytest.raises(grpc.RpcError) as e:
        push_payload(server.address, big.request_id, encode(big), max_chunk=1 << 20)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.details()
    small = make_trace(1)
    assert push_trace(server.address, small).code == OK  # the server is fine afterwards
    server2 = server_factory(limits=dict(max_tokens=32))
    ack = push_trace(server2.address, make_trace(2))
    assert ack.code == INVALID_ARGUMENT and "tokens: length 64 outside [1, max_tokens=32]" in ack.message


def test_backpressure_then_client_retries(server_factory):
    server = server_factory(buffer=dict(capacity_traces=4, retry_after_ms=20, evict_after_uses=1))
    client = client_for(server, batch_size=2)
    for i in range(8):
        client.submit(make_trace(i))
    deadline = time.time() + 20
    while server.buffer.snapshot_stats()["backpressured"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert server.buffer.snapshot_stats()["backpressured"] > 0
    assert len(server.buffer.entries()) == 4
    rng = np.random.default_rng(0)
    while client.stats()["acked"] < 8 and time.time() < deadline:  # the "trainer" consumes, room appears
        server.buffer.sample(2, rng)
        time.sleep(0.02)
    assert client.flush(timeout=10)
    s = client.stats()
    assert s["acked"] == 8 and s["backpressured"] > 0 and s["dropped"] == 0 and s["rejected"] == 0
    client.close()


def test_an_empty_secret_is_a_start_up_error_not_auth_off(server_factory, monkeypatch):
    from aurora_jax.config import WeightSyncConfig
    from aurora_jax.weight_sync import WeightSyncServer

    monkeypatch.setenv("AURORA_TEST_TOKEN", "")
    with pytest.raises(ValueError, match=r"\$AURORA_TEST_TOKEN, which is empty"):
        server_factory(ingest=dict(address="127.0.0.1:0", auth_token="env:AURORA_TEST_TOKEN"))
    with pytest.raises(ValueError, match=r"\$AURORA_TEST_TOKEN, which is empty"):
        WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0", auth_token="env:AURORA_TEST_TOKEN"))


def test_auth(server_factory, monkeypatch):
    monkeypatch.setenv("AURORA_TEST_TOKEN", "s3cret")
    server = server_factory(ingest=dict(address="127.0.0.1:0", auth_token="env:AURORA_TEST_TOKEN"))
    t = make_trace(0)
    for md, why in [((), "missing authorization metadata"), ((("authorization", "Bearer nope"),), "invalid bearer token")]:
        with pytest.raises(grpc.RpcError) as e:
            push_trace(server.address, t, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.TraceIngestStub(grpc.insecure_channel(server.address)).Stats(pb.StatsRequest())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert push_trace(server.address, t, metadata=(("authorization", "Bearer s3cret"),)).code == OK
    client = client_for(server, auth_token="s3cret")
    assert client.health().serving and client.server_stats().accepted == 1
    client.close()
    assert len(server.buffer.entries()) == 1


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs openssl to make a test certificate")
def test_tls(server_factory, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = server_factory(ingest=dict(address="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key)))
    client = TraceClient(TraceClientConfig(address=server.address, tls_root_cert=str(cert)))
    client.submit(make_trace(0))
    assert client.flush(10) and client.stats()["acked"] == 1
    client.close()
    with pytest.raises(grpc.RpcError):  # plaintext to a TLS port fails
        push_trace(server.address, make_trace(1), timeout=3)


def test_trainer_down_client_never_blocks_and_counts_drops():
    from apps.demo import free_port
    port = free_port()  # nothing listens there
    client = TraceClient(TraceClientConfig(address=f"127.0.0.1:{port}", max_queue=5, backoff_initial_s=0.05,
                                           backoff_max_s=0.2))
    t0 = time.perf_counter()
    for i in range(50):
        client.submit(make_trace(i))
    assert time.perf_counter() - t0 < 1.0  # submit is a queue append, whatever the trainer does
    assert wait_for(lambda: client.stats()["dropped"] >= 45 - 8 and client.stats()["retries"] > 0, timeout=10)
    s = client.stats()
    assert s["acked"] == 0 and s["dropped"] >= 45 - 8 and s["queued"] <= 5 + 8  # at most one batch in flight
    assert s["retries"] > 0 and "UNAVAILABLE" in client.last_error
    t0 = time.perf_counter()
    client.close(timeout=0.5)
    assert time.perf_counter() - t0 < 5


def _start_ingest_process(spool, extra=()):
    cmd = [sys.executable, "-m", "apps.cli", "--log-level", "warning", "ingest", "--config",
           "configs/trainer.yaml", "target=", "ingest.address=127.0.0.1:0", f"buffer.spool_dir={spool}",
           f"limits.vocab_size={VOCAB}", f"model.vocab_size={VOCAB}", "model.target_hidden_size=32", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split()[-1]


def test_sigkill_recovers_every_acked_trace(tmp_path):
    spool = tmp_path / "spool"
    proc, address = _start_ingest_process(spool)
    try:
        traces = [make_trace(i, num_tokens=400, hidden=32) for i in range(30)]
        client = TraceClient(TraceClientConfig(address=address, batch_size=4))
        for t in traces:
            client.submit(t)
        assert client.flush(30)
        assert client.stats()["acked"] == 30
        client.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proc, address = _start_ingest_process(spool)  # the restarted trainer process
    try:
        stats = pb_grpc.TraceIngestStub(grpc.insecure_channel(address)).Stats(pb.StatsRequest(), timeout=10)
        assert stats.buffered == 30 and stats.accepted == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0  # SIGTERM shuts down cleanly
    buf = ReplayBuffer(BufferConfig(spool_dir=str(spool)))
    got = {e.trace.request_id: e.trace for e in buf.entries()}
    for t in traces:
        assert_traces_equal(got[t.request_id], t)
    buf.close()



def test_sigkill_at_random_moments_loses_no_acknowledged_trace(tmp_path):
    """Rounds of: start the ingest process on one spool, push traces one by one while a timer kills
    it with SIGKILL at a random moment (mid-stream, mid-write). Afterwards every acknowledged trace
    is in the spool exactly once, bit-exact."""
    import random
    import threading

    spool, rng = tmp_path / "spool", random.Random(0)
    acked, n = {}, 0
    for _ in range(3):
        proc, address = _start_ingest_process(spool)
        threading.Timer(rng.uniform(0.3, 1.5), proc.send_signal, (signal.SIGKILL,)).start()
        while proc.poll() is None:
            t = make_trace(n, num_tokens=300, hidden=32)
            n += 1
            try:
                (ack,) = push_raw(address, chunk_messages(t.request_id, [encode(t)], 64 << 10), timeout=5)
            except (grpc.RpcError, ValueError):
                break  # killed mid-stream: this one was never acknowledged
            if ack.code == OK:
                acked[t.request_id] = t
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 10, f"only {len(acked)} traces acknowledged before the kills"
    buf = ReplayBuffer(BufferConfig(spool_dir=str(spool)))
    ids = [e.trace.request_id for e in buf.entries()]
    got = {e.trace.request_id: e.trace for e in buf.entries()}
    buf.close()
    assert len(ids) == len(set(ids)), "a trace is in the spool twice"
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} acknowledged traces lost: {sorted(missing)[:5]}"
    for rid, t in acked.items():
        assert_traces_equal(got[rid], t)
    print(f"3 SIGKILL rounds: {n} traces pushed, {len(acked)} acknowledged, {len(ids)} in the spool, 0 lost")


def test_port_in_use_is_a_clear_error(server_factory):
    server = server_factory()
    with pytest.raises(OSError, match=f"ingest.address: cannot bind 127.0.0.1:{server.port}"):
        server_factory(ingest=dict(address=f"127.0.0.1:{server.port}"))


def test_idle_streams_past_the_limit_are_refused_and_health_keeps_answering(server_factory):
    """Serving hosts that open streams and send nothing hold server threads: past `max_streams`
    (`max_subscribers` for WeightSync) a new one is refused with RESOURCE_EXHAUSTED, and Health
    still answers at once."""
    import threading

    from aurora_jax.config import WeightSyncConfig
    from aurora_jax.weight_sync import WeightSyncServer
    from tests.conftest import PUSH_METHOD

    server = server_factory(ingest=dict(address="127.0.0.1:0", max_streams=3))
    release = threading.Event()

    def idle():
        release.wait(30)
        return
        yield  # a request iterator that sends nothing until released

    channels = [grpc.insecure_channel(server.address) for _ in range(4)]
    open_push = lambda ch: ch.stream_stream(PUSH_METHOD, response_deserializer=pb.PushAck.FromString)(  # noqa: E731
        idle(), timeout=30)
    calls = [open_push(ch) for ch in channels[:3]]
    try:
        assert wait_for(lambda: server.servicer.streams.open == 3)
        with pytest.raises(grpc.RpcError) as e:
            list(open_push(channels[3]))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 Push streams already open" in e.value.details()
        t0 = time.perf_counter()
        assert pb_grpc.TraceIngestStub(channels[3]).Health(pb.HealthRequest(), timeout=5).serving
        assert time.perf_counter() - t0 < 1.0
    finally:
        release.set()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    assert wait_for(lambda: server.servicer.streams.open == 0)
    assert push_trace(server.address, make_trace(0)).code == OK  # a freed slot serves again

    weights = WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0", max_subscribers=2)).start()
    subscribe = lambda ch: ch.unary_stream("/aurora.v1.WeightSync/Subscribe",  # noqa: E731
                                           request_serializer=pb.SubscribeRequest.SerializeToString,
                                           response_deserializer=pb.WeightChunk.FromString)(
        pb.SubscribeRequest(subscriber="x"), timeout=30)
    channels = [grpc.insecure_channel(weights.address) for _ in range(3)]
    try:
        streams = [subscribe(ch) for ch in channels[:2]]
        assert wait_for(lambda: weights.slots.open == 2)
        with pytest.raises(grpc.RpcError) as e:
            next(subscribe(channels[2]))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "WeightSync subscribers" in e.value.details()
        for s in streams:
            s.cancel()
    finally:
        for ch in channels:
            ch.close()
        weights.stop(0)


def test_several_trainer_endpoints_stable_routing_failover_and_return(server_factory, tmp_path):
    """A multi-process trainer has one ingest per host: each request id goes to one endpoint (the
    same one every time), a stopped endpoint's traces move to the other at once (nothing dropped,
    submit never waits), and traces go back to it once it is up again."""
    a = server_factory(buffer=dict(spool_dir=str(tmp_path / "a")))
    b = server_factory(buffer=dict(spool_dir=str(tmp_path / "b")))
    client = TraceClient(TraceClientConfig(address=f"{a.address},{b.address}", batch_size=4,
                                           backoff_initial_s=0.3, backoff_max_s=0.3))
    ids = lambda srv: {e.trace.request_id for e in srv.buffer.entries()}  # noqa: E731
    for i in range(40):
        client.submit(make_trace(i))
    assert client.flush(timeout=30)
    on_a, on_b = ids(a), ids(b)
    assert len(on_a) + len(on_b) == 40 and not on_a & on_b and min(len(on_a), len(on_b)) >= 8  # spread, no copies
    for i in range(40):  # the same request ids again: the same endpoints
        client.submit(make_trace(i))
    assert client.flush(timeout=30)
    assert ids(a) == on_a and ids(b) == on_b

    port_b = b.address.rsplit(":", 1)[1]
    b.stop(grace=0)
    t0 = time.perf_counter()
    for i in range(40, 80):
        client.submit(make_trace(i))
    assert time.perf_counter() - t0 < 1.0
    assert client.flush(timeout=30)
    s = client.stats()
    assert s["dropped"] == 0 and s["acked"] == 120 and s["rerouted"] > 0
    assert {f"req-0-{i}" for i in range(40, 80)} <= ids(a)  # b's share of them too

    b2 = server_factory(ingest=dict(address=f"127.0.0.1:{port_b}"), buffer=dict(spool_dir=str(tmp_path / "b2")))
    time.sleep(1.0)  # past b's backoff (and gRPC's reconnect backoff, set to the same): it is chosen again
    for i in range(80, 120):
        client.submit(make_trace(i))
    assert client.flush(timeout=30)
    client.close()
    back = ids(b2)
    assert back and back == {f"req-0-{i}" for i in range(80, 120)} - ids(a)  # b's share comes back to b
