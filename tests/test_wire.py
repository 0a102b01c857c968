import ml_dtypes
import numpy as np
import pytest

from bridge.proto import aurora_pb2 as pb
from bridge.tensors import TraceError, from_wire, to_wire
from bridge.chunks import Reassembler, chunk_messages, parse_chunk
from bridge.tensors import OversizeError
from bridge.traces import decode, encode, to_proto
from tests.conftest import make_trace


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.bool_, np.uint8])
def test_tensor_round_trip_bit_exact(dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating) or dtype is ml_dtypes.bfloat16:
        a.reshape(-1)[:3] = [np.inf, -np.inf, np.nan]  # special values survive too
    t = pb.Tensor.FromString(to_wire(a).SerializeToString())
    b = from_wire(t, field="x")
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    assert a.tobytes() == b.tobytes()


def test_tensor_big_endian_input_is_normalized():
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    b = from_wire(to_wire(a), field="x")
    assert b.dtype == np.dtype("<i4") and np.array_equal(a, b)


def test_tensor_scalar_and_empty():
    for a in (np.float32(3.5), np.zeros((0, 4), np.int32)):
        b = from_wire(to_wire(np.asarray(a)), field="x")
        assert b.shape == np.shape(a) and np.array_equal(a, b)


def test_tensor_errors_name_field():
    t = to_wire(np.zeros((2, 3), np.float32))
    t.shape[:] = [2, 4]
    with pytest.raises(TraceError, match=r"aux_hidden: data has 24 bytes, expected 32 for float32\[2, 4\]"):
        from_wire(t, field="aux_hidden")
    t.dtype = 0
    with pytest.raises(TraceError, match="unknown or unspecified dtype"):
        from_wire(t, field="aux_hidden")
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


def feed(r, msg):
    return r.add(*parse_chunk(msg))


def test_chunking_reassembles_interleaved():
    payloads = {f"r{i}": bytes(np.random.default_rng(i).integers(0, 256, 10_000 + i, dtype=np.uint8)) for i in range(3)}
    # Parts of uneven sizes: chunk boundaries fall inside and between parts.
    streams = {rid: list(chunk_messages(rid, [p[:10], p[10:5000], p[5000:]], 999)) for rid, p in payloads.items()}
    assert all(len(c) > 10 for c in streams.values())
    r = Reassembler(max_trace_bytes=1 << 20)
    out = {}
    while any(streams.values()):  # round-robin interleaving
        for rid, cs in streams.items():
            if cs:
                got = feed(r, cs.pop(0))
                if got is not None:
                    out[rid] = bytes(got)
    assert out == payloads and not r.pending


def test_chunk_messages_are_plain_protobuf():
    msgs = list(chunk_messages("x", [b"ab", b"cdef"], 4))
    parsed = [pb.TraceChunk.FromString(m) for m in msgs]
    assert [(c.chunk_index, c.chunk_count, c.total_bytes, c.payload) for c in parsed] == [(0, 2, 6, b"abcd"), (1, 2, 6, b"ef")]
    assert len(list(chunk_messages("y", [b""], 4))) == 1


def test_encode_matches_protobuf_semantics():
    t = make_trace(0)
    assert pb.RequestTrace.FromString(encode(t)) == to_proto(t)


def test_reassembler_errors():
    r = Reassembler(max_trace_bytes=5000)
    cs = list(chunk_messages("a", [b"x" * 4000], 1000))
    feed(r, cs[0])
    with pytest.raises(TraceError, match=r"chunk.chunk_index: request 'a': got chunk 2, expected 1"):
        feed(r, cs[2])
    assert not r.pending  # the broken trace is dropped, the stream can continue
    assert feed(r, cs[3]) is None  # the rest of the rejected trace is skipped quietly
    big = list(chunk_messages("b", [b"y" * 7000], 1000))
    with pytest.raises(OversizeError, match="of 7000 bytes exceeds max_trace_bytes=5000"):
        feed(r, big[0])  # refused on the first chunk, before anything is allocated
    assert all(feed(r, c) is None for c in big[1:]) and not r.pending
    assert bytes(feed(r, next(chunk_messages("b", [b"z" * 10], 1000)))) == b"z" * 10  # the id may come again
    lying = pb.TraceChunk.FromString(next(chunk_messages("c", [b"q" * 3000], 1000)))
    lying.total_bytes = 2000
    with pytest.raises(TraceError, match="more bytes than total_bytes=2000"):
        for i in range(3):
            lying.chunk_index = i
            feed(r, lying.SerializeToString())
    with pytest.raises(TraceError, match="chunk_count"):
        feed(r, pb.TraceChunk(request_id="d", chunk_index=0, chunk_count=0).SerializeToString())
    with pytest.raises(TraceError, match="chunk.total_bytes: request 'e': required"):
        feed(r, pb.TraceChunk(request_id="e", chunk_index=0, chunk_count=2, payload=b"x").SerializeToString())
    with pytest.raises(TraceError, match="chunk: not a serialized TraceChunk"):
        parse_chunk(b"\xff\xff")


def test_decode_aux_hidden_is_zero_copy_view_of_payload():
    t = make_trace(0)
    payload = encode(t)
    d = decode(payload)
    assert np.shares_memory(d.aux_hidden, np.frombuffer(payload, np.uint8))
    assert not d.aux_hidden.flags.writeable  # nobody can scribble over the received bytes
    assert_traces_equal(t, d)


def test_decode_falls_back_when_aux_field_is_repeated():
    # Protobuf merges a repeated singular message field; the zero-copy scan must not guess.
    t = make_trace(0)
    first = pb.RequestTrace()
    first.aux_hidden.dtype = pb.BF16  # merged with the full tensor that follows
    payload = first.SerializeToString() + encode(t)
    d = decode(payload)
    assert_traces_equal(t, d)
    assert not np.shares_memory(d.aux_hidden, np.frombuffer(payload, np.uint8))  # parsed the plain way


