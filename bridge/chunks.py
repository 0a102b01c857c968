"""Chunked transport of serialized traces: framing on the client, in-place assembly on the server.

A trace of any size crosses gRPC as TraceChunk messages of at most `max_chunk_bytes` payload.
Chunk messages are framed by hand from the trace's encoded parts (see `traces.encode_parts`),
so the hidden states go from the caller's array into the outgoing message in one copy; the
server copies each chunk's payload once into a buffer of the announced `total_bytes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from bridge import wire
from bridge.proto import aurora_pb2 as pb
from bridge.tensors import OversizeError, TraceError

SERVICE = pb.DESCRIPTOR.services_by_name["TraceIngest"].full_name
PUSH_METHOD = f"/{SERVICE}/Push"  # called with raw bytes: requests are pre-framed TraceChunks
FRAME_SLACK = 64 << 10  # room for the TraceChunk fields around a payload of max_chunk_bytes


def max_message_bytes(max_chunk_bytes: int) -> int:
    """The gRPC message limit both ends must allow for chunks of `max_chunk_bytes` payload."""
    return max_chunk_bytes + FRAME_SLACK
_PAYLOAD = pb.TraceChunk.DESCRIPTOR.fields_by_name["payload"].number


def cut(parts: Sequence, max_bytes: int) -> tuple[int, list[list[memoryview]]]:
    """The concatenation of `parts` (bytes-like) cut into consecutive runs of at most `max_bytes`:
    (total bytes, the runs as zero-copy views of the parts each spans; one empty run for no bytes)."""
    if max_bytes <= 0:
        raise ValueError("max_chunk_bytes must be positive")
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    runs, k = [], 0  # k: the current part
    for i in range(max(1, -(-total // max_bytes))):
        want, pieces = min(max_bytes, total - i * max_bytes), []
        while want:
            take = views[k][:want]
            pieces.append(take)
            want -= len(take)
            views[k] = views[k][len(take):]
            if not views[k]:
                k += 1
        runs.append(pieces)
    return total, runs


def chunk_messages(request_id: str, parts: Sequence, max_chunk_bytes: int) -> Iterator[bytes]:
    """Serialized TraceChunk messages carrying the concatenation of `parts` (bytes-like)."""
    total, runs = cut(parts, max_chunk_bytes)
    for i, pieces in enumerate(runs):
        head = pb.TraceChunk(request_id=request_id, chunk_index=i, chunk_count=len(runs), total_bytes=total)
        yield b"".join((head.SerializeToString(), wire.key(_PAYLOAD), wire.varint(sum(map(len, pieces))), *pieces))


def parse_chunk(msg) -> tuple[pb.TraceChunk, memoryview]:
    """Header fields (parsed by protobuf) and a zero-copy view of the payload of one chunk."""
    try:
        return wire.parse_framed(msg, pb.TraceChunk, _PAYLOAD)
    except Exception as e:  # DecodeError or WireError: either way not a TraceChunk
        raise TraceError("chunk", f"not a serialized TraceChunk ({e})") from None


@dataclasses.dataclass
class _Partial:
    count: int
    total: int
    buf: object  # writable buffer; the payload goes to [offset, offset + total)
    offset: int
    filled: int = 0
    next_index: int = 0


def _bytearray(total: int) -> tuple[bytearray, int]:
    return bytearray(total), 0


class Reassembler:
    """Joins the chunks of traces arriving on one stream (requests may interleave).

    Bounded: at most `max_pending` partial traces of at most `max_trace_bytes` each, checked
    against `total_bytes` before anything is allocated. `allocate(total) -> (buffer, offset)`
    lets the consumer choose where a multi-chunk payload is assembled (the trainer's spool
    assembles in place, in a buffer it can write to disk without another copy).
    """

    def __init__(self, max_trace_bytes: int, max_pending: int = 4, allocate=_bytearray):
        self.max_trace_bytes = max_trace_bytes
        self.max_pending = max_pending
        self.allocate = allocate
        self._open: dict[str, _Partial] = {}
        self._failed: dict[str, int] = {}  # rid -> chunk_count of a trace rejected part-way

    def add(self, c: pb.TraceChunk, payload: memoryview):
        """The whole payload (bytes-like, read-only) once its last chunk arrived, else None.

        Raises TraceError (bad framing) or OversizeError (over a limit); either way the partial
        trace is dropped and its remaining chunks are skipped, so the stream carries on.
        """
        rid = c.request_id
        if not rid:
            raise TraceError("chunk.request_id", "empty")
        if rid in self._failed:  # rest of a trace already answered with an error
            if c.chunk_index != 0:
                if c.chunk_index + 1 >= self._failed[rid]:
                    del self._failed[rid]
                return None
            del self._failed[rid]  # index 0 again: the client starts over
        try:
            return self._add(rid, c, payload)
        except TraceError:
            self._open.pop(rid, None)
            if c.chunk_index + 1 < c.chunk_count:
                self._failed[rid] = c.chunk_count
            raise

    def _add(self, rid: str, c: pb.TraceChunk, payload: memoryview):
        p = self._open.get(rid)
        if p is None:
            if c.chunk_index != 0:
                raise TraceError("chunk.chunk_index", f"request {rid!r}: got chunk {c.chunk_index}, expected 0")
            if c.chunk_count == 0:
                raise TraceError("chunk.chunk_count", f"request {rid!r}: must be >= 1")
            if c.chunk_count == 1:
                if len(payload) > self.max_trace_bytes:
                    raise OversizeError("payload", f"request {rid!r} exceeds max_trace_bytes={self.max_trace_bytes}")
                return payload
            if c.total_bytes == 0:
                raise TraceError("chunk.total_bytes", f"request {rid!r}: required when chunk_count > 1")
            if c.total_bytes > self.max_trace_bytes:
                raise OversizeError("payload", f"request {rid!r} of {c.total_bytes} bytes exceeds "
                                               f"max_trace_bytes={self.max_trace_bytes}")
            if len(self._open) >= self.max_pending:
                raise OversizeError("chunk", f"more than {self.max_pending} partial traces open on this stream")
            p = self._open[rid] = _Partial(c.chunk_count, c.total_bytes, *self.allocate(c.total_bytes))
        if (c.chunk_count, c.total_bytes) != (p.count, p.total):
            raise TraceError("chunk.chunk_count", f"request {rid!r}: chunk_count/total_bytes changed mid-trace")
        if c.chunk_index != p.next_index:
            raise TraceError("chunk.chunk_index", f"request {rid!r}: got chunk {c.chunk_index}, expected {p.next_index}")
        if p.filled + len(payload) > p.total:
            raise TraceError("chunk.payload", f"request {rid!r}: more bytes than total_bytes={p.total}")
        at = p.offset + p.filled
        p.buf[at:at + len(payload)] = payload
        p.filled += len(payload)
        p.next_index += 1
        if p.next_index < p.count:
            return None
        del self._open[rid]
        if p.filled != p.total:
            raise TraceError("chunk.total_bytes", f"request {rid!r}: got {p.filled} bytes, announced {p.total}")
        return memoryview(p.buf)[p.offset:p.offset + p.total].toreadonly()

    @property
    def pending(self) -> list[str]:
        return list(self._open)
