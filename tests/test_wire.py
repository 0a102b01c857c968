import ml_dtypes
import numpy as np
import pytest

from bridge.proto import aurora_pb2 as pb
from bridge.tensors import TraceError, from_wire, to_wire
from bridge.traces import OversizeError, Reassembler, chunks, decode, encode
from tests.conftest import make_trace


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.bool_, np.uint8])
def test_tensor_round_trip_bit_exact(dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating) or dtype is ml_dtypes.bfloat16:
        a.reshape(-1)[:3] = [np.inf, -np.inf, np.nan]  # special values survive too
    t = pb.Tensor.FromString(to_wire(a).SerializeToString())
    b = from_wire(t, "x")
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    assert a.tobytes() == b.tobytes()


def test_tensor_big_endian_input_is_normalized():
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    b = from_wire(to_wire(a), "x")
    assert b.dtype == np.dtype("<i4") and np.array_equal(a, b)


def test_tensor_scalar_and_empty():
    for a in (np.float32(3.5), np.zeros((0, 4), np.int32)):
        b = from_wire(to_wire(np.asarray(a)), "x")
        assert b.shape == np.shape(a) and np.array_equal(a, b)


def test_tensor_errors_name_field():
    t = to_wire(np.zeros((2, 3), np.float32))
    t.shape[:] = [2, 4]
    with pytest.raises(TraceError, match=r"aux_hidden: data has 24 bytes, expected 32 for float32\[2, 4\]"):
        from_wire(t, "aux_hidden")
    t.dtype = 0
    with pytest.raises(TraceError, match="unknown or unspecified dtype"):
        from_wire(t, "aux_hidden")
    with pytest.raises(TypeError, match="no wire encoding"):
        to_wire(np.zeros(2, np.complex64))


def assert_traces_equal(a, b):
    for f in ("request_id", "prompt_len", "draft_version", "domain", "start_unix_s", "end_unix_s", "target_forwards"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("tokens", "aux_hidden", "target_ids", "target_logprobs"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), f
    assert len(a.steps) == len(b.steps)
    for s, t in zip(a.steps, b.steps):
        assert s.trunk_pos == t.trunk_pos
        for f in ("tokens", "parents", "accepted", "target_nodes", "target_ids", "target_logprobs"):
            x, y = getattr(s, f), getattr(t, f)
            assert (x is None) == (y is None), f
            if x is not None:
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_trace_round_trip(dtype):
    t = make_trace(0, hidden_dtype=dtype)
    t.steps[1].target_nodes = t.steps[1].target_ids = t.steps[1].target_logprobs = None  # optional part
    assert_traces_equal(t, decode(encode(t)))


def test_decode_names_missing_and_wrong_dtype():
    m = pb.RequestTrace.FromString(encode(make_trace(0)))
    m.ClearField("aux_hidden")
    with pytest.raises(TraceError, match="aux_hidden: missing"):
        decode(m.SerializeToString())
    m = pb.RequestTrace.FromString(encode(make_trace(0)))
    to_wire(np.zeros(3, np.int64), m.steps[2].parents)
    with pytest.raises(TraceError, match=r"steps\[2\]\.parents: dtype int64 not allowed, expected int32"):
        decode(m.SerializeToString())
    with pytest.raises(TraceError, match="payload: not a serialized RequestTrace"):
        decode(b"\xff\xff\xff")


def test_chunking_reassembles_interleaved():
    payloads = {f"r{i}": bytes(np.random.default_rng(i).integers(0, 256, 10_000 + i, dtype=np.uint8)) for i in range(3)}
    streams = {rid: list(chunks(rid, p, 999)) for rid, p in payloads.items()}
    assert all(len(c) > 10 for c in streams.values())
    r = Reassembler(max_trace_bytes=1 << 20)
    out = {}
    while any(streams.values()):  # round-robin interleaving
        for rid, cs in streams.items():
            if cs:
                got = r.add(cs.pop(0))
                if got is not None:
                    out[rid] = got
    assert out == payloads and not r.pending


def test_reassembler_errors():
    r = Reassembler(max_trace_bytes=5000)
    cs = list(chunks("a", b"x" * 4000, 1000))
    r.add(cs[0])
    with pytest.raises(TraceError, match=r"chunk.chunk_index: request 'a': got chunk 2, expected 1"):
        r.add(cs[2])
    assert not r.pending  # the broken trace is dropped, the stream can continue
    assert r.add(cs[3]) is None  # the rest of the rejected trace is skipped quietly
    big = list(chunks("b", b"y" * 7000, 1000))
    with pytest.raises(OversizeError, match="exceeds max_trace_bytes=5000"):
        for c in big[:6]:
            r.add(c)
    assert r.add(big[6]) is None and not r.pending
    assert r.add(next(chunks("b", b"z" * 10, 1000))) == b"z" * 10  # the same id may be sent again
    c = pb.TraceChunk(request_id="c", chunk_index=0, chunk_count=0)
    with pytest.raises(TraceError, match="chunk_count"):
        r.add(c)
