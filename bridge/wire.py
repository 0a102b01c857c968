"""Protobuf wire-format primitives for the two hot paths that bypass full (de)serialization.

Large traces are almost entirely one bytes field (the aux hidden states). Building and
splitting messages around that field by hand lets both tiers move it with one memcpy
instead of the four or five that SerializeToString/ParseFromString plus chunking would make.
Everything else is still (de)serialized by protobuf itself.
"""

from __future__ import annotations

LEN = 2  # wire type of length-delimited fields (bytes, strings, messages)


class WireError(ValueError):
    pass


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wire_type: int = LEN) -> bytes:
    return varint(field << 3 | wire_type)


def read_varint(buf, i: int, end: int) -> tuple[int, int]:
    shift = result = 0
    while i < end and shift < 64:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    raise WireError("truncated or overlong varint")


def fields(buf, i: int = 0, end: int | None = None):
    """Yield (field number, field start, value start, value end) for each field at one level."""
    end = len(buf) if end is None else end
    while i < end:
        start = i
        tag, i = read_varint(buf, i, end)
        kind = tag & 7
        if kind == 0:
            _, j = read_varint(buf, i, end)
        elif kind == 1:
            j = i + 8
        elif kind == 5:
            j = i + 4
        elif kind == LEN:
            n, i = read_varint(buf, i, end)
            j = i + n
        else:
            raise WireError(f"unsupported wire type {kind}")
        if j > end:
            raise WireError("field runs past the end of the message")
        yield tag >> 3, start, i, j
        i = j


def split_field(buf, field: int, i: int = 0, end: int | None = None):
    """(the other fields' bytes joined, (value start, value end)) when `field` occurs exactly once.

    Returns None otherwise (absent, or repeated: protobuf merges repeats, so callers fall back
    to the real parser rather than guess).
    """
    end = len(buf) if end is None else end
    found, others = [], []
    for f, s, v, e in fields(buf, i, end):
        (found if f == field else others).append((s, v, e))
    if len(found) != 1:
        return None
    return b"".join(buf[s:e] for s, _, e in others), found[0][1:]


def parse_framed(msg, message_cls, field: int):
    """A serialized message whose bytes `field` was framed by hand (`bridge.chunks`, `bridge.weights`):
    (the message without that field, parsed by protobuf; a zero-copy view of the field's bytes).
    Raises protobuf's DecodeError or WireError on bytes that are not such a message."""
    view = memoryview(msg)
    split = split_field(view, field)
    if split is None:
        m = message_cls.FromString(view)
        return m, memoryview(getattr(m, message_cls.DESCRIPTOR.fields_by_number[field].name))
    head, (lo, hi) = split
    return message_cls.FromString(head), view[lo:hi]
