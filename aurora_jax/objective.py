"""EAGLE3 training-time test (TTT) over packed trees, and the online-RL loss (docs/design.md section 4).

Step j of TTT computes block j of the batch (see `batching`): its queries attend to the keys
of blocks 0..j (cached as they are computed) under the tree mask, and its hidden inputs are the
draft's own outputs of block j-1, exactly as the draft sees them when it drafts at serve time.
Loss: KL(target top-k || draft) at every labelled slot, weighted `depth_decay ** j`, plus
`reject_weight` * unlikelihood -log(1 - q(token)) of each rejected token at its parent's slot.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from aurora_jax.model import Eagle3Draft
from aurora_jax.pallas_attention import IMPLEMENTATIONS
from aurora_jax.tree_attention import TreeMeta, tree_attention


@dataclasses.dataclass
class ObjectiveConfig:
    ttt_length: int = 5  # D: draft steps simulated per trunk position (Aurora's default)
    reject_weight: float = 0.1  # weight of the unlikelihood term on rejected tokens (0 = off)
    depth_decay: float = 0.8  # loss weight of TTT step j is depth_decay ** j
    train_on_prompt: bool = False  # also learn to predict prompt tokens
    # tree attention: auto (Pallas kernel on GPU/TPU, jnp reference on CPU) | pallas | reference
    attention: str = "auto"

    def __post_init__(self):
        if self.ttt_length < 1:
            raise ValueError("ttt_length must be >= 1")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}")
        if self.reject_weight < 0 or not 0 < self.depth_decay <= 1:
            raise ValueError("reject_weight must be >= 0 and depth_decay in (0, 1]")


def _meta(batch) -> TreeMeta:
    """Per-block metadata stacked along the slot axis: [B, D*N] (global slot order)."""
    def flat(a):  # [D, B, N, ...] -> [B, D*N, ...]
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape(a.shape[0], -1, *a.shape[3:])
    return TreeMeta(flat(batch.seg), flat(batch.tpos), flat(batch.attach), flat(batch.anc))


def ttt_hidden(model: Eagle3Draft, batch, attention: Callable = tree_attention):
    """Run the D TTT steps; pre-norm hidden states of every slot, [D, B, N, H]."""
    D, B, N = batch.tokens.shape
    L = batch.aux.shape[1]
    meta = _meta(batch)
    hidden = model.project(batch.aux)
    hidden = jnp.pad(hidden, ((0, 0), (0, N - L), (0, 0)))
    ks, vs, outs = [], [], []
    for j in range(D):
        q, k, v, res = model.layer_in(batch.tokens[j], hidden, batch.positions[j])
        ks.append(k)
        vs.append(v)
        o = attention(q, jnp.concatenate(ks, 1), jnp.concatenate(vs, 1),
                      meta.slice(j * N, (j + 1) * N), meta.slice(0, (j + 1) * N))
        h = model.layer_out(o, res)
        outs.append(h)
        if j + 1 < D:
            hidden = jnp.take_along_axis(h, batch.parent[j + 1][..., None], axis=1)
    return jnp.stack(outs)


def _block_terms(model, h, label_ids, label_lp, mask, acc_target):
    """Per-slot KL to the (renormalised) target top-k and argmax agreement for one block."""
    logq = jax.nn.log_softmax(model.logits(h), axis=-1)  # [B, N, Vd]
    valid = label_ids >= 0
    lq = jnp.take_along_axis(logq, jnp.maximum(label_ids, 0), axis=-1)
    lp = jnp.where(valid, label_lp, -jnp.inf)
    lp = lp - jax.nn.logsumexp(lp, axis=-1, keepdims=True)
    p = jnp.where(valid, jnp.exp(lp), 0.0)
    kl = jnp.sum(jnp.where(valid, p * (lp - lq), 0.0), axis=-1)
    kl = jnp.where(mask > 0, kl, 0.0)
    correct = (jnp.argmax(logq, axis=-1) == acc_target) & (mask > 0)
    return kl, correct


def loss_fn(model: Eagle3Draft, batch, cfg: ObjectiveConfig, attention: Callable = tree_attention):
    """Scalar loss and a dict of metrics (all jnp scalars) for one batch."""
    D, B, N = batch.tokens.shape
    L = batch.aux.shape[1]
    hs = ttt_hidden(model, batch, attention)
    terms = jax.checkpoint(lambda h, *a: _block_terms(model, h, *a))  # logits recomputed in backward

    weights = jnp.asarray([cfg.depth_decay ** j for j in range(D)], jnp.float32)
    kl_loss, metrics, correct_chain = 0.0, {}, []
    rej_kl, rej_n = 0.0, 0.0
    for j in range(D):
        kl, correct = terms(hs[j], batch.label_ids[j], batch.label_lp[j], batch.loss_mask[j], batch.acc_target[j])
        m = batch.loss_mask[j]
        n = jnp.sum(m)
        kl_loss = kl_loss + weights[j] * jnp.sum(kl) / jnp.maximum(n, 1.0)
        chain_m = m[:, :L]
        metrics[f"acc_d{j}"] = jnp.sum(correct[:, :L]) / jnp.maximum(jnp.sum(chain_m), 1.0)
        correct_chain.append(correct[:, :L])
        rm = batch.rejected[j] & (m > 0)
        rej_kl = rej_kl + jnp.sum(jnp.where(rm, kl, 0.0))
        rej_n = rej_n + jnp.sum(rm)
    kl_loss = kl_loss / jnp.sum(weights)

    # Rejected tokens: the draft proposed them at their parent's slot; push that probability down.
    flat = jnp.moveaxis(hs, 0, 1).reshape(B, D * N, -1)
    h_neg = jnp.take_along_axis(flat, batch.neg_slot[..., None], axis=1)  # [B, M, H]
    logq = jax.nn.log_softmax(model.logits(h_neg), axis=-1)
    q = jnp.exp(jnp.take_along_axis(logq, batch.neg_tok[..., None], axis=-1)[..., 0])
    n_neg = jnp.sum(batch.neg_mask)
    ul = jnp.sum(batch.neg_mask * -jnp.log1p(-jnp.minimum(q, 1.0 - 1e-6))) / jnp.maximum(n_neg, 1.0)
    loss = kl_loss + cfg.reject_weight * ul

    # Offline proxy of acceptance length: 1 + leading run of correct chain predictions per trunk slot.
    run = jnp.cumprod(jnp.stack(correct_chain).astype(jnp.float32), axis=0)  # [D, B, L]
    start = batch.loss_mask[0][:, :L] > 0
    accept = jnp.sum(jnp.where(start, 1.0 + jnp.sum(run, 0), 0.0)) / jnp.maximum(jnp.sum(start), 1.0)
    metrics.update(loss=loss, kl=kl_loss, unlikelihood=ul, kl_rejected=rej_kl / jnp.maximum(rej_n, 1.0),
                   p_rejected=jnp.sum(batch.neg_mask * q) / jnp.maximum(n_neg, 1.0), accept_len=accept,
                   tree_tokens=jnp.sum(batch.seg >= 0).astype(jnp.float32), negatives=n_neg)
    return loss, metrics
