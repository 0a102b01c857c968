"""The target's KV cache for tree verification: written in place, trimmed in place, batched by one copy.

transformers' DynamicCache concatenates on every forward (a copy of the whole cache per layer), a
tree round's trim to the accepted path copied it again, and a fused round of several requests
padded, concatenated and split the caches once more. On a CPU decoding SmolLM2 in bf16 those copies
were about a sixth of a fused round's operator time; without them a fused round of two trees takes
0.88x the time (README, "The target's KV cache"). Here each layer's keys and values live in a
buffer with spare room ([batch, kv heads, capacity, head dim]): a forward writes its new entries
after the cached ones and attends to a view of the filled prefix, the trim moves only the accepted
entries, and a fused round copies each request's cache once into a padded batch and hands back only
the new entries.

Any model whose attention calls `cache.update(keys, values, layer_idx, ...)` (every transformers
decoder) can run on it; the attention mask is always given explicitly (`serving.target`), so the
model never asks the cache for mask sizes.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self):
        self.keys: list[torch.Tensor] = []  # per layer [batch, kv heads, capacity, head dim]
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # filled entries per layer (equal between forwards)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if self.lengths else 0

    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's filled (keys, values), views [batch, kv heads, length, head dim]."""
        return [(k[:, :, :n], v[:, :, :n]) for k, v, n in zip(self.keys, self.values, self.lengths)]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append a forward's new entries [batch, kv heads, n, head dim] to layer `layer_idx`;
        returns views of all its entries (cached, then new)."""
        if layer_idx == len(self.keys):  # first forward: layers are met in order
            self.keys.append(keys.new_empty(0, 0, 0, 0))
            self.values.append(values.new_empty(0, 0, 0, 0))
            self.lengths.append(0)
        start = self.lengths[layer_idx]
        end = start + keys.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, keys, end)
        self.keys[layer_idx][:, :, start:end] = keys
        self.values[layer_idx][:, :, start:end] = values
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def _grow(self, layer_idx: int, like: torch.Tensor, needed: int) -> None:
        """Room for `needed` entries and as many again (amortised O(1) appends)."""
        b, h, _, d = like.shape
        cap = max(2 * needed, 64)
        n = self.lengths[layer_idx]
        for bufs in (self.keys, self.values):
            new = like.new_empty(b, h, cap, d)
            if n:
                new[:, :, :n] = bufs[layer_idx][:, :, :n]
            bufs[layer_idx] = new

    def keep(self, past: int, new_idx: list[int]) -> None:
        """After a tree pass: keep the first `past` entries plus the tree entries `new_idx` (in order).
        Moves only the kept tree entries not already in place (the rest is overwritten by later
        forwards): a path through the first child at each depth moves nothing, which is most rounds."""
        end = past + len(new_idx)
        first = next((j for j, i in enumerate(new_idx) if i != j), len(new_idx))  # entries before it stay
        if first < len(new_idx):
            src = torch.tensor([past + i for i in new_idx[first:]], dtype=torch.long)
            for li in range(len(self.keys)):
                for buf in (self.keys[li], self.values[li]):
                    buf[:, :, past + first:end] = buf.index_select(2, src)
        self.lengths = [end] * len(self.keys)

    @classmethod
    def stack(cls, caches: list["KVCache"], width: int) -> "KVCache":
        """A batch of these caches for one fused forward: each request's entries copied into row b,
        right-padded with zeros to the longest (pad keys must be masked), room for `width` new entries
        each after the padded length."""
        P = max(c.get_seq_length() for c in caches)
        out = cls()
        for li in range(len(caches[0].keys)):
            for name in ("keys", "values"):
                first = getattr(caches[0], name)[li]
                buf = first.new_zeros(len(caches), first.shape[1], P + width, first.shape[3])
                for b, c in enumerate(caches):
                    buf[b, :, :c.lengths[li]] = getattr(c, name)[li][0, :, :c.lengths[li]]
                getattr(out, name).append(buf)
            out.lengths.append(P)
        return out

    def unstack(self, caches: list["KVCache"], ns: list[int], past: int) -> None:
        """After a fused forward on `stack(caches, ...)`: append to each request's cache its own `ns[b]`
        new entries (written at [past, past + ns[b]) of row b)."""
        for b, (c, n) in enumerate(zip(caches, ns)):
            for li in range(len(self.keys)):
                c.update(self.keys[li][b:b + 1, :, past:past + n], self.values[li][b:b + 1, :, past:past + n], li)
