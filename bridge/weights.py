"""A published draft version on the wire: manifest + concatenated tensor bytes, in checksummed chunks.

Shared by the trainer's WeightSync server (packs) and the serving tier's subscriber (assembles).
A version is only handed on once every chunk's crc32 and the whole version's sha256 agree, so a
corrupted or truncated transfer never reaches the engine: the previous version keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np

from bridge.proto import aurora_pb2 as pb
from bridge.tensors import _FROM_WIRE, wire_header

SERVICE = "aurora.v1.WeightSync"
SUBSCRIBE_METHOD = f"/{SERVICE}/Subscribe"


class WeightError(ValueError):
    """A version that cannot be accepted; says which version and chunk, and why."""


def pack_version(version: int, sd: dict[str, np.ndarray], max_chunk: int = 2 << 20,
                 draft_config: dict | None = None) -> list[pb.WeightChunk]:
    """Serialize {name: array} (torch layout) as chunks of at most `max_chunk` data bytes;
    `draft_config` (the config.json dict) rides in chunk 0 so receivers can check they run the same draft."""
    manifest, parts = [], []
    for name, a in sd.items():
        header, arr = wire_header(np.ascontiguousarray(a))
        manifest.append(pb.WeightTensor(name=name, dtype=header.dtype, shape=list(arr.shape)))
        parts.append(arr.reshape(-1).view(np.uint8))  # raw bytes (works for bf16 too)
    blob = b"".join(parts)
    digest = hashlib.sha256(blob).digest()
    count = max(1, -(-len(blob) // max_chunk))
    view = memoryview(blob)
    chunks = []
    for i in range(count):
        data = view[i * max_chunk:(i + 1) * max_chunk]
        c = pb.WeightChunk(version=version, index=i, count=count, total_bytes=len(blob), offset=i * max_chunk,
                           data=bytes(data), crc32=zlib.crc32(data))
        if i == 0:
            c.tensors.extend(manifest)
            c.sha256 = digest
            if draft_config is not None:
                c.draft_config = json.dumps(draft_config)
        chunks.append(c)
    return chunks


class VersionAssembler:
    """Feed chunks in order; `add` returns (version, {name: array}, config.json dict or None) when a
    version is complete."""

    def __init__(self, max_bytes: int = 8 << 30):
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self):
        self._head: pb.WeightChunk | None = None
        self._buf: bytearray | None = None
        self._next = 0

    def add(self, c: pb.WeightChunk):
        where = f"weight version {c.version} chunk {c.index}/{c.count}"
        try:
            if c.index == 0:
                if c.total_bytes > self.max_bytes:
                    raise WeightError(f"{where}: {c.total_bytes} bytes exceeds the limit {self.max_bytes}")
                self._head, self._buf, self._next = c, bytearray(c.total_bytes), 0
            elif self._head is None or c.version != self._head.version or c.index != self._next:
                raise WeightError(f"{where}: out of sequence (expected chunk {self._next} of version "
                                  f"{self._head.version if self._head else '?'})")
            if zlib.crc32(c.data) != c.crc32:
                raise WeightError(f"{where}: crc32 mismatch (corrupted in transit)")
            if c.offset + len(c.data) > len(self._buf):
                raise WeightError(f"{where}: data [{c.offset}, {c.offset + len(c.data)}) outside {len(self._buf)} bytes")
            self._buf[c.offset:c.offset + len(c.data)] = c.data
            self._next += 1
            if self._next < self._head.count:
                return None
            return self._finish()
        except WeightError:
            self._reset()
            raise

    def _finish(self):
        head, buf = self._head, self._buf
        self._reset()
        if hashlib.sha256(buf).digest() != head.sha256:
            raise WeightError(f"weight version {head.version}: sha256 of the assembled {len(buf)} bytes does not match")
        out, off = {}, 0
        for t in head.tensors:
            dtype = _FROM_WIRE.get(t.dtype)
            if dtype is None:
                raise WeightError(f"weight version {head.version}: tensor {t.name!r} has unknown dtype code {t.dtype}")
            n = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
            if off + n > len(buf):
                raise WeightError(f"weight version {head.version}: manifest exceeds the data at tensor {t.name!r}")
            out[t.name] = np.frombuffer(buf, dtype, count=n // dtype.itemsize, offset=off).reshape(tuple(t.shape))
            off += n
        if off != len(buf):
            raise WeightError(f"weight version {head.version}: {len(buf) - off} bytes beyond the manifest")
        try:
            config = json.loads(head.draft_config) if head.draft_config else None
        except json.JSONDecodeError as e:
            raise WeightError(f"weight version {head.version}: draft_config is not JSON ({e})") from None
        return head.version, out, config
