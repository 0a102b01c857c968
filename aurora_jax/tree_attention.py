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
