"""RequestTrace as numpy dataclasses, its protobuf encoding, and chunking for transport.

Both tiers speak this: the serving tier builds `Trace` objects and encodes them, the trainer
decodes them. Decoding checks that every tensor is present with its contract dtype and names
the field when it is not; semantic checks (shapes agree, vocab bounds, finiteness) live in
`aurora_jax.validate` because they depend on the trainer's limits.
"""

from __future__ import annotations

import dataclasses
import numpy as np
from google.protobuf.message import DecodeError

from bridge import wire
from bridge.proto import aurora_pb2 as pb
from bridge.tensors import BF16, TraceError, from_wire, to_wire, wire_dtype_name, wire_header

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
    """One served request (docs/design.md section 3)."""

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


def to_proto(trace: Trace, with_aux: bool = True) -> pb.RequestTrace:
    m = pb.RequestTrace(request_id=trace.request_id, draft_version=trace.draft_version,
                        domain=trace.domain, prompt_len=trace.prompt_len)
    m.timing.start_unix_s = trace.start_unix_s
    m.timing.end_unix_s = trace.end_unix_s
    m.timing.target_forwards = trace.target_forwards
    to_wire(np.asarray(trace.tokens, np.int32), m.tokens)
    if with_aux:
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


def encode_parts(trace: Trace) -> list:
    """The serialized RequestTrace as buffers to concatenate; the last one is the hidden-state
    array's own memory (no copy). Field order differs from SerializeToString, which protobuf
    parsers accept: fields may appear in any order."""
    header, aux = wire_header(trace.aux_hidden)
    header = header.SerializeToString()
    data_key = wire.key(_DATA_FIELD) + wire.varint(aux.nbytes)
    tensor_len = len(header) + len(data_key) + aux.nbytes
    return [to_proto(trace, with_aux=False).SerializeToString(),
            wire.key(_AUX_FIELD) + wire.varint(tensor_len) + header + data_key,
            aux.reshape(-1).view(np.uint8)]


def encode(trace: Trace) -> bytes:
    return b"".join(encode_parts(trace))


def _tensor(msg, name: str, field: str, dtypes: tuple[np.dtype, ...], data=None) -> np.ndarray:
    if not msg.HasField(name):
        raise TraceError(field, "missing")
    t = getattr(msg, name)
    a = from_wire(t, data, field=field)
    if a.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TraceError(field, f"dtype {wire_dtype_name(t)} not allowed, expected {want}")
    return a


_I32, _F32, _BOOL = (np.dtype("<i4"),), (np.dtype("<f4"),), (np.dtype(np.bool_),)


def from_proto(m: pb.RequestTrace, aux_data=None) -> Trace:
    """Decode a RequestTrace message, checking presence and dtype of every tensor.

    `aux_data`: the hidden states' bytes when the caller split them off the message.
    """
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
        aux_hidden=_tensor(m, "aux_hidden", "aux_hidden", HIDDEN_DTYPES, data=aux_data),
        target_ids=_tensor(m.target, "ids", "target.ids", _I32),
        target_logprobs=_tensor(m.target, "logprobs", "target.logprobs", _F32),
        steps=steps,
        draft_version=m.draft_version,
        domain=m.domain,
        start_unix_s=m.timing.start_unix_s,
        end_unix_s=m.timing.end_unix_s,
        target_forwards=m.timing.target_forwards,
    )


def decode(payload) -> Trace:
    """Parse a serialized RequestTrace (bytes-like). `aux_hidden` (nearly all the bytes) is a
    zero-copy read-only view into `payload`; protobuf parses only the small remainder."""
    view = memoryview(payload)
    try:
        split = wire.split_field(view, _AUX_FIELD)
        inner = split and wire.split_field(view, _DATA_FIELD, *split[1])
        if not inner:  # no or repeated field: let protobuf parse (and merge) the whole message
            return from_proto(pb.RequestTrace.FromString(view))
        m = pb.RequestTrace.FromString(split[0])
        m.aux_hidden.SetInParent()
        m.aux_hidden.ParseFromString(inner[0])  # dtype and shape; the data stays in `payload`
    except (DecodeError, wire.WireError) as e:
        raise TraceError("payload", f"not a serialized RequestTrace ({e})") from None
    lo, hi = inner[1]
    return from_proto(m, aux_data=view[lo:hi].toreadonly())


# Field numbers from aurora.proto that the hand-framed paths rely on.
_AUX_FIELD = pb.RequestTrace.DESCRIPTOR.fields_by_name["aux_hidden"].number
_DATA_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


def cut_steps(steps: list[TreeStep], L: int) -> list[TreeStep]:
    """The steps of a trace whose trunk was cut to L tokens (EOS, max_tokens, or a serving tier that
    lacks features for the last tokens): accepted nodes past the end go, with their subtrees."""
    return [c for c in (_cut_step(s, L) for s in steps if s.trunk_pos < L) if len(c.tokens)]


def _cut_step(s: TreeStep, L: int) -> TreeStep:
    n = len(s.tokens)
    depth = np.zeros(n, int)
    for k in range(n):
        depth[k] = 1 if s.parents[k] < 0 else depth[s.parents[k]] + 1
    drop = np.zeros(n, bool)
    for k in range(n):
        drop[k] = (s.accepted[k] and s.trunk_pos + depth[k] >= L) or (s.parents[k] >= 0 and drop[s.parents[k]])
    if not drop.any():
        return s
    keep = np.nonzero(~drop)[0]
    remap = {int(o): i for i, o in enumerate(keep)}
    parents = np.asarray([remap.get(int(s.parents[k]), -1) if s.parents[k] >= 0 else -1 for k in keep], np.int32)
    rows = {int(m): r for r, m in enumerate(s.target_nodes)}
    tn = [k for k in keep if int(k) in rows]
    return TreeStep(s.trunk_pos, s.tokens[keep], parents, s.accepted[keep],
                    np.asarray([remap[int(k)] for k in tn], np.int32),
                    s.target_ids[[rows[int(k)] for k in tn]], s.target_logprobs[[rows[int(k)] for k in tn]])
