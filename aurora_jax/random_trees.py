"""Random packed rows of trunks and trees, for the tree-attention tests and `bench attention`:
workloads, not part of the trainer (which packs real traces, `batching`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from aurora_jax.tree_attention import TreeMeta


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
