"""The target model: any local Hugging Face causal LM, run with a KV cache and tree masks.

EAGLE3 needs three of the target's hidden states per position ("aux": low, middle, high layer).
Like SGLang we take the residual stream entering layers [2, n/2, n-3] (clamped for tiny models);
`output_hidden_states[i]` is exactly that stream at layer i.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bridge.eagle3 import read_target_config
from serving.padding import Padding

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class TargetConfig:
    path: str = ""  # local HF model directory (nothing is downloaded)
    dtype: str = "float32"
    aux_layers: list[int] = dataclasses.field(default_factory=list)  # [] = SGLang's default choice
    topk: int = 8  # target top-k exported per position

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        if self.aux_layers and len(self.aux_layers) != 3:
            raise ValueError("aux_layers must name exactly three layers")


def default_aux_layers(num_layers: int) -> list[int]:
    n = num_layers
    return [min(max(i, 1), n - 1) for i in (2, n // 2, n - 3)] if n > 1 else [1, 1, 1]


class Target:
    def __init__(self, cfg: TargetConfig, model=None):
        self.cfg = cfg
        if model is None:
            read_target_config(cfg.path)  # "no model directory at ...", not a hub lookup error
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_DTYPES[cfg.dtype], local_files_only=True)
        self.model = model.eval()
        c = self.model.config
        self.num_layers, self.hidden_size, self.vocab_size = c.num_hidden_layers, c.hidden_size, c.vocab_size
        self.aux_layers = list(cfg.aux_layers) or default_aux_layers(self.num_layers)
        if any(not 0 <= i <= self.num_layers for i in self.aux_layers):
            raise ValueError(f"aux_layers {self.aux_layers} outside [0, {self.num_layers}]")

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    @torch.no_grad()
    def forward(self, ids, cache, positions=None, allowed=None):
        """Run `ids` [n] after what `cache` holds. `allowed` bool [n, past + n] for tree masks.
        Returns (logits [n, V] f32, aux [n, 3H])."""
        ids = torch.as_tensor(ids, dtype=torch.long)[None]
        kw = {}
        if positions is not None:
            kw["position_ids"] = torch.as_tensor(positions, dtype=torch.long)[None]
        if allowed is not None:
            kw["attention_mask"] = torch.where(allowed[None, None], 0.0, torch.finfo(torch.float32).min).to(
                self.model.dtype)
        out = self.model(ids, past_key_values=cache, use_cache=True, output_hidden_states=True, **kw)
        aux = torch.cat([out.hidden_states[i][0] for i in self.aux_layers], dim=-1)
        return out.logits[0].float(), aux

    @torch.no_grad()
    def forward_many(self, items):
        """One fused forward for several requests' rounds; `items` = [(ids, cache, positions, allowed)]
        as for `forward`, every cache non-empty. Caches are right-padded to the longest (pad columns
        masked out; positions are explicit, so padding moves no rotary phase), new tokens are padded
        to the widest round, and afterwards each request's cache gets back exactly its own entries,
        as if it had run alone. Returns [(logits [n, V] f32, aux [n, 3H])] in order."""
        if len(items) == 1:
            return [self.forward(*items[0])]
        pad = Padding([c.get_seq_length() for _, c, _, _ in items], [len(ids) for ids, _, _, _ in items])
        ids = torch.zeros(len(items), pad.N, dtype=torch.long)
        pos = torch.zeros(len(items), pad.N, dtype=torch.long)
        masks = []
        for b, ((tok, cache, positions, a), past, n) in enumerate(zip(items, pad.pasts, pad.ns)):
            ids[b, :n] = torch.as_tensor(tok, dtype=torch.long)
            pos[b, :n] = torch.as_tensor(positions if positions is not None else range(past, past + n))
            masks.append(a if a is not None else torch.ones(n, past + n, dtype=torch.bool).tril(past))
        batched = DynamicCache()
        for li in range(len(items[0][1].layers)):  # cache layers are [1, kv heads, seq, head dim]
            batched.update(pad.cache([c.layers[li].keys for _, c, _, _ in items], dim=2),
                           pad.cache([c.layers[li].values for _, c, _, _ in items], dim=2), li)
        mask = torch.where(pad.mask(masks)[:, None], 0.0, torch.finfo(torch.float32).min).to(self.model.dtype)
        out = self.model(ids, past_key_values=batched, position_ids=pos, attention_mask=mask, use_cache=True,
                         output_hidden_states=True)
        for b, (_, cache, _, _) in enumerate(items):
            for li, layer in enumerate(cache.layers):
                layer.keys = pad.own(batched.layers[li].keys, b, dim=2)
                layer.values = pad.own(batched.layers[li].values, b, dim=2)
        res = []
        for b, n in enumerate(pad.ns):
            aux = torch.cat([out.hidden_states[i][b, :n] for i in self.aux_layers], dim=-1)
            res.append((out.logits[b, :n].float(), aux))
        return res

    @staticmethod
    def keep(cache: DynamicCache, past: int, new_idx: list[int]) -> None:
        """After a tree pass: keep the first `past` entries plus the tree entries `new_idx` (in order)."""
        idx = torch.tensor(list(range(past)) + [past + i for i in new_idx], dtype=torch.long)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(2, idx)
            layer.values = layer.values.index_select(2, idx)
