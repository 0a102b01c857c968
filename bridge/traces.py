"""RequestTrace as numpy dataclasses, its protobuf encoding, and chunking for transport.

Both tiers speak this: the serving tier builds `Trace` objects and encodes them, the trainer
decodes them. Decoding checks that every tensor is present with its contract dtype and names
the field when it is not; semantic checks (shapes agree, vocab bounds, finiteness) live in
`aurora_jax.validate` because they depend on the trainer's limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from google.protobuf.message import DecodeError

from bridge.proto import aurora_pb2 as pb
from bridge.tensors import BF16, TraceError, from_wire, to_wire, wire_dtype_name

HIDDEN_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)


@dataclasses.dataclass
class TreeStep:
    """One verification step: draft nodes hanging from trunk position `trunk_pos`."""

    trunk_pos: int
    tokens: np.ndarray  # int32 [n]
    parents: np.ndarray  # int32 [n]; -1 = trunk position
    accepted: np.ndarray  # bool [n]
    target_nodes: np.ndarray | None = None  # int32 [m], nodes carrying the target top-k
    target_ids: np.ndarray | None = None  # int32 [m, k]
    target_logprobs: np.ndarray | None = None  # f32 [m, k]


@dataclasses.dataclass
class Trace:
    """One served request (DESIGN.md section 3)."""

    request_id: str
    tokens: np.ndarray  # int32 [T]
    prompt_len: int
    aux_hidden: np.ndarray  # bf16/f16/f32 [T, 3 * Ht]
    target_ids: np.ndarray  # int32 [T, k]
    target_logprobs: np.ndarray  # f32 [T, k]
    steps: list[TreeStep] = dataclasses.field(default_factory=list)
    draft_version: int = 0
    domain: str = ""
    start_unix_s: float = 0.0
    end_unix_s: float = 0.0
    target_forwards: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        n = self.tokens.nbytes + self.aux_hidden.nbytes + self.target_ids.nbytes + self.target_logprobs.nbytes
        for s in self.steps:
            n += s.tokens.nbytes + s.parents.nbytes + s.accepted.nbytes
            if s.target_ids is not None:
                n += s.target_nodes.nbytes + s.target_ids.nbytes + s.target_logprobs.nbytes
        return n


def to_proto(trace: Trace) -> pb.RequestTrace:
    m = pb.RequestTrace(request_id=trace.request_id, draft_version=trace.draft_version,
                        domain=trace.domain, prompt_len=trace.prompt_len)
    m.timing.start_unix_s = trace.start_unix_s
    m.timing.end_unix_s = trace.end_unix_s
    m.timing.target_forwards = trace.target_forwards
    to_wire(np.asarray(trace.tokens, np.int32), m.tokens)
    to_wire(trace.aux_hidden, m.aux_hidden)
    to_wire(np.asarray(trace.target_ids, np.int32), m.target.ids)
    to_wire(np.asarray(trace.target_logprobs, np.float32), m.target.logprobs)
    for s in trace.steps:
        ms = m.steps.add(trunk_pos=s.trunk_pos)
        to_wire(np.asarray(s.tokens, np.int32), ms.tokens)
        to_wire(np.asarray(s.parents, np.int32), ms.parents)
        to_wire(np.asarray(s.accepted, np.bool_), ms.accepted)
        if s.target_ids is not None:
            to_wire(np.asarray(s.target_nodes, np.int32), ms.target_nodes)
            to_wire(np.asarray(s.target_ids, np.int32), ms.target.ids)
            to_wire(np.asarray(s.target_logprobs, np.float32), ms.target.logprobs)
    return m


def encode(trace: Trace) -> bytes:
    return to_proto(trace).SerializeToString()


def _tensor(msg, name: str, field: str, dtypes: tuple[np.dtype, ...]) -> np.ndarray:
    if not msg.HasField(name):
        raise TraceError(field, "missing")
    t = getattr(msg, name)
    a = from_wire(t, field)
    if a.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TraceError(field, f"dtype {wire_dtype_name(t)} not allowed, expected {want}")
    return a


_I32, _F32, _BOOL = (np.dtype("<i4"),), (np.dtype("<f4"),), (np.dtype(np.bool_),)


def from_proto(m: pb.RequestTrace) -> Trace:
    """Decode a RequestTrace message, checking presence and dtype of every tensor."""
    if not m.HasField("target"):
        raise TraceError("target", "missing")
    steps = []
    for i, ms in enumerate(m.steps):
        f = f"steps[{i}]"
        step = TreeStep(
            trunk_pos=ms.trunk_pos,
            tokens=_tensor(ms, "tokens", f"{f}.tokens", _I32),
            parents=_tensor(ms, "parents", f"{f}.parents", _I32),
            accepted=_tensor(ms, "accepted", f"{f}.accepted", _BOOL),
        )
        if ms.HasField("target") or ms.HasField("target_nodes"):
            step.target_nodes = _tensor(ms, "target_nodes", f"{f}.target_nodes", _I32)
            if not ms.HasField("target"):
                raise TraceError(f"{f}.target", "missing while target_nodes is set")
            step.target_ids = _tensor(ms.target, "ids", f"{f}.target.ids", _I32)
            step.target_logprobs = _tensor(ms.target, "logprobs", f"{f}.target.logprobs", _F32)
        steps.append(step)
    return Trace(
        request_id=m.request_id,
        tokens=_tensor(m, "tokens", "tokens", _I32),
        prompt_len=m.prompt_len,
        aux_hidden=_tensor(m, "aux_hidden", "aux_hidden", HIDDEN_DTYPES),
        target_ids=_tensor(m.target, "ids", "target.ids", _I32),
        target_logprobs=_tensor(m.target, "logprobs", "target.logprobs", _F32),
        steps=steps,
        draft_version=m.draft_version,
        domain=m.domain,
        start_unix_s=m.timing.start_unix_s,
        end_unix_s=m.timing.end_unix_s,
        target_forwards=m.timing.target_forwards,
    )


def decode(payload: bytes) -> Trace:
    m = pb.RequestTrace()
    try:
        m.ParseFromString(payload)
    except DecodeError as e:
        raise TraceError("payload", f"not a serialized RequestTrace ({e})") from None
    return from_proto(m)


# ---------------------------------------------------------------- chunking


def chunks(request_id: str, payload: bytes, max_chunk_bytes: int) -> Iterator[pb.TraceChunk]:
    """Split a serialized trace into TraceChunks of at most `max_chunk_bytes` payload each."""
    if max_chunk_bytes <= 0:
        raise ValueError("max_chunk_bytes must be positive")
    count = max(1, -(-len(payload) // max_chunk_bytes))
    view = memoryview(payload)
    for i in range(count):
        part = view[i * max_chunk_bytes:(i + 1) * max_chunk_bytes]
        yield pb.TraceChunk(request_id=request_id, chunk_index=i, chunk_count=count,
                            payload=part.tobytes() if count > 1 else payload)


class Reassembler:
    """Joins the chunks of traces arriving on one stream (requests may interleave).

    Bounded: at most `max_pending` partial traces and `max_trace_bytes` per trace, so a
    misbehaving client cannot grow server memory without limit.
    """

    def __init__(self, max_trace_bytes: int, max_pending: int = 16):
        self.max_trace_bytes = max_trace_bytes
        self.max_pending = max_pending
        self._open: dict[str, tuple[int, list[bytes], int]] = {}  # rid -> (count, parts, size)
        self._failed: dict[str, int] = {}  # rid -> chunk_count of a trace rejected part-way

    def add(self, c: pb.TraceChunk) -> bytes | None:
        """Returns the whole payload once its last chunk arrived, else None.

        Raises TraceError (bad framing) or OversizeError (over a size limit); either way the
        partial trace is dropped so the stream can continue with the next one.
        """
        rid = c.request_id
        if not rid:
            raise TraceError("chunk.request_id", "empty")
        if rid in self._failed:  # rest of a trace already answered with an error: skip quietly
            if c.chunk_index != 0:
                if c.chunk_index + 1 >= self._failed[rid]:
                    del self._failed[rid]
                return None
            del self._failed[rid]  # index 0 again: the client starts over
        count, parts, size = self._open.pop(rid, (c.chunk_count, [], 0))
        try:
            if c.chunk_count != count or count == 0:
                raise TraceError("chunk.chunk_count", f"request {rid!r}: {c.chunk_count}, expected {count or '>= 1'}")
            if c.chunk_index != len(parts):
                raise TraceError("chunk.chunk_index",
                                 f"request {rid!r}: got chunk {c.chunk_index}, expected {len(parts)}")
            size += len(c.payload)
            if size > self.max_trace_bytes:
                raise OversizeError("payload", f"request {rid!r} exceeds max_trace_bytes={self.max_trace_bytes}")
            if len(self._open) >= self.max_pending and count > 1:
                raise OversizeError("chunk", f"more than {self.max_pending} partial traces open on this stream")
        except TraceError:
            if c.chunk_index + 1 < c.chunk_count:
                self._failed[rid] = c.chunk_count
            raise
        if count == 1:
            return c.payload
        parts.append(c.payload)
        if len(parts) == count:
            return b"".join(parts)
        self._open[rid] = (count, parts, size)
        return None

    @property
    def pending(self) -> list[str]:
        return list(self._open)


class OversizeError(TraceError):
    """A trace exceeds a configured size limit (answered RESOURCE_EXHAUSTED)."""
