"""numpy <-> wire `Tensor` conversion with explicit dtype and shape (bf16 via ml_dtypes).

Decoding never trusts the byte count: dtype and shape are read from the message and the
payload length must agree, otherwise a TraceError names the field.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from bridge.proto import aurora_pb2 as pb

BF16 = np.dtype(ml_dtypes.bfloat16)

_TO_WIRE = {
    np.dtype(np.float32): pb.F32,
    np.dtype(np.float16): pb.F16,
    BF16: pb.BF16,
    np.dtype(np.int32): pb.I32,
    np.dtype(np.int64): pb.I64,
    np.dtype(np.bool_): pb.BOOL,
    np.dtype(np.uint8): pb.U8,
}
_FROM_WIRE = {v: k.newbyteorder("<") if k.itemsize > 1 else k for k, v in _TO_WIRE.items()}
DTYPE_NAMES = {pb.F32: "float32", pb.F16: "float16", pb.BF16: "bfloat16", pb.I32: "int32",
               pb.I64: "int64", pb.BOOL: "bool", pb.U8: "uint8"}


class TraceError(ValueError):
    """A trace field is malformed. `field` is a path such as 'steps[2].parents'."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class OversizeError(TraceError):
    """A trace exceeds a configured size limit (answered RESOURCE_EXHAUSTED)."""


def wire_header(array: np.ndarray) -> tuple[pb.Tensor, np.ndarray]:
    """(Tensor with dtype and shape but no data, the array as contiguous little-endian)."""
    a = np.asarray(array)
    code = _TO_WIRE.get(a.dtype.newbyteorder("=") if a.dtype.byteorder == ">" else a.dtype)
    if code is None:
        raise TypeError(f"dtype {a.dtype} has no wire encoding (supported: {', '.join(DTYPE_NAMES.values())})")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=code, shape=a.shape), np.ascontiguousarray(a)


def to_wire(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Fill (or create) a wire Tensor from a numpy array."""
    header, a = wire_header(array)
    t = out if out is not None else pb.Tensor()
    t.dtype = header.dtype
    t.shape[:] = header.shape
    t.data = a.tobytes()
    return t


MAX_DIMS, MAX_DIM = 8, 2**31 - 1  # any trace tensor fits; past them numpy cannot even build the view


def from_wire(t: pb.Tensor, data: bytes | memoryview | None = None, *, field: str) -> np.ndarray:
    """Decode a wire Tensor, checking dtype, shape and byte count. Read-only view of the bytes.

    `data` overrides `t.data` (zero-copy decoding passes a view of the received payload).
    """
    dtype = _FROM_WIRE.get(t.dtype)
    if dtype is None:
        raise TraceError(field, f"unknown or unspecified dtype code {t.dtype}")
    shape = tuple(t.shape)
    if len(shape) > MAX_DIMS:
        raise TraceError(field, f"{len(shape)} dimensions, at most {MAX_DIMS}")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise TraceError(field, f"dimension outside [0, {MAX_DIM}] in shape {list(shape)}")
    n = math.prod(shape)
    expected = n * dtype.itemsize
    data = t.data if data is None else data
    if len(data) != expected:
        raise TraceError(
            field, f"data has {len(data)} bytes, expected {expected} for {DTYPE_NAMES[t.dtype]}{list(shape)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def wire_dtype_name(t: pb.Tensor) -> str:
    return DTYPE_NAMES.get(t.dtype, f"<unknown dtype {t.dtype}>")
