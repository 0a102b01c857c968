"""Pack traces into fixed-shape TTT batches (numpy), so jit compiles a handful of shapes.

Layout (docs/design.md section 4). A row holds one or more requests. The draft runs `depth` TTT
steps; step j computes block j of `L + R` slots:

  block 0, slots [0, L)   trunk: slot for token t (t >= 1) reads token x_t and the target's aux
                          features of position t-1, and is trained on the target's top-k at row t
                          (the distribution of x_{t+1})
  block j, slots [0, L)   TTT chain: the slot aligned with trunk t reads x_{t+j} and the draft's
                          own hidden state from block j-1, trained on target row t+j
  block j, slots [L, L+R) rejected draft nodes at tree depth j, hanging from their parent's slot;
                          trained on the target top-k at the node when the trace carries it

Accepted tree nodes are the chain slots themselves (they reproduce the trunk). Every rejected node
of depth <= `depth` adds a negative term at its parent's slot (`neg_*`). Slot indices in `anc` and
`neg_slot` are global: block * (L + R) + local.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from bridge.tensors import BF16
from bridge.traces import Trace


@dataclasses.dataclass
class BatchConfig:
    rows: int = 8  # B: rows per batch (sharded over the data axis)
    lengths: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512, 1024, 2048])  # L buckets
    branch_slots: list[int] = dataclasses.field(default_factory=lambda: [0, 32, 128, 512])  # R and M buckets
    topk: int = 8  # K: target top-k kept per slot (wider traces are cut, narrower padded)
    pack: bool = True  # several short requests per row

    def __post_init__(self):
        if self.rows <= 0 or self.topk <= 0:
            raise ValueError("rows and topk must be positive")
        if not self.lengths or sorted(self.lengths) != list(self.lengths) or self.lengths[0] <= 0:
            raise ValueError("lengths must be increasing positive bucket sizes")
        if not self.branch_slots or sorted(self.branch_slots) != list(self.branch_slots) or self.branch_slots[0] < 0:
            raise ValueError("branch_slots must be increasing non-negative bucket sizes")


class Batch(NamedTuple):
    aux: np.ndarray  # [B, L, 3Ht] target aux features feeding the trunk slots
    tokens: np.ndarray  # int32 [D, B, N]   (N = L + R)
    positions: np.ndarray  # int32 [D, B, N]
    parent: np.ndarray  # int32 [D, B, N] local index in block j-1 of the slot's hidden input
    seg: np.ndarray  # int32 [D, B, N]
    tpos: np.ndarray  # int32 [D, B, N]
    attach: np.ndarray  # int32 [D, B, N]
    anc: np.ndarray  # int32 [D, B, N, D]
    label_ids: np.ndarray  # int32 [D, B, N, K] draft ids (-1 = none)
    label_lp: np.ndarray  # f32 [D, B, N, K] target log-probabilities
    loss_mask: np.ndarray  # f32 [D, B, N]
    acc_target: np.ndarray  # int32 [D, B, N] draft id of the target's argmax (-1 = outside Vd)
    rejected: np.ndarray  # bool [D, B, N] slot is a rejected draft node
    neg_slot: np.ndarray  # int32 [B, M] global slot whose distribution proposed the rejected token
    neg_tok: np.ndarray  # int32 [B, M] the rejected token (draft id)
    neg_mask: np.ndarray  # f32 [B, M]

    # Leading axes of each field: rows first for these, the TTT depth then rows for the others. The packer
    # cuts slots by it and the trainer shards rows by it (`train._batch_spec`).
    ROWS_FIRST = frozenset({"aux", "neg_slot", "neg_tok", "neg_mask"})

    @classmethod
    def row_axis(cls, name: str) -> int:
        return 0 if name in cls.ROWS_FIRST else 1


@dataclasses.dataclass
class PackStats:
    traces: int = 0
    truncated: int = 0  # traces longer than the largest bucket (cut to it)
    left_over: int = 0  # traces that did not fit in the batch's rows
    dropped_nodes: int = 0  # rejected nodes beyond R / M or without a parent slot
    shape: tuple[int, int, int] = (0, 0, 0)  # the buckets chosen: (L trunk, R rejected slots, M negatives)


def _fields(cfg: BatchConfig, depth: int, L: int, ht3: int) -> dict[str, tuple[tuple, object, object]]:
    """{field: (shape, dtype, empty value)} of a batch in bucket L: the one statement of its layout."""
    D, B, K, M = depth, cfg.rows, cfg.topk, cfg.branch_slots[-1]
    N = L + cfg.branch_slots[-1]
    slots = ((D, B, N), np.int32, -1)
    return dict(aux=((B, L, ht3), BF16, 0), tokens=((D, B, N), np.int32, 0), positions=((D, B, N), np.int32, 0),
                parent=((D, B, N), np.int32, 0), seg=slots, tpos=slots, attach=slots,
                anc=((D, B, N, D), np.int32, -1), label_ids=((D, B, N, K), np.int32, -1),
                label_lp=((D, B, N, K), np.float32, -np.inf), loss_mask=((D, B, N), np.float32, 0),
                acc_target=slots, rejected=((D, B, N), bool, False), neg_slot=((B, M), np.int32, 0),
                neg_tok=((B, M), np.int32, 0), neg_mask=((B, M), np.float32, 0))


def batch_shapes(cfg: BatchConfig, depth: int, ht3: int, length: int | None = None) -> Batch:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of a batch in bucket `length` (default: the largest),
    without building it: for ahead-of-time compiles at a config's shapes."""
    import jax
    fields = _fields(cfg, depth, length or cfg.lengths[-1], ht3)
    return Batch(**{k: jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for k, (shape, dtype, _) in fields.items()})


