"""EAGLE3 draft in plain torch, written from the published architecture (SGLang's
`LlamaForCausalLMEagle3`): the serving tier drafts with it, and its state_dict keys are the
checkpoint keys, so a WeightSync version or an HF dir loads with `load_state_dict`.

One draft step over N slots: `fc` projects target aux features (3*Ht wide) while the draft's own
hidden states (H wide) pass through; the layer attends over `[input_layernorm(embedding) ;
hidden_norm(hidden)]` with an explicit boolean mask against cached + new keys; the final norm fuses
the residual add and its pre-norm sum is the next step's hidden input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridge.eagle3 import DraftConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # torch's fused kernel: float32 inside, as x32 * rsqrt(mean(x32^2) + eps) * weight, cast back
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_angles(positions, inv_freq):
    """(cos, sin) [B, N, 1, hd/2] float32 at positions [B, N]; inv_freq [hd/2] float32 from
    `DraftConfig.inv_freq` (rope_theta and rope_scaling applied). Queries and keys share them."""
    ang = positions.float()[..., None, None] * inv_freq
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    """Llama rotary embedding (rotate-half) on x [B, N, heads, hd], in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.hd
        self.cfg = cfg
        self.q_proj = nn.Linear(2 * H, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * H, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * H, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, H, bias=False)
        self.inv_freq = torch.from_numpy(cfg.inv_freq())  # not a buffer: .to(bf16) must not round it

    def forward(self, x, positions, mask, cache=None):
        c = self.cfg
        B, N, _ = x.shape
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_angles(positions, self.inv_freq)
        q = rope(self.q_proj(x).view(B, N, c.num_attention_heads, c.hd), cos, sin)
        k = rope(self.k_proj(x).view(B, N, c.num_key_value_heads, c.hd), cos, sin)
        v = self.v_proj(x).view(B, N, c.num_key_value_heads, c.hd)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
        # grouped-query attention without copying keys and values per query head: a kv head's g
        # query heads (heads kv*g .. kv*g+g-1) are stacked along the query axis and read it together
        kvh, g = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        qg = q.view(B, N, kvh, g, c.hd).permute(0, 2, 3, 1, 4).reshape(B, kvh, g * N, c.hd)
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask.repeat(1, g, 1)[:, None])  # [B, kvh, g*N, hd]
        o = o.view(B, kvh, g, N, c.hd).permute(0, 3, 1, 2, 4).reshape(B, N, -1)
        empty = ~mask.any(-1)  # a padding row (several requests' steps fused) attends to nothing: zeros, not NaN
        if empty.any():
            o = o.masked_fill(empty[..., None], 0)
        return self.o_proj(o), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(3 * cfg.ht, cfg.hidden_size, bias=False)
        self.midlayer = DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vd, bias=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.register_buffer("d2t", torch.zeros(cfg.vd, dtype=torch.int64))
        self.register_buffer("t2d", torch.arange(cfg.vocab_size) < cfg.vd)

    def forward(self, tokens, hidden, positions, mask, cache=None):
        """One draft step. tokens/positions [B, N]; hidden [B, N, 3Ht] (target) or [B, N, H] (draft);
        mask bool [B, N, Nc + N] over cached then new keys. Returns (logits [B, N, Vd] f32,
        next hidden [B, N, H], new cache (k, v))."""
        if hidden.shape[-1] != self.cfg.hidden_size:
            hidden = self.fc(hidden.to(self.fc.weight.dtype))
        L = self.midlayer
        emb = self.embed_tokens(tokens).to(hidden.dtype)
        x = torch.cat([L.input_layernorm(emb), L.hidden_norm(hidden)], dim=-1)
        a, cache = L.self_attn(x, positions, mask, cache)
        h = a + hidden
        h = L.mlp(L.post_attention_layernorm(h)) + h
        return self.lm_head(self.norm(h)).float(), h, cache

    def empty_cache(self) -> torch.Tensor:
        """A zero-length k or v cache [1, 0, kv heads, hd] (a request with nothing cached yet)."""
        c = self.cfg
        return torch.zeros(1, 0, c.num_key_value_heads, c.hd, dtype=self.fc.weight.dtype, device=self.fc.weight.device)

    def draft_to_target(self, draft_ids):
        """Draft-vocabulary ids -> target ids (target = draft + d2t[draft])."""
        return draft_ids + self.d2t[draft_ids]
