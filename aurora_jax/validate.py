"""Semantic validation of decoded traces against the trainer's limits.

Everything a bad client could send wrong is checked here before a trace reaches the spool,
so the train loop can trust its inputs. Errors are TraceErrors naming the field path.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bridge.tensors import BF16, TraceError
from bridge.traces import Trace


@dataclasses.dataclass
class TraceLimits:
    """What the ingest endpoint accepts. `vocab_size` is the target's vocabulary V."""

    vocab_size: int = 32000
    target_hidden_size: int = 0  # Ht; aux_hidden must be [T, 3*Ht]. 0 = any multiple of 3.
    max_tokens: int = 8192
    max_topk: int = 64
    max_steps: int = 4096
    max_tree_nodes: int = 256
    max_trace_bytes: int = 256 << 20
    max_chunk_bytes: int = 2 << 20

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "target_hidden_size" and getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be positive")


# A 16-bit float is non-finite when all its exponent bits are set, i.e. when its magnitude
# bits (sign cleared) are at least the exponent mask: one integer AND + max per block.
_EXP_MASK = {np.dtype(np.float16): 0x7C00, BF16: 0x7F80}
_BLOCK = 1 << 18  # elements per block: keeps the temporary in cache


def first_nonfinite(a: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN/Inf in a float array, or None."""
    mask = _EXP_MASK.get(a.dtype)
    flat = a.reshape(-1)
    if mask is None or flat.size <= _BLOCK:
        ok = np.isfinite(flat)
        hit = -1 if ok.all() else int(np.argmin(ok))
    else:
        u, tmp, hit = flat.view(np.uint16), np.empty(_BLOCK, np.uint16), -1
        for lo in range(0, u.size, _BLOCK):
            t = np.bitwise_and(u[lo:lo + _BLOCK], 0x7FFF, out=tmp[:min(_BLOCK, u.size - lo)])
            if t.max() >= mask:
                hit = lo + int(np.argmax(t >= mask))
                break
    return None if hit < 0 else tuple(int(i) for i in np.unravel_index(hit, a.shape))


def _finite(a: np.ndarray, field: str) -> None:
    idx = first_nonfinite(a)
    if idx is not None:
        raise TraceError(field, f"non-finite value {a[idx]} at index {list(idx)}")


def _ids(a: np.ndarray, field: str, vocab: int) -> None:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab):
        bad = int(np.argmax((a < 0) | (a >= vocab)))
        idx = [int(i) for i in np.unravel_index(bad, a.shape)]
        raise TraceError(field, f"token id {int(a.reshape(-1)[bad])} at index {idx} outside [0, {vocab})")


def _shape(a: np.ndarray, field: str, expected: tuple) -> None:
    if a.ndim != len(expected) or any(e is not None and s != e for s, e in zip(a.shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise TraceError(field, f"shape {list(a.shape)} does not match expected {want}")


def _topk(ids: np.ndarray, logprobs: np.ndarray, field: str, rows: int, lim: TraceLimits) -> None:
    _shape(ids, f"{field}.ids", (rows, None))
    k = ids.shape[1]
    if not 1 <= k <= lim.max_topk:
        raise TraceError(f"{field}.ids", f"k={k} outside [1, max_topk={lim.max_topk}]")
    _ids(ids, f"{field}.ids", lim.vocab_size)
    _shape(logprobs, f"{field}.logprobs", ids.shape)
    _finite(logprobs, f"{field}.logprobs")
    if logprobs.size and float(logprobs.max()) > 1e-3:
        raise TraceError(f"{field}.logprobs", f"log-probability {float(logprobs.max())} > 0")


def validate(trace: Trace, lim: TraceLimits) -> None:
    """Raise TraceError naming the first bad field; return None when the trace is sound."""
    if not trace.request_id or len(trace.request_id) > 256:
        raise TraceError("request_id", "must be 1..256 characters")
    if trace.draft_version < 0:
        raise TraceError("draft_version", f"{trace.draft_version} < 0")
    for name in ("start_unix_s", "end_unix_s"):
        if not np.isfinite(getattr(trace, name)):
            raise TraceError(f"timing.{name}", "not finite")

    toks = trace.tokens
    if toks.ndim != 1:
        raise TraceError("tokens", f"must be 1-D, got shape {list(toks.shape)}")
    T = toks.shape[0]
    if not 1 <= T <= lim.max_tokens:
        raise TraceError("tokens", f"length {T} outside [1, max_tokens={lim.max_tokens}]")
    _ids(toks, "tokens", lim.vocab_size)
    if not 1 <= trace.prompt_len <= T:
        raise TraceError("prompt_len", f"{trace.prompt_len} outside [1, {T}] (T = len(tokens))")

    hid = trace.aux_hidden
    width = 3 * lim.target_hidden_size if lim.target_hidden_size else None
    _shape(hid, "aux_hidden", (T, width))
    if hid.shape[1] == 0 or hid.shape[1] % 3:
        raise TraceError("aux_hidden", f"width {hid.shape[1]} is not 3 * target hidden size")
    _finite(hid, "aux_hidden")
    _topk(trace.target_ids, trace.target_logprobs, "target", T, lim)

    if len(trace.steps) > lim.max_steps:
        raise TraceError("steps", f"{len(trace.steps)} steps > max_steps={lim.max_steps}")
    for i, s in enumerate(trace.steps):
        _validate_step(s, f"steps[{i}]", toks, lim)


def _validate_step(s, f: str, trunk: np.ndarray, lim: TraceLimits) -> None:
    T = trunk.shape[0]
    if not 0 <= s.trunk_pos < T:
        raise TraceError(f"{f}.trunk_pos", f"{s.trunk_pos} outside [0, {T})")
    if s.tokens.ndim != 1 or not 1 <= s.tokens.shape[0] <= lim.max_tree_nodes:
        raise TraceError(f"{f}.tokens", f"shape {list(s.tokens.shape)}: need 1..{lim.max_tree_nodes} nodes")
    n = s.tokens.shape[0]
    _ids(s.tokens, f"{f}.tokens", lim.vocab_size)
    _shape(s.parents, f"{f}.parents", (n,))
    _shape(s.accepted, f"{f}.accepted", (n,))
    par = s.parents.astype(np.int64)
    bad = np.nonzero((par < -1) | (par >= np.arange(n)))[0]
    if bad.size:
        j = int(bad[0])
        raise TraceError(f"{f}.parents", f"node {j} has parent {int(par[j])}; a parent must be -1 or an earlier node")
    # The accepted nodes must be one path from the trunk, and agree with the emitted tokens.
    prev = -1
    for d, j in enumerate(np.nonzero(s.accepted)[0], start=1):
        if par[j] != prev:
            raise TraceError(f"{f}.accepted", f"accepted node {int(j)} does not continue the accepted path")
        pos = s.trunk_pos + d
        if pos >= T or s.tokens[j] != trunk[pos]:
            raise TraceError(f"{f}.accepted",
                             f"accepted node {int(j)} (token {int(s.tokens[j])}) does not match tokens[{pos}]")
        prev = int(j)
    if s.target_ids is not None:
        nodes = s.target_nodes
        if nodes.ndim != 1 or nodes.size > n or (nodes.size and (nodes[0] < 0 or nodes[-1] >= n)) \
                or np.any(np.diff(nodes) <= 0):
            raise TraceError(f"{f}.target_nodes", "must be strictly increasing node indices in [0, n)")
        _topk(s.target_ids, s.target_logprobs, f"{f}.target", nodes.shape[0], lim)
