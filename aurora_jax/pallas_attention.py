"""Tree attention as Pallas kernels: flash-style forward and backward, mask built in-kernel.

Why a kernel: the reference (`tree_attention.py`) materialises scores and an [N, N] mask per
head; the TTT loss runs D such attentions over growing key sets. Here each program owns one block
of queries (or, in the dk/dv pass, of keys) for one head and walks the other axis block by block
with an online softmax in f32. The visibility of a (query block, key block) pair is evaluated from
the compact metadata (seg, trunk index, attach point, ancestor list; see `tree_attention.py`)
inside the kernel, and blocks no query can see are skipped. GQA: query head h reads kv head
h // (Hq / Hkv); dk/dv are produced per query head and summed over each group outside.

Lowerings: Triton on GPU, Mosaic on TPU, `interpret=True` on CPU (the default there; slow, for
tests). Rows that see no key (padding) output zeros, as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from aurora_jax.tree_attention import TreeMeta, tree_attention

NEG = -1e30  # masked score (finite: an all-masked block must not produce inf - inf)
EMPTY_LSE = 1e30  # log-sum-exp of a row that sees nothing: exp(s - lse) == 0 in the backward


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_q: int = 64
    block_k: int = 64
    interpret: bool = False
    scale: float = 1.0
    skip_empty: bool = True  # skip key blocks that no query of the block can see
    poison: bool = False  # tests: outputs start as NaN buffers (aliased), so any unwritten element shows


def _visible(q_seg, q_att, q_anc, k_seg, k_tpos, k_idx):
    """bool [bq, bk]: same request and (trunk key at or before the attach point, or an ancestor)."""
    same = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] >= 0)
    vis = (k_tpos[None, :] >= 0) & (k_tpos[None, :] <= q_att[:, None])
    for row in q_anc:  # D rows of ancestor slot indices, -1 padded
        vis = vis | (row[:, None] == k_idx[None, :])
    return same & vis


def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _any(vis):
    return jnp.max(vis.astype(jnp.int32)) > 0


def _maybe(cfg: KernelConfig, vis, f, carry):
    return lax.cond(_any(vis), f, lambda c: c, carry) if cfg.skip_empty else f(carry)


def _key_blocks(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth: int, bk: int):
    """For a program that owns one query block: key block j -> (its slice, visibility [bq, bk])."""
    q_seg, q_att = qseg_ref[0, :], qatt_ref[0, :]
    q_anc = [qanc_ref[d, :] for d in range(depth)]

    def at(j):
        sl = pl.ds(j * bk, bk)
        return sl, _visible(q_seg, q_att, q_anc, kseg_ref[0, sl], ktpos_ref[0, sl], j * bk + lax.iota(jnp.int32, bk))
    return at


# ------------------------------------------------------------------ forward

def _fwd_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                cfg: KernelConfig, depth: int, num_k_blocks: int):
    q = q_ref[...]
    key_block = _key_blocks(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k)

    def body(j, carry):
        sl, vis = key_block(j)

        def update(carry):
            acc, m, l = carry
            v = v_ref[sl, :]
            s = jnp.where(vis, _dot(q, k_ref[sl, :], 1, 1) * cfg.scale, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
            return acc, m_new, l * alpha + jnp.sum(p, axis=1)
        return _maybe(cfg, vis, update, carry)

    bq = cfg.block_q
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_k_blocks, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)[None, :]


# ------------------------------------------------------------------ backward

def _dq_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, cfg: KernelConfig, depth: int, num_k_blocks: int):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[0, :], delta_ref[0, :]
    key_block = _key_blocks(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k)

    def body(j, dq):
        sl, vis = key_block(j)

        def update(dq):
            k = k_ref[sl, :]
            p = jnp.where(vis, jnp.exp(_dot(q, k, 1, 1) * cfg.scale - lse[:, None]), 0.0)
            ds = p * (_dot(do, v_ref[sl, :], 1, 1) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k, 1, 0)
        return _maybe(cfg, vis, update, dq)

    dq = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: KernelConfig, depth: int, num_q_blocks: int):
    bq, bk = cfg.block_q, cfg.block_k
    k, v = k_ref[...], v_ref[...]
    k_seg, k_tpos = kseg_ref[0, :], ktpos_ref[0, :]
    k_idx = pl.program_id(2) * bk + lax.iota(jnp.int32, bk)

    def body(i, carry):
        sl = pl.ds(i * bq, bq)
        vis = _visible(qseg_ref[0, sl], qatt_ref[0, sl], [qanc_ref[d, sl] for d in range(depth)], k_seg, k_tpos,
                       k_idx)

        def update(carry):
            dk, dv = carry
            q, do = q_ref[sl, :], do_ref[sl, :]
            p = jnp.where(vis, jnp.exp(_dot(q, k, 1, 1) * cfg.scale - lse_ref[0, sl][:, None]), 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
            ds = p * (_dot(do, v, 1, 1) - delta_ref[0, sl][:, None])
            return dk + _dot(ds.astype(q.dtype), q, 0, 0), dv
        return _maybe(cfg, vis, update, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------ calls on padded inputs

def _meta_args(qm: TreeMeta, km: TreeMeta):
    """[B, 1, N] rows and anc as [B, D, N]: TPU blocks want their last two dims (8, 128)-tiled or whole."""
    return qm.seg[:, None], qm.attach[:, None], jnp.swapaxes(qm.anc, 1, 2), km.seg[:, None], km.tpos[:, None]


def _specs(hd: int, D: int):
    """Block specs by kind; q/k/v/o are head-major [B, H, N, hd], softmax stats [B, H, 1, N]."""
    return dict(
        row=lambda n, f: pl.BlockSpec((None, 1, n), f),
        anc=lambda n, f: pl.BlockSpec((None, D, n), f),
        heads=lambda n, f: pl.BlockSpec((None, None, n, hd), f),
        stat=lambda n, f: pl.BlockSpec((None, None, 1, n), f))


def _compiler_params():
    if jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    return None


def _call(kernel, cfg: KernelConfig, grid, in_specs, out_specs, out_shape, args, name):
    """pallas_call; with `cfg.poison` the outputs are NaN-filled buffers aliased in, so an element the
    kernel never writes stays NaN (interpret mode keeps aliased contents)."""
    if not cfg.poison:
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              interpret=cfg.interpret, compiler_params=_compiler_params(), name=name)(*args)
    n_in, n_out = len(args), len(out_shape)
    poisoned = [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]

    def drop_aliased(*refs):
        kernel(*refs[:n_in], *refs[n_in + n_out:])
    return pl.pallas_call(drop_aliased, grid=grid, in_specs=list(in_specs) + list(out_specs), out_specs=out_specs,
                          out_shape=out_shape, input_output_aliases={n_in + i: i for i in range(n_out)},
                          interpret=cfg.interpret, name=name)(*args, *poisoned)


def _forward(q, k, v, qm, km, cfg: KernelConfig):
    B, Hq, Nq, hd = q.shape
    Hkv, Nk, D = k.shape[1], k.shape[2], qm.anc.shape[-1]
    g, bq = Hq // Hkv, cfg.block_q
    S = _specs(hd, D)
    q_blk, k_all = (lambda b, h, i: (b, 0, i)), (lambda b, h, i: (b, 0, 0))
    return _call(
        functools.partial(_fwd_kernel, cfg=cfg, depth=D, num_k_blocks=Nk // cfg.block_k), cfg, grid=(B, Hq, Nq // bq),
        in_specs=[S["row"](bq, q_blk), S["row"](bq, q_blk), S["anc"](bq, q_blk), S["row"](Nk, k_all),
                  S["row"](Nk, k_all), S["heads"](bq, lambda b, h, i: (b, h, i, 0)),
                  S["heads"](Nk, lambda b, h, i: (b, lax.div(h, g), 0, 0)), S["heads"](Nk, lambda b, h, i: (b, lax.div(h, g), 0, 0))],
        out_specs=[S["heads"](bq, lambda b, h, i: (b, h, i, 0)), S["stat"](bq, lambda b, h, i: (b, h, 0, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, 1, Nq), jnp.float32)],
        args=(*_meta_args(qm, km), q, k, v), name="tree_attention_fwd")


def _backward(q, k, v, qm, km, o, lse, do, cfg: KernelConfig):
    B, Hq, Nq, hd = q.shape
    Hkv, Nk, D = k.shape[1], k.shape[2], qm.anc.shape[-1]
    g, bq, bk = Hq // Hkv, cfg.block_q, cfg.block_k
    S = _specs(hd, D)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1)[:, :, None]  # [B, Hq, 1, Nq]
    meta = _meta_args(qm, km)
    q_blk, k_all = (lambda b, h, i: (b, 0, i)), (lambda b, h, i: (b, 0, 0))
    mine, kv_all = (lambda b, h, i: (b, h, i, 0)), (lambda b, h, i: (b, lax.div(h, g), 0, 0))
    (dq,) = _call(
        functools.partial(_dq_kernel, cfg=cfg, depth=D, num_k_blocks=Nk // bk), cfg, grid=(B, Hq, Nq // bq),
        in_specs=[S["row"](bq, q_blk), S["row"](bq, q_blk), S["anc"](bq, q_blk), S["row"](Nk, k_all),
                  S["row"](Nk, k_all), S["heads"](bq, mine), S["heads"](Nk, kv_all), S["heads"](Nk, kv_all),
                  S["heads"](bq, mine), S["stat"](bq, lambda b, h, i: (b, h, 0, i)),
                  S["stat"](bq, lambda b, h, i: (b, h, 0, i))],
        out_specs=[S["heads"](bq, mine)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        args=(*meta, q, k, v, do, lse, delta), name="tree_attention_dq")
    k_blk, q_all = (lambda b, h, j: (b, 0, j)), (lambda b, h, j: (b, 0, 0))
    kv_mine, q_heads = (lambda b, h, j: (b, lax.div(h, g), j, 0)), (lambda b, h, j: (b, h, 0, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, depth=D, num_q_blocks=Nq // bq), cfg, grid=(B, Hq, Nk // bk),
        in_specs=[S["row"](Nq, q_all), S["row"](Nq, q_all), S["anc"](Nq, q_all), S["row"](bk, k_blk),
                  S["row"](bk, k_blk), S["heads"](Nq, q_heads), S["heads"](bk, kv_mine), S["heads"](bk, kv_mine),
                  S["heads"](Nq, q_heads), S["stat"](Nq, lambda b, h, j: (b, h, 0, 0)),
                  S["stat"](Nq, lambda b, h, j: (b, h, 0, 0))],
        out_specs=[S["heads"](bk, lambda b, h, j: (b, h, j, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, Hq, Nk, hd), k.dtype)] * 2,
        args=(*meta, q, k, v, do, lse, delta), name="tree_attention_dkv")
    group = lambda x: x.reshape(B, Hkv, g, Nk, hd).astype(jnp.float32).sum(2).astype(k.dtype)  # noqa: E731
    return dq, group(dk), group(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, qm, km, cfg):
    return _forward(q, k, v, qm, km, cfg)[0]


def _attention_fwd(q, k, v, qm, km, cfg):
    o, lse = _forward(q, k, v, qm, km, cfg)
    return o, (q, k, v, qm, km, o, lse)


def _attention_bwd(cfg, res, do):
    q, k, v, qm, km, o, lse = res
    dq, dk, dv = _backward(q, k, v, qm, km, o, lse, do, cfg)
    zero = lambda m: jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), m)  # noqa: E731
    return dq, dk, dv, zero(qm), zero(km)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------ public entry

def _pad_to(x, axis: int, n: int, value):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tree_attention_pallas(q, k, v, q_meta: TreeMeta, k_meta: TreeMeta, *, scale: float | None = None,
                          block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None,
                          skip_empty: bool = True, _poison: bool = False):
    """Drop-in for `tree_attention.tree_attention` (same arguments and result), differentiable.

    Sequences are padded to whole blocks (padding slots have seg -1 and see nothing), the ancestor
    list to a power of two; blocks (default 64, 128 on TPU) shrink to the (power-of-two) sequence
    length when it is shorter.
    """
    B, Nq, Hq, hd = q.shape
    Nk = k.shape[1]
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {k.shape[2]}")
    block = 128 if jax.default_backend() == "tpu" else 64  # Mosaic tiles lanes by 128
    bq, bk = min(block_q or block, _pow2(Nq)), min(block_k or block, _pow2(Nk))
    nq, nk = -(-Nq // bq) * bq, -(-Nk // bk) * bk
    D = _pow2(q_meta.anc.shape[-1])
    pad_meta = lambda m, n: TreeMeta(_pad_to(m.seg, 1, n, -1), _pad_to(m.tpos, 1, n, -1),  # noqa: E731
                                     _pad_to(m.attach, 1, n, -1), _pad_to(_pad_to(m.anc, 1, n, -1), 2, D, -1))
    cfg = KernelConfig(bq, bk, jax.default_backend() == "cpu" if interpret is None else interpret,
                       hd ** -0.5 if scale is None else float(scale), skip_empty, _poison)
    heads = lambda x, n: jnp.swapaxes(_pad_to(x, 1, n, 0), 1, 2)  # noqa: E731  [B, H, N, hd]
    o = _attention(heads(q, nq), heads(k, nk), heads(v, nk), pad_meta(q_meta, nq), pad_meta(k_meta, nk), cfg)
    return jnp.swapaxes(o, 1, 2)[:, :Nq]


IMPLEMENTATIONS = ("auto", "reference", "pallas")


def select_attention(name: str = "auto") -> Callable:
    """`auto`: the Pallas kernel on GPU/TPU, the jnp reference on CPU (interpret mode is for tests)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name == "auto":
        name = "reference" if jax.default_backend() == "cpu" else "pallas"
    return tree_attention if name == "reference" else tree_attention_pallas
