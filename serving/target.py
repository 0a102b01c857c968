"""The target model: any local Hugging Face causal LM, run with a KV cache and tree masks.

EAGLE3 needs three of the target's hidden states per position ("aux": low, middle, high layer).
Like SGLang we take the residual stream entering layers [2, n/2, n-3] (clamped for tiny models);
`output_hidden_states[i]` is exactly that stream at layer i.

Every forward gets explicit positions and an explicit attention mask (a tree's, or causal), and
runs on `serving.kv_cache.KVCache`. Attention is transformers' sdpa except where it would copy the
cache: with a mask and several query tokens, sdpa repeats each kv head's keys and values once per
query head of its group (`repeat_kv`); `packed_gqa_attention` stacks a group's query heads along
the query axis instead, so they attend to their shared kv head without a copy.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bridge.eagle3 import read_target_config
from serving.kv_cache import KVCache
from serving.packed_linear import pack_linears
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


def _or_causal(positions, allowed, past: int, n: int):
    """A round's (positions, allowed) with the defaults filled in: n tokens right after `past` cached
    ones, each seeing the cache and the tokens before it."""
    if positions is None:
        positions = range(past, past + n)
    if allowed is None:
        allowed = torch.ones(n, past + n, dtype=torch.bool).tril(past)
    return positions, allowed


def packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa for grouped-query attention with a mask over several query tokens, without repeating the
    keys and values: query [B, H, n, d] -> [B, kv heads, group * n, d] (head g * group + r's row i
    becomes row r * n + i of kv head g), the mask [B, 1, n, L] repeated per head of a group.
    Anything else (one query token, no grouping, no mask, dropout) goes to transformers' sdpa."""
    group = getattr(module, "num_key_value_groups", 1)
    B, H, n, d = query.shape
    if group == 1 or n == 1 or attention_mask is None or dropout or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = attention_mask[:, :, :, :key.shape[2]].repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(query.reshape(B, H // group, group * n, d), key, value, attn_mask=mask,
                                         scale=scaling)
    return out.reshape(B, H, n, d).transpose(1, 2).contiguous(), None


AttentionInterface.register("packed_gqa", packed_gqa_attention)


class Target:
    def __init__(self, cfg: TargetConfig, model=None):
        self.cfg = cfg
        if model is None:
            read_target_config(cfg.path)  # "no model directory at ...", not a hub lookup error
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_DTYPES[cfg.dtype], local_files_only=True)
        self.model = model.eval()
        if self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation("packed_gqa")
        pack_linears(self.model)
        c = self.model.config
        self.num_layers, self.hidden_size, self.vocab_size = c.num_hidden_layers, c.hidden_size, c.vocab_size
        self.aux_layers = list(cfg.aux_layers) or default_aux_layers(self.num_layers)
        if any(not 0 <= i <= self.num_layers for i in self.aux_layers):
            raise ValueError(f"aux_layers {self.aux_layers} outside [0, {self.num_layers}]")

    def new_cache(self) -> KVCache:
        return KVCache()

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [..., n, keys] -> the additive mask transformers takes, [batch, 1, n, keys]."""
        if allowed.dim() == 2:
            allowed = allowed[None]
        return torch.where(allowed[:, None], 0.0, torch.finfo(torch.float32).min).to(self.model.dtype)

    @torch.no_grad()
    def forward(self, ids, cache: KVCache, positions=None, allowed=None):
        """Run `ids` [n] after what `cache` holds (default: the next positions, causal).
        `allowed` bool [n, past + n] for tree masks. Returns (logits [n, V] f32, aux [n, 3H])."""
        ids = torch.as_tensor(ids, dtype=torch.long)[None]
        positions, allowed = _or_causal(positions, allowed, cache.get_seq_length(), ids.shape[1])
        out = self.model(ids, past_key_values=cache, position_ids=torch.as_tensor(positions, dtype=torch.long)[None],
                         attention_mask=self._mask(allowed), use_cache=True, output_hidden_states=True)
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
            positions, a = _or_causal(positions, a, past, n)
            ids[b, :n] = torch.as_tensor(tok, dtype=torch.long)
            pos[b, :n] = torch.as_tensor(positions)
            masks.append(a)
        caches = [c for _, c, _, _ in items]
        batched = KVCache.stack(caches, pad.N)
        out = self.model(ids, past_key_values=batched, position_ids=pos, attention_mask=self._mask(pad.mask(masks)),
                         use_cache=True, output_hidden_states=True)
        batched.unstack(caches, pad.ns, pad.P)
        res = []
        for b, n in enumerate(pad.ns):
            aux = torch.cat([out.hidden_states[i][b, :n] for i in self.aux_layers], dim=-1)
            res.append((out.logits[b, :n].float(), aux))
        return res

    @staticmethod
    def keep(cache: KVCache, past: int, new_idx: list[int]) -> None:
        """After a tree pass: keep the first `past` entries plus the tree entries `new_idx` (in order)."""
        cache.keep(past, new_idx)