def test_decode_rejects_truncated_payload():
    payload = encode(make_trace(0))
    with pytest.raises(TraceError, match="payload: not a serialized RequestTrace"):
        decode(payload[: len(payload) // 2])


def test_validation_boundaries_are_exact():
    """Each limit admits its bound and refuses one past it; token id 0 is a token; parents may not
    point forward; rejected-node lists may not repeat a node (found by `make mutation`)."""
    import dataclasses

    from aurora_jax.validate import TraceLimits, validate

    lim = TraceLimits(vocab_size=1000, max_topk=4, max_steps=3, max_tree_nodes=5)
    t = make_trace(7, num_steps=3, tree_nodes=5)
    validate(t, lim)
    ok = lambda tr, **kw: validate(tr, dataclasses.replace(lim, **kw))  # noqa: E731

    zero = dataclasses.replace(t, tokens=t.tokens.copy())
    zero.tokens[0] = 0  # a prompt token, so no tree refers to it
    validate(zero, lim)
    zero.tokens[:3] = [3, 0, 1000]  # the first bad id is named, not a valid one before it
    with pytest.raises(TraceError, match=r"tokens: token id 1000 at index \[2\]"):
        validate(zero, lim)
    late = dataclasses.replace(t, steps=[dataclasses.replace(t.steps[0], trunk_pos=len(t.tokens) + 5)] + t.steps[1:])
    with pytest.raises(TraceError, match=r"steps\[0\]\.trunk_pos: \d+ outside"):
        validate(late, lim)
    validate(dataclasses.replace(t, request_id="r" * 256), lim)
    with pytest.raises(TraceError, match="request_id"):
        validate(dataclasses.replace(t, request_id="r" * 257), lim)
    assert t.target_ids.shape[1] == 4  # k == max_topk is allowed, k > max_topk is not
    with pytest.raises(TraceError, match=r"target\.ids: k=4 outside \[1, max_topk=3\]"):
        ok(t, max_topk=3)
    with pytest.raises(TraceError, match="4 steps > max_steps=3"):
        validate(dataclasses.replace(t, steps=t.steps + [t.steps[0]]), lim)
    n = max(len(s.tokens) for s in t.steps)
    ok(t, max_tree_nodes=n)
    with pytest.raises(TraceError, match=f"need 1..{n - 1} nodes"):
        ok(t, max_tree_nodes=n - 1)
    s = t.steps[0]
    forward = s.parents.copy()
    forward[0] = len(forward) - 1  # node 0 hangs from the last node: a parent after its child
    with pytest.raises(TraceError, match=r"steps\[0\]\.parents: node 0 has parent"):
        validate(dataclasses.replace(t, steps=[dataclasses.replace(s, parents=forward)] + t.steps[1:]), lim)
    # an accepted node must carry the trunk's token there (smaller or larger), and not run past its end
    i, st = next((i, st) for i, st in enumerate(t.steps) if st.accepted.any())
    j = int(np.flatnonzero(st.accepted)[0])
    for other in (0, 999):
        toks = st.tokens.copy()
        toks[j] = other if toks[j] != other else 1
        with pytest.raises(TraceError, match=rf"steps\[{i}\]\.accepted: accepted node {j} \(token"):
            validate(dataclasses.replace(t, steps=[*t.steps[:i], dataclasses.replace(st, tokens=toks),
                                                   *t.steps[i + 1:]]), lim)
    end = dataclasses.replace(st, trunk_pos=len(t.tokens) - 1)  # its accepted node would be token T
    with pytest.raises(TraceError, match=rf"steps\[{i}\]\.accepted: accepted node {j} .* does not match tokens\["):
        validate(dataclasses.replace(t, steps=[*t.steps[:i], end, *t.steps[i + 1:]]), lim)
    k = next(i for i, st in enumerate(t.steps) if len(st.target_nodes) >= 2)
    st = t.steps[k]
    out = st.target_nodes.copy()
    out[-1] = len(st.tokens)  # a node index past the tree
    with pytest.raises(TraceError, match=rf"steps\[{k}\]\.target_nodes: must be strictly increasing"):
        validate(dataclasses.replace(t, steps=[*t.steps[:k], dataclasses.replace(st, target_nodes=out),
                                               *t.steps[k + 1:]]), lim)
    st = t.steps[k]
    dup = st.target_nodes.copy()
    dup[1] = dup[0]
    with pytest.raises(TraceError, match=rf"steps\[{k}\]\.target_nodes: must be strictly increasing"):
        validate(dataclasses.replace(t, steps=[*t.steps[:k], dataclasses.replace(st, target_nodes=dup),
                                               *t.steps[k + 1:]]), lim)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_first_nonfinite_finds_the_first_bad_value_in_large_arrays(dtype):
    """Large 16-bit arrays take the blocked bit-test path: the same answer as np.isfinite."""
    from aurora_jax.validate import _BLOCK, first_nonfinite

    rng = np.random.default_rng(3)
    a = rng.standard_normal((4 * _BLOCK // 96 + 7, 96)).astype(dtype)
    assert a.size > 3 * _BLOCK and first_nonfinite(a) is None
    for bad, where in [(np.nan, (2 * _BLOCK // 96 + 3, 5)), (np.inf, (_BLOCK // 96, 0)), (-np.inf, (3, 95))]:
        b = a.copy()
        b[where] = bad
        b[-1, -1] = np.nan  # a later one is not the first
        assert first_nonfinite(b) == where, (bad, where)