def _bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


def _labels(ids: np.ndarray, lp: np.ndarray, K: int, target_to_draft: np.ndarray):
    """Top-k rows -> (draft ids [n, K] with -1 padding, logprobs [n, K]) sorted by probability."""
    order = np.argsort(-lp, axis=1, kind="stable")[:, :K]
    ids = np.take_along_axis(ids, order, 1)
    lp = np.take_along_axis(lp, order, 1)
    d = target_to_draft[ids]
    out_ids = np.full((ids.shape[0], K), -1, np.int32)
    out_lp = np.full((ids.shape[0], K), -np.inf, np.float32)
    out_ids[:, :d.shape[1]] = d
    out_lp[:, :d.shape[1]] = np.where(d >= 0, lp, -np.inf)
    return out_ids, out_lp, d[:, 0]


def pack(traces: list[Trace], cfg: BatchConfig, depth: int, target_to_draft: np.ndarray,
         train_on_prompt: bool = False, at_least: tuple[int, int, int] = (0, 0, 0), ht3: int = 0
         ) -> tuple[Batch, PackStats, list[Trace]]:
    """Build one batch from `traces`. `target_to_draft`: [V] draft id of each target token
    (-1 = not in the draft vocabulary; see `model.target_to_draft`). `at_least`: buckets (L, R, M)
    to use at least (the trainer's processes agree on one shape); `ht3`: the aux width, needed only
    when `traces` is empty (a batch of masked rows).

    Returns (batch, stats, traces that did not fit).
    """
    st = PackStats(traces=len(traces))
    L_max = cfg.lengths[-1]
    lens = [min(t.num_tokens - 1, L_max) for t in traces]
    st.truncated = sum(t.num_tokens - 1 > L_max for t in traces)
    L = max(_bucket(max([n for n in lens if n > 0], default=1), cfg.lengths), at_least[0])
    rows: list[list[int]] = [[] for _ in range(cfg.rows)]
    room = [L] * cfg.rows
    left: list[Trace] = []
    for i in sorted(range(len(traces)), key=lambda i: -lens[i]):
        if lens[i] <= 0:
            continue
        r = next((r for r in range(cfg.rows) if room[r] >= lens[i] and (cfg.pack or not rows[r])), None)
        if r is None:
            left.append(traces[i])
            continue
        rows[r].append(i)
        room[r] -= lens[i]
    st.left_over = len(left)

    D, K = depth, cfg.topk
    R_max, M_max = cfg.branch_slots[-1], cfg.branch_slots[-1]
    N = L + R_max
    f = {k: np.full(shape, fill, dtype) for k, (shape, dtype, fill) in
         _fields(cfg, depth, L, traces[0].aux_hidden.shape[1] if traces else ht3).items()}
    r_used, m_used = 0, 0
    for b, members in enumerate(rows):
        off, n_rej, n_neg = 0, [0] * D, 0
        for s, i in enumerate(members):
            n_rej, n_neg, dropped = _place(f, b, s, off, traces[i], lens[i], D, K, L, N, R_max, M_max,
                                           target_to_draft, train_on_prompt, n_rej, n_neg)
            st.dropped_nodes += dropped
            off += lens[i]
        r_used, m_used = max(r_used, max(n_rej)), max(m_used, n_neg)

    R, M = max(_bucket(r_used, cfg.branch_slots), at_least[1]), max(_bucket(m_used, cfg.branch_slots), at_least[2])
    n = L + R
    st.shape = (L, R, M)

    def remap(g):  # global index with block stride N -> block stride n
        return np.where(g >= 0, (g // N) * n + g % N, -1).astype(np.int32)

    for k in list(f):
        if Batch.row_axis(k) == 0:
            continue
        f[k] = f[k][:, :, :n]
    f["anc"] = remap(f["anc"])
    f["neg_slot"] = remap(f["neg_slot"][:, :M])
    f["neg_tok"], f["neg_mask"] = f["neg_tok"][:, :M], f["neg_mask"][:, :M]
    return Batch(**f), st, left



def pack_all(traces: list[Trace], cfg: BatchConfig, depth: int, target_to_draft: np.ndarray) -> list[Batch]:
    """Every trace in batches, generated positions scored only: how held-out traffic is evaluated
    (the trainer's gate, `bench learn`)."""
    out = []
    while traces:
        batch, _, traces = pack(traces, cfg, depth, target_to_draft, False)
        out.append(batch)
    return out

def _place(f, b, s, off, tr: Trace, n, D, K, L, N, R, M, target_to_draft, train_on_prompt, n_rej, n_neg):
    """Write one request (segment s of row b, trunk slots [off, off + n)) into the arrays."""
    x, P = tr.tokens, tr.prompt_len
    T = n + 1  # tokens used (truncated traces keep their first L_max + 1)
    t = np.arange(1, T)
    idx = off + t - 1
    f["aux"][b, idx] = tr.aux_hidden[:T - 1].astype(BF16)
    lab_ids, lab_lp, top = _labels(tr.target_ids[:T], tr.target_logprobs[:T], K, target_to_draft)
    first = 0 if train_on_prompt else P - 1  # slots predicting generated tokens only
    for j in range(D):
        ok = t + j <= T - 1
        tt, ii = t[ok], idx[ok]
        f["tokens"][j, b, ii] = x[tt + j]
        f["positions"][j, b, ii] = tt + j
        f["seg"][j, b, ii] = s
        f["attach"][j, b, ii] = ii
        if j == 0:
            f["tpos"][0, b, ii] = ii
        else:
            f["parent"][j, b, ii] = ii
            f["anc"][j, b, ii, :j] = (np.arange(1, j + 1)[None, :] * N + ii[:, None])
        f["label_ids"][j, b, ii] = lab_ids[tt + j]
        f["label_lp"][j, b, ii] = lab_lp[tt + j]
        f["loss_mask"][j, b, ii] = ((tt + j >= first) & (lab_ids[tt + j] >= 0).any(1)).astype(np.float32)
        f["acc_target"][j, b, ii] = top[tt + j]

    dropped = 0
    for step in tr.steps:
        p = step.trunk_pos
        if not 1 <= p <= T - 1:
            dropped += int((~step.accepted).sum())
            continue
        slot: dict[int, tuple[int, int]] = {}  # node -> (block, local)
        depth = np.zeros(len(step.tokens), np.int64)
        rows_of = {} if step.target_nodes is None else {int(m): r for r, m in enumerate(step.target_nodes)}
        for j_node, (tok, par, acc) in enumerate(zip(step.tokens, step.parents, step.accepted)):
            d = 1 if par < 0 else depth[par] + 1
            depth[j_node] = d
            ps = (0, off + p - 1) if par < 0 else slot.get(int(par))
            if acc:
                if d <= D - 1 and p + d <= T - 1:
                    slot[j_node] = (int(d), off + p - 1)
                continue
            if ps is None:
                dropped += 1
                continue
            dtok = int(target_to_draft[tok])
            if dtok >= 0 and n_neg < M:
                f["neg_slot"][b, n_neg] = ps[0] * N + ps[1]
                f["neg_tok"][b, n_neg] = dtok
                f["neg_mask"][b, n_neg] = 1.0
                n_neg += 1
            elif dtok >= 0:
                dropped += 1
            if d > D - 1:
                continue
            if n_rej[d] >= R:
                dropped += 1
                continue
            loc = L + n_rej[d]
            n_rej[d] += 1
            slot[j_node] = (int(d), loc)
            f["tokens"][d, b, loc] = tok
            f["positions"][d, b, loc] = p + d
            f["parent"][d, b, loc] = ps[1]
            f["seg"][d, b, loc] = s
            f["attach"][d, b, loc] = off + p - 1
            f["anc"][d, b, loc, :d - 1] = f["anc"][d - 1, b, ps[1], :d - 1]
            f["anc"][d, b, loc, d - 1] = d * N + loc
            f["rejected"][d, b, loc] = True
            r = rows_of.get(j_node)
            if r is not None:
                ids, lp, top = _labels(step.target_ids[r:r + 1], step.target_logprobs[r:r + 1], K, target_to_draft)
                f["label_ids"][d, b, loc], f["label_lp"][d, b, loc] = ids[0], lp[0]
                f["loss_mask"][d, b, loc] = float((ids[0] >= 0).any())
                f["acc_target"][d, b, loc] = top[0]
    return n_rej, n_neg, dropped
