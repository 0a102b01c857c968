"""A published draft version on the wire: manifest + concatenated tensor bytes, in digested chunks.

Shared by the trainer's WeightSync server (packs) and the serving tier's subscriber (assembles).
A version is only handed on once every chunk's xxh3-64 and the version digest agree, so a corrupted
or truncated transfer never reaches the engine: the previous version keeps serving.

Why it is built this way (an 8B-class draft is 0.85 GB a version, `aurora-jax bench bridge`): each
byte is copied once on each side and hashed once, as it streams. The trainer's kernels ([in, out])
travel as they are, marked `transposed`, instead of being made contiguous in torch's [out, in] first;
chunks are framed by hand around their data (as trace chunks are, `bridge.chunks`); the digest is
xxh3 (integrity against corruption, ~10x sha256 on one core) per chunk, and the version's is taken
over the chunk digests, so it goes out in the last chunk instead of costing a pass before the first.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import xxhash

from bridge import wire
from bridge.chunks import cut
from bridge.proto import aurora_pb2 as pb
from bridge.tensors import _FROM_WIRE, wire_header

SERVICE = "aurora.v1.WeightSync"
SUBSCRIBE_METHOD = f"/{SERVICE}/Subscribe"
_DATA = pb.WeightChunk.DESCRIPTOR.fields_by_name["data"].number


class WeightError(ValueError):
    """A version that cannot be accepted; says which version and chunk, and why."""


def _wire_bytes(a: np.ndarray) -> tuple[pb.WeightTensor, np.ndarray]:
    """(manifest entry, array whose row-major bytes travel): a transposed view of a contiguous 2-D
    array (a trainer's kernel in torch layout) goes as its transpose's bytes, with no copy."""
    transposed = a.ndim == 2 and not a.flags.c_contiguous and a.T.flags.c_contiguous
    header, arr = wire_header(a.T if transposed else a)
    return pb.WeightTensor(dtype=header.dtype, shape=list(a.shape), transposed=transposed), arr


def version_digest(chunk_digests: list[int]) -> bytes:
    return xxhash.xxh3_128_digest(np.asarray(chunk_digests, "<u8").tobytes())


def pack_version(version: int, sd: dict[str, np.ndarray], max_chunk: int = 2 << 20,
                 draft_config: dict | None = None) -> list[bytes]:
    """Serialize {name: array} (torch layout) as WeightChunk messages (serialized, ready to send) of at
    most `max_chunk` data bytes; `draft_config` (the config.json dict) rides in chunk 0 so receivers
    can check they run the same draft."""
    manifest, views = [], []
    for name, a in sd.items():
        t, arr = _wire_bytes(np.asarray(a))
        t.name = name
        manifest.append(t)
        views.append(memoryview(arr.reshape(-1).view(np.uint8)))  # raw bytes (works for bf16 too)
    total, runs = cut(views, max_chunk)
    count, chunks, digests = len(runs), [], []
    for i, pieces in enumerate(runs):
        hasher = xxhash.xxh3_64()
        for piece in pieces:
            hasher.update(piece)
        digests.append(hasher.intdigest())
        head = pb.WeightChunk(version=version, index=i, count=count, total_bytes=total, offset=i * max_chunk,
                              xxh64=digests[-1])
        if i == 0:
            head.tensors.extend(manifest)
            if draft_config is not None:
                head.draft_config = json.dumps(draft_config)
        if i == count - 1:
            head.digest = version_digest(digests)
        size = sum(len(p) for p in pieces)  # the one copy of the data: into the message
        chunks.append(b"".join((head.SerializeToString(), wire.key(_DATA), wire.varint(size), *pieces)))
    return chunks


def parse_chunk(msg) -> tuple[pb.WeightChunk, memoryview]:
    """Header fields (parsed by protobuf) and a zero-copy view of the data of one serialized chunk."""
    try:
        return wire.parse_framed(msg, pb.WeightChunk, _DATA)
    except Exception as e:  # DecodeError or WireError
        raise WeightError(f"not a serialized WeightChunk ({e})") from None


class VersionAssembler:
    """Feed serialized chunks in order; `add` returns (version, {name: array}, config.json dict or None)
    when a version is complete. Arrays are views of one buffer (a `transposed` tensor a transposed view)."""

    def __init__(self, max_bytes: int = 8 << 30):
        self.max_bytes = max_bytes
        self._spare: bytearray | None = None  # the last version's buffer, reused once nothing views it
        self._reset()

    def _buffer(self, size: int) -> bytearray:
        """A buffer for the next version. Faulting in fresh pages costs more than the copy itself
        (0.5 s per 0.85 GB here), so the previous version's buffer is reused when it has the same
        size and no array views it any more (the engine copies a version into its draft when it
        swaps; a version still waiting in its mailbox, or held by anyone, keeps its buffer)."""
        spare, self._spare = self._spare, None
        # references: `spare` and getrefcount's argument; every array view holds one more
        if spare is not None and len(spare) == size and sys.getrefcount(spare) == 2:
            return spare
        return bytearray(size)

    def _reset(self):
        self._head: pb.WeightChunk | None = None
        self._buf: bytearray | None = None
        self._next = 0
        self._digests: list[int] = []

    def add(self, msg):
        c, data = parse_chunk(msg)
        where = f"weight version {c.version} chunk {c.index}/{c.count}"
        try:
            if c.index == 0:
                if c.total_bytes > self.max_bytes:
                    raise WeightError(f"{where}: {c.total_bytes} bytes exceeds the limit {self.max_bytes}")
                self._reset()
                self._head, self._buf = c, self._buffer(c.total_bytes)
            elif self._head is None or c.version != self._head.version or c.index != self._next:
                raise WeightError(f"{where}: out of sequence (expected chunk {self._next} of version "
                                  f"{self._head.version if self._head else '?'})")
            digest = xxhash.xxh3_64_intdigest(data)
            if digest != c.xxh64:
                raise WeightError(f"{where}: xxh3-64 mismatch (corrupted in transit)")
            if c.offset + len(data) > len(self._buf):
                raise WeightError(f"{where}: data [{c.offset}, {c.offset + len(data)}) outside {len(self._buf)} bytes")
            self._buf[c.offset:c.offset + len(data)] = data
            self._digests.append(digest)
            self._next += 1
            if self._next < self._head.count:
                return None
            return self._finish(c.digest)
        except WeightError:
            self._reset()
            raise

    def _finish(self, digest: bytes):
        head, buf, digests = self._head, self._buf, self._digests
        self._reset()
        if version_digest(digests) != digest:
            raise WeightError(f"weight version {head.version}: the version digest over its {len(digests)} chunks "
                              f"does not match (a chunk missing, repeated or replaced)")
        out, off = {}, 0
        for t in head.tensors:
            dtype = _FROM_WIRE.get(t.dtype)
            if dtype is None:
                raise WeightError(f"weight version {head.version}: tensor {t.name!r} has unknown dtype code {t.dtype}")
            if t.transposed and len(t.shape) != 2:
                raise WeightError(f"weight version {head.version}: tensor {t.name!r} is marked transposed but has "
                                  f"shape {list(t.shape)} (2-D only)")
            n = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
            if off + n > len(buf):
                raise WeightError(f"weight version {head.version}: manifest exceeds the data at tensor {t.name!r}")
            a = np.frombuffer(buf, dtype, count=n // dtype.itemsize, offset=off)
            out[t.name] = a.reshape(tuple(t.shape)[::-1]).T if t.transposed else a.reshape(tuple(t.shape))
            off += n
        if off != len(buf):
            raise WeightError(f"weight version {head.version}: {len(buf) - off} bytes beyond the manifest")
        try:
            config = json.loads(head.draft_config) if head.draft_config else None
        except json.JSONDecodeError as e:
            raise WeightError(f"weight version {head.version}: draft_config is not JSON ({e})") from None
        self._spare = buf
        return head.version, out, config
