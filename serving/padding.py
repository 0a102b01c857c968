"""Several requests' rounds as one forward, and each request's own results back as if it ran alone.

Used by the target's fused verification (`Target.forward_many`) and the draft's fused steps
(`EagleDrafter._forward_many`). Caches are right-padded to the longest (P entries), new tokens to
the widest round (N); the attention mask hides pad keys, and a pad row sees only itself (so its
softmax has no empty row and no NaN). Positions are explicit, so padding shifts no rotary phase.
Afterwards a request keeps exactly its own entries: its first `past`, then its `n` new ones. The
draft's caches are padded and split here (`cache`, `own`); the target's, which live in buffers with
spare room, by `serving.kv_cache.KVCache.stack` / `unstack` in the same layout.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Padding:
    pasts: list[int]  # cached entries per request
    ns: list[int]  # new tokens per request

    @property
    def P(self) -> int:
        return max(self.pasts)

    @property
    def N(self) -> int:
        return max(self.ns)

    def mask(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """bool [B, N, P + N] from each request's [n, past + n] (its keys: cache, then new)."""
        P, N = self.P, self.N
        out = torch.zeros(len(masks), N, P + N, dtype=torch.bool)
        out[:, torch.arange(N), P + torch.arange(N)] = True  # pad rows see themselves
        for b, (m, past, n) in enumerate(zip(masks, self.pasts, self.ns)):
            out[b, :n, :past], out[b, :n, P:P + n] = m[:, :past], m[:, past:]
        return out

    def cache(self, entries: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Requests' cache tensors [1, ..., past, ...] (sequence on `dim`), right-padded to P and stacked."""
        def pad(t, past):
            shape = list(t.shape)
            shape[dim] = self.P - past
            return torch.cat([t, t.new_zeros(shape)], dim=dim)
        return torch.cat([pad(t, past) for t, past in zip(entries, self.pasts)])

    def own(self, batched: torch.Tensor, b: int, dim: int) -> torch.Tensor:
        """Request b's entries of a batched cache tensor [B, ..., P + N, ...]: its past, then its new ones."""
        idx = torch.cat([torch.arange(self.pasts[b]), self.P + torch.arange(self.ns[b])])
        return batched[b:b + 1].index_select(dim, idx)
