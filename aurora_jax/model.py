"""EAGLE3 draft model in Flax NNX, with SGLang's `LlamaForCausalLMEagle3` parameter structure.

Module and parameter names mirror the checkpoint keys (`fc`, `midlayer.self_attn.q_proj`, ...)
so the bridge's mapping table is one rename + transpose per leaf (docs/design.md section 2).
Forward semantics follow SGLang's `llama_eagle3.py`: `fc` only projects the target's 3*Ht aux
features (the draft's own H-wide hidden states pass through as is); the layer attends over
`cat([input_layernorm(embeds), hidden_norm(hidden)])`; the final `norm` fuses the residual add and
its pre-norm sum is the hidden state handed to the next draft step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.tree_attention import TreeMeta, tree_attention
from bridge.eagle3 import DraftConfig  # noqa: F401  (the config lives with the shared layout)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Frozen(nnx.Variable):
    """A weight the optimizer never touches (the target's token embedding)."""


class VocabMap(nnx.Variable):
    """Integer/boolean vocabulary buffers (`d2t`, `t2d`): part of the checkpoint, never trained."""


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, inv_freq):
    """Llama rotary embedding (rotate-half layout) on x [B, N, heads, hd] at positions [B, N];
    inv_freq [hd/2] from `DraftConfig.inv_freq` (rope_theta and rope_scaling applied)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, N, hd/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(n_in: int, n_out: int, cfg: DraftConfig, rngs: nnx.Rngs, axes: tuple[str, str]) -> nnx.Linear:
    """A bias-free projection whose kernel [n_in, n_out] carries its logical axes as partition
    metadata: "embed" (the hidden size, also the 2H input of q/k/v), "heads", "mlp", "aux" (the
    3Ht target features), "vocab" (the draft vocabulary). The trainer maps them onto its mesh
    (`train.AXIS_RULES`); nothing is sharded at creation."""
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), axes, eager_sharding=False)
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype],
                      kernel_init=init, rngs=rngs)


class Attention(nnx.Module):
    """GQA self-attention whose q/k/v read the 2H-wide [embedding ; hidden] input."""

    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs):
        H, hd = cfg.hidden_size, cfg.hd
        self.cfg = cfg
        self.q_proj = _linear(2 * H, cfg.num_attention_heads * hd, cfg, rngs, ("embed", "heads"))
        self.k_proj = _linear(2 * H, cfg.num_key_value_heads * hd, cfg, rngs, ("embed", "heads"))
        self.v_proj = _linear(2 * H, cfg.num_key_value_heads * hd, cfg, rngs, ("embed", "heads"))
        self.o_proj = _linear(cfg.num_attention_heads * hd, H, cfg, rngs, ("heads", "embed"))

    def qkv(self, x_BN2H, positions_BN):
        B, N, _ = x_BN2H.shape
        c = self.cfg
        q = self.q_proj(x_BN2H).reshape(B, N, c.num_attention_heads, c.hd)
        k = self.k_proj(x_BN2H).reshape(B, N, c.num_key_value_heads, c.hd)
        v = self.v_proj(x_BN2H).reshape(B, N, c.num_key_value_heads, c.hd)
        inv = c.inv_freq()
        return rope(q, positions_BN, inv), rope(k, positions_BN, inv), v


class MLP(nnx.Module):
    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs, ("embed", "mlp"))
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs, ("embed", "mlp"))
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, cfg, rngs, ("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """SGLang's `LlamaDecoderLayer` for EAGLE3 (`midlayer`)."""

    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs):
        pd = _DTYPES[cfg.param_dtype]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, rngs=rngs)


