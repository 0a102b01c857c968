"""Tree attention over a packed sample of trunk slots and tree (draft) slots.

Why compact metadata instead of a dense mask: a packed row holds the trunk of one or more
requests plus every TTT chain and rejected branch hanging from it; a node must see the trunk up
to its attach point and its own ancestors only. Per slot we keep

  seg     request id within the row (-1 = padding)
  tpos    row-level trunk index for trunk slots, -1 for tree slots
  attach  trunk index the slot hangs from (a trunk slot: its own index)
  anc     [D] global slot indices of its tree ancestors, itself included (-1 padded)

so the visible set is `same seg and (trunk key at or before attach, or key in anc)`. A kernel
can evaluate that per block without materialising [N, N] (the Pallas issue); this module is
the jnp reference and the oracle for it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TreeMeta(NamedTuple):
    seg: jax.Array  # int32 [B, N]
    tpos: jax.Array  # int32 [B, N]
    attach: jax.Array  # int32 [B, N]
    anc: jax.Array  # int32 [B, N, D]

    def slice(self, lo: int, hi: int) -> "TreeMeta":
        return TreeMeta(self.seg[:, lo:hi], self.tpos[:, lo:hi], self.attach[:, lo:hi], self.anc[:, lo:hi])


def tree_mask(q: TreeMeta, k: TreeMeta, k_offset: int = 0) -> jax.Array:
    """bool [B, Nq, Nk]: may query i see key j. Key j has global index k_offset + j."""
    Nk = k.seg.shape[1]
    kidx = k_offset + jnp.arange(Nk, dtype=jnp.int32)
    same = (q.seg[:, :, None] == k.seg[:, None, :]) & (q.seg[:, :, None] >= 0)
    trunk = (k.tpos[:, None, :] >= 0) & (k.tpos[:, None, :] <= q.attach[:, :, None])
    ancestor = jnp.any(q.anc[:, :, :, None] == kidx[None, None, None, :], axis=2)
    return same & (trunk | ancestor)


def tree_attention(q, k, v, q_meta: TreeMeta, k_meta: TreeMeta, *, scale: float | None = None):
    """Reference tree attention. q [B, Nq, Hq, hd], k/v [B, Nk, Hkv, hd] -> [B, Nq, Hq, hd].

    Softmax in f32; a query that sees no key (padding) gets zeros.
    """
    B, Nq, Hq, hd = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    scale = hd ** -0.5 if scale is None else scale
    mask = tree_mask(q_meta, k_meta)  # [B, Nq, Nk]
    qg = q.reshape(B, Nq, Hkv, g, hd)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, Nq, Hq, hd).astype(q.dtype)


def random_meta(rng: np.random.Generator, B: int, N: int, D: int, shape: str = "mixed", max_trunk: int = 12,
                max_tree: int = 14) -> TreeMeta:
    """Random packed rows for tests and benchmarks: requests of a trunk (< max_trunk slots) plus a
    tree (< max_tree nodes) each (`chain`, `wide` = all nodes on the trunk, or `mixed`), depth <= D,
    some trailing padding."""
    seg = np.full((B, N), -1, np.int32)
    tpos = np.full((B, N), -1, np.int32)
    attach = np.full((B, N), -1, np.int32)
    anc = np.full((B, N, D), -1, np.int32)
    for b in range(B):
        pos, r = 0, 0
        end = N - int(rng.integers(0, 6))  # trailing padding slots
        while pos < end:
            T = int(min(rng.integers(1, max_trunk), end - pos))
            trunk = list(range(pos, pos + T))
            for t in trunk:
                seg[b, t], tpos[b, t], attach[b, t] = r, t, t
            pos += T
            M = int(min(rng.integers(0, max_tree), end - pos))
            depth = {}
            for i in range(pos, pos + M):
                tree = [j for j in range(pos, i)]
                if shape == "chain":
                    parent = tree[-1] if tree and depth[tree[-1]] < D else -1
                elif shape == "wide":
                    parent = -1
                else:
                    parent = int(rng.choice(tree)) if tree and rng.random() < 0.6 else -1
                    if parent >= 0 and depth[parent] >= D:
                        parent = -1
                seg[b, i] = r
                if parent < 0:
                    attach[b, i] = trunk[0] if rng.random() < 0.3 else int(rng.choice(trunk))
                    depth[i] = 1
                    anc[b, i, 0] = i
                else:
                    attach[b, i] = attach[b, parent]
                    depth[i] = depth[parent] + 1
                    anc[b, i, :depth[i]] = np.r_[anc[b, parent, :depth[parent]], i]
            pos += M
            r += 1
    return TreeMeta(*map(jnp.asarray, (seg, tpos, attach, anc)))