class Eagle3Draft(nnx.Module):
    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _DTYPES[cfg.param_dtype]
        self.fc = _linear(3 * cfg.ht, cfg.hidden_size, cfg, rngs, ("aux", "embed"))
        self.midlayer = DecoderLayer(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = _linear(cfg.hidden_size, cfg.vd, cfg, rngs, ("embed", "vocab"))
        # Taken from the target when it is known (see `set_embedding`); random until then.
        self.embed_tokens = Frozen(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd))
        self.d2t = VocabMap(jnp.zeros((cfg.vd,), jnp.int32))  # target_id = draft_id + d2t[draft_id]
        self.t2d = VocabMap(jnp.arange(cfg.vocab_size) < cfg.vd)  # token kept in the draft vocabulary

    # -- pieces of one draft step, split so the TTT loop can cache keys/values per depth --

    def project(self, aux_BN3H):
        """Target aux features [.., 3*Ht] -> draft hidden [.., H]."""
        return self.fc(aux_BN3H.astype(_DTYPES[self.cfg.dtype]))

    def layer_in(self, tokens_BN, hidden_BNH, positions_BN):
        """(q, k, v, residual) of the decoder layer for these slots."""
        dt = _DTYPES[self.cfg.dtype]
        emb = jnp.take(self.embed_tokens[...], tokens_BN, axis=0).astype(dt)
        L = self.midlayer
        x = jnp.concatenate([L.input_layernorm(emb), L.hidden_norm(hidden_BNH.astype(dt))], axis=-1)
        q, k, v = L.self_attn.qkv(x, positions_BN)
        return q, k, v, hidden_BNH.astype(dt)

    def layer_out(self, attn_BNhd, residual_BNH):
        """Attention output -> pre-norm hidden state (the next draft step's input)."""
        L = self.midlayer
        B, N = attn_BNhd.shape[:2]
        h = L.self_attn.o_proj(attn_BNhd.reshape(B, N, -1)) + residual_BNH
        return L.mlp(L.post_attention_layernorm(h)) + h

    def logits(self, hidden_BNH):
        """Draft-vocabulary logits [.., Vd] (f32) from pre-norm hidden states."""
        return self.lm_head(self.norm(hidden_BNH)).astype(jnp.float32)

    def __call__(self, tokens_BN, hidden_BNH, positions_BN, meta: TreeMeta,
                 attention: Callable = tree_attention):
        """One draft step over a packed set of slots attending among themselves (no cache).

        `hidden_BNH` is either target aux [.., 3*Ht] (projected by fc) or draft hidden [.., H].
        Returns (logits [B, N, Vd], next hidden [B, N, H]).
        """
        if hidden_BNH.shape[-1] != self.cfg.hidden_size:
            hidden_BNH = self.project(hidden_BNH)
        q, k, v, res = self.layer_in(tokens_BN, hidden_BNH, positions_BN)
        h = self.layer_out(attention(q, k, v, meta, meta), res)
        return self.logits(h), h

    def set_embedding(self, embed_VH) -> None:
        """Use the target's token embedding (frozen), e.g. from its safetensors."""
        embed_VH = np.asarray(embed_VH)
        if embed_VH.shape != (self.cfg.vocab_size, self.cfg.hidden_size):
            raise ValueError(f"embedding shape {embed_VH.shape} != (vocab_size, hidden_size) "
                             f"{(self.cfg.vocab_size, self.cfg.hidden_size)}")
        self.embed_tokens.set_value(jnp.asarray(embed_VH, _DTYPES[self.cfg.param_dtype]))

    def set_vocab(self, d2t) -> None:
        """Install a draft->target offset table (Vd,) and derive t2d from it."""
        d2t = np.asarray(d2t, np.int64)
        if d2t.shape != (self.cfg.vd,):
            raise ValueError(f"d2t shape {d2t.shape} != (draft_vocab_size,) {(self.cfg.vd,)}")
        ids = np.arange(self.cfg.vd) + d2t
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size or len(set(ids.tolist())) != ids.size:
            raise ValueError("d2t must map draft ids to distinct target ids in [0, vocab_size)")
        t2d = np.zeros(self.cfg.vocab_size, bool)
        t2d[ids] = True
        self.d2t.set_value(jnp.asarray(d2t, jnp.int32))
        self.t2d.set_value(jnp.asarray(t2d))


def head_from_target(cfg: DraftConfig, d2t: np.ndarray, lm_head_VH: np.ndarray, norm_H: np.ndarray) -> dict:
    """Day-0 start from the target, as flat {path: array}: `lm_head` = the target's output rows of the
    draft vocabulary and `norm` = the target's final norm, so the draft writes into the target's own
    output space from step 0; `fc` passes the highest aux feature (the residual stream entering layer
    n-3) through. The layer itself stays random: slot t sees the target's features of t-1 (which
    predicted x_t) and x_t's embedding, and has to learn the step to x_{t+1}."""
    H, Vd = cfg.hidden_size, cfg.vd
    lm_head_VH, norm_H = np.asarray(lm_head_VH, np.float32), np.asarray(norm_H, np.float32)
    if lm_head_VH.shape != (cfg.vocab_size, H) or norm_H.shape != (H,):
        raise ValueError(f"target head {lm_head_VH.shape} / norm {norm_H.shape} do not fit the draft "
                         f"(vocab_size {cfg.vocab_size}, hidden_size {H})")
    out = {"lm_head.kernel": lm_head_VH[np.arange(Vd) + np.asarray(d2t)].T, "norm.weight": norm_H}
    if cfg.ht == H:
        fc = np.zeros((3 * H, H), np.float32)
        fc[2 * H:] = np.eye(H, dtype=np.float32)
        out["fc.kernel"] = fc
    return out


def target_to_draft(d2t: np.ndarray, vocab_size: int) -> np.ndarray:
    """[V] int32: draft id of each target token, -1 where the draft vocabulary lacks it."""
    d2t = np.asarray(d2t)
    out = np.full(vocab_size, -1, np.int32)
    out[np.arange(d2t.size) + d2t] = np.arange(d2t.size, dtype=np.int32)
    return out


def flat_state(state: nnx.State) -> dict[str, nnx.Variable]:
    """{'midlayer.self_attn.q_proj.kernel': Variable, ...}, keyed like `bridge.eagle3.TABLE`; the
    Variables are the state's own, so `set_value` on them updates it."""
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def flat_variables(model: Eagle3Draft) -> dict[str, jax.Array]:
    """{'midlayer.self_attn.q_proj.kernel': array, ...}: every variable of the model."""
    return {k: v.get_value() for k, v in flat_state(nnx.state(model)).items()}


def load_flat(model: Eagle3Draft, flat: dict[str, np.ndarray]) -> None:
    """Overwrite the model's variables from a flat dict (e.g. an imported HF checkpoint).

    Every key must name an existing variable with the same shape; missing ones keep their value
    (an EAGLE3 checkpoint without `embed_tokens` keeps the target's embedding)."""
    state = nnx.state(model)
    by_path = flat_state(state)
    for k, a in flat.items():
        if k not in by_path:
            raise KeyError(f"draft has no variable {k!r}")
        v = by_path[k]
        old = v.get_value()
        if tuple(a.shape) != tuple(old.shape):
            raise ValueError(f"{k}: shape {list(a.shape)} != model's {list(old.shape)}")
        v.set_value(jnp.asarray(np.asarray(a), old.dtype))
    nnx.update(model, state)
