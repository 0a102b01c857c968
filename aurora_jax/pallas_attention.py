"""Tree attention as Pallas kernels: flash-style forward and backward, mask built in-kernel.

Why a kernel: the reference (`tree_attention.py`) materialises scores and an [N, N] mask per
head; the TTT loss runs D such attentions over growing key sets. Here each program owns one block
of queries (or, in the dk/dv pass, of keys) for one head and walks the other axis block by block
with an online softmax in f32. The visibility of a (query block, key block) pair is evaluated from
the compact metadata (seg, trunk index, attach point, ancestor list; see `tree_attention.py`)
inside the kernel, and blocks no query can see are skipped. GQA: query head h reads kv head
h // (Hq / Hkv); dk/dv are produced per query head and summed over each group outside.

Lowerings: Triton on GPU, Mosaic on TPU, `interpret=True` on CPU (the default there; slow, for
tests), chosen by the platform lowered for (`platform`), not by the host that lowers. Rows that see no key (padding) output zeros, as in the reference.
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
    platform: str = "cpu"  # what the call is lowered for (cpu | gpu | tpu), not necessarily this host
    tiled: bool = False  # walk the other axis as a grid axis with scratch state (TPU: VMEM independent of N)
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


# ------------------------------------------------------------------ per-block math (both drivers)

def _fwd_block(q, k, v, vis, carry, scale: float):
    """Online-softmax update of (acc, m, l) with one key block."""
    acc, m, l = carry
    s = jnp.where(vis, _dot(q, k, 1, 1) * scale, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    return acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0), m_new, l * alpha + jnp.sum(p, axis=1)


def _fwd_finish(acc, m, l):
    """(output, log-sum-exp) of a query block; a row that saw nothing gets zeros and EMPTY_LSE."""
    o = acc / jnp.where(l > 0, l, 1.0)[:, None]
    return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)


def _dq_block(q, k, v, do, lse, delta, vis, dq, scale: float):
    p = jnp.where(vis, jnp.exp(_dot(q, k, 1, 1) * scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, 1, 1) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)


def _dkv_block(q, k, v, do, lse, delta, vis, carry, scale: float):
    dk, dv = carry
    p = jnp.where(vis, jnp.exp(_dot(q, k, 1, 1) * scale - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    ds = p * (_dot(do, v, 1, 1) - delta[:, None])
    return dk + _dot(ds.astype(q.dtype), q, 0, 0), dv


# ------------------------------------------------------------------ looped kernels (GPU, CPU)
# One program per (row, head, block); the other axis is walked inside by a loop over the whole
# K/V (or q/dO) of the head. On GPU those refs are global memory and each slice is a load.

def _fwd_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                cfg: KernelConfig, depth: int, num_k_blocks: int):
    q = q_ref[...]
    key_block = _key_blocks(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k)

    def body(j, carry):
        sl, vis = key_block(j)
        return _maybe(cfg, vis, lambda c: _fwd_block(q, k_ref[sl, :], v_ref[sl, :], vis, c, cfg.scale), carry)

    bq = cfg.block_q
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    o, lse = _fwd_finish(*lax.fori_loop(0, num_k_blocks, body, init))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[None, :]


def _dq_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, cfg: KernelConfig, depth: int, num_k_blocks: int):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[0, :], delta_ref[0, :]
    key_block = _key_blocks(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k)

    def body(j, dq):
        sl, vis = key_block(j)
        return _maybe(cfg, vis, lambda d: _dq_block(q, k_ref[sl, :], v_ref[sl, :], do, lse, delta, vis, d, cfg.scale),
                      dq)

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
        return _maybe(cfg, vis, lambda c: _dkv_block(q_ref[sl, :], k, v, do_ref[sl, :], lse_ref[0, sl],
                                                     delta_ref[0, sl], vis, c, cfg.scale), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------ tiled kernels (TPU)
# The walked axis is the grid's last ("arbitrary") axis instead: every operand arrives as one
# fixed-size block, pipelined by Pallas, and the running state lives in VMEM scratch from the
# first block of the walk to the last. VMEM use is then independent of Nq and Nk (Mosaic keeps
# only double-buffered blocks), which the looped form is not: it holds a head's whole K/V.

def _walk_visible(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth: int, bk: int, k_block):
    return _visible(qseg_ref[0, :], qatt_ref[0, :], [qanc_ref[d, :] for d in range(depth)], kseg_ref[0, :],
                    ktpos_ref[0, :], k_block * bk + lax.iota(jnp.int32, bk))


def _tiled_walk(cfg: KernelConfig, vis, init, update, finish) -> None:
    """The shape of every tiled kernel: scratch set up at the walk's first block, updated by each
    block some query can see, written out at its last block."""
    step, last = pl.program_id(3), pl.num_programs(3) - 1
    pl.when(step == 0)(init)
    if cfg.skip_empty:
        pl.when(_any(vis))(update)
    else:
        update()
    pl.when(step == last)(finish)


def _fwd_tiled_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                      acc_ref, m_ref, l_ref, *, cfg: KernelConfig, depth: int):
    def init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    def update():
        acc, m, l = _fwd_block(q_ref[...], k_ref[...], v_ref[...], vis, (acc_ref[...], m_ref[0, :], l_ref[0, :]),
                               cfg.scale)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m[None, :], l[None, :]

    def finish():
        o, lse = _fwd_finish(acc_ref[...], m_ref[0, :], l_ref[0, :])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse[None, :]

    vis = _walk_visible(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k, pl.program_id(3))
    _tiled_walk(cfg, vis, init, update, finish)


def _dq_tiled_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                     delta_ref, dq_ref, acc_ref, *, cfg: KernelConfig, depth: int):
    def init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update():
        acc_ref[...] = _dq_block(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[0, :], delta_ref[0, :],
                                 vis, acc_ref[...], cfg.scale)

    def finish():
        dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)

    vis = _walk_visible(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k, pl.program_id(3))
    _tiled_walk(cfg, vis, init, update, finish)


def _dkv_tiled_kernel(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                      delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, cfg: KernelConfig, depth: int):
    def init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update():
        dk_acc[...], dv_acc[...] = _dkv_block(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[0, :],
                                              delta_ref[0, :], vis, (dk_acc[...], dv_acc[...]), cfg.scale)

    def finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    vis = _walk_visible(qseg_ref, qatt_ref, qanc_ref, kseg_ref, ktpos_ref, depth, cfg.block_k, pl.program_id(2))
    _tiled_walk(cfg, vis, init, update, finish)


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


def _compiler_params(cfg: KernelConfig):
    if cfg.interpret:
        return None
    if cfg.platform == "gpu":
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    if cfg.platform == "tpu" and cfg.tiled:  # the walked axis carries scratch state: sequential
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    return None


def _call(kernel, cfg: KernelConfig, grid, in_specs, out_specs, out_shape, args, name, scratch=()):
    """pallas_call; with `cfg.poison` the outputs are NaN-filled buffers aliased in, so an element the
    kernel never writes stays NaN (interpret mode keeps aliased contents)."""
    common = dict(grid=grid, out_specs=out_specs, out_shape=out_shape, scratch_shapes=list(scratch),
                  interpret=cfg.interpret, compiler_params=_compiler_params(cfg), name=name)
    if not cfg.poison:
        return pl.pallas_call(kernel, in_specs=in_specs, **common)(*args)
    n_in, n_out = len(args), len(out_shape)
    poisoned = [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]

    def drop_aliased(*refs):
        kernel(*refs[:n_in], *refs[n_in + n_out:])
    return pl.pallas_call(drop_aliased, in_specs=list(in_specs) + list(out_specs),
                          input_output_aliases={n_in + i: i for i in range(n_out)}, **common)(*args, *poisoned)


class _Walk:
    """Grid and block specs of a kernel whose programs own blocks of one axis (size n_own, blocks
    b_own) and walk the other (n_walk, b_walk): looped, the walked operands come whole; tiled, the
    walk is the grid's last axis and they come one block at a time. Index maps get (b, h, own[, walk])."""

    def __init__(self, cfg: KernelConfig, B: int, H: int, g: int, hd: int, D: int, n_own: int, b_own: int,
                 n_walk: int, b_walk: int):
        self.grid = (B, H, n_own // b_own) + ((n_walk // b_walk,) if cfg.tiled else ())
        self.b_own, self.b_walk = b_own, b_walk if cfg.tiled else n_walk
        self.g, self.S = g, _specs(hd, D)
        self._walk = (lambda ix: ix[3]) if cfg.tiled else (lambda ix: 0)

    def own_rows(self, kind="row"):  # metadata rows of the owned slots
        return self.S[kind](self.b_own, lambda *ix: (ix[0], 0, ix[2]))

    def walk_rows(self, kind="row"):
        return self.S[kind](self.b_walk, lambda *ix: (ix[0], 0, self._walk(ix)))

    def own_heads(self, kv: bool = False):  # kv: read kv head h // g (GQA)
        return self.S["heads"](self.b_own, lambda *ix: (ix[0], lax.div(ix[1], self.g) if kv else ix[1], ix[2], 0))

    def walk_heads(self, kv: bool = False):
        return self.S["heads"](self.b_walk,
                               lambda *ix: (ix[0], lax.div(ix[1], self.g) if kv else ix[1], self._walk(ix), 0))

    def own_stat(self):
        return self.S["stat"](self.b_own, lambda *ix: (ix[0], ix[1], 0, ix[2]))

    def walk_stat(self):
        return self.S["stat"](self.b_walk, lambda *ix: (ix[0], ix[1], 0, self._walk(ix)))


def _vmem(shape, dtype=jnp.float32):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.VMEM(shape, dtype)


def _forward(q, k, v, qm, km, cfg: KernelConfig):
    B, Hq, Nq, hd = q.shape
    Hkv, Nk, D = k.shape[1], k.shape[2], qm.anc.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    w = _Walk(cfg, B, Hq, Hq // Hkv, hd, D, Nq, bq, Nk, bk)
    if cfg.tiled:
        kernel = functools.partial(_fwd_tiled_kernel, cfg=cfg, depth=D)
        scratch = [_vmem((bq, hd)), _vmem((1, bq)), _vmem((1, bq))]
    else:
        kernel, scratch = functools.partial(_fwd_kernel, cfg=cfg, depth=D, num_k_blocks=Nk // bk), []
    return _call(
        kernel, cfg, grid=w.grid,
        in_specs=[w.own_rows(), w.own_rows(), w.own_rows("anc"), w.walk_rows(), w.walk_rows(), w.own_heads(),
                  w.walk_heads(kv=True), w.walk_heads(kv=True)],
        out_specs=[w.own_heads(), w.own_stat()],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, 1, Nq), jnp.float32)],
        args=(*_meta_args(qm, km), q, k, v), name="tree_attention_fwd", scratch=scratch)


def _backward(q, k, v, qm, km, o, lse, do, cfg: KernelConfig):
    B, Hq, Nq, hd = q.shape
    Hkv, Nk, D = k.shape[1], k.shape[2], qm.anc.shape[-1]
    g, bq, bk = Hq // Hkv, cfg.block_q, cfg.block_k
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1)[:, :, None]  # [B, Hq, 1, Nq]
    args = (*_meta_args(qm, km), q, k, v, do, lse, delta)

    w = _Walk(cfg, B, Hq, g, hd, D, Nq, bq, Nk, bk)  # dq: own query blocks, walk key blocks
    if cfg.tiled:
        kernel, scratch = functools.partial(_dq_tiled_kernel, cfg=cfg, depth=D), [_vmem((bq, hd))]
    else:
        kernel, scratch = functools.partial(_dq_kernel, cfg=cfg, depth=D, num_k_blocks=Nk // bk), []
    (dq,) = _call(
        kernel, cfg, grid=w.grid,
        in_specs=[w.own_rows(), w.own_rows(), w.own_rows("anc"), w.walk_rows(), w.walk_rows(), w.own_heads(),
                  w.walk_heads(kv=True), w.walk_heads(kv=True), w.own_heads(), w.own_stat(), w.own_stat()],
        out_specs=[w.own_heads()], out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        args=args, name="tree_attention_dq", scratch=scratch)

    w = _Walk(cfg, B, Hq, g, hd, D, Nk, bk, Nq, bq)  # dk/dv: own key blocks, walk query blocks
    if cfg.tiled:
        kernel = functools.partial(_dkv_tiled_kernel, cfg=cfg, depth=D)
        scratch = [_vmem((bk, hd)), _vmem((bk, hd))]
    else:
        kernel, scratch = functools.partial(_dkv_kernel, cfg=cfg, depth=D, num_q_blocks=Nq // bq), []
    dk, dv = _call(
        kernel, cfg, grid=w.grid,
        in_specs=[w.walk_rows(), w.walk_rows(), w.walk_rows("anc"), w.own_rows(), w.own_rows(), w.walk_heads(),
                  w.own_heads(kv=True), w.own_heads(kv=True), w.walk_heads(), w.walk_stat(), w.walk_stat()],
        out_specs=[w.own_heads()] * 2, out_shape=[jax.ShapeDtypeStruct((B, Hq, Nk, hd), k.dtype)] * 2,
        args=args, name="tree_attention_dkv", scratch=scratch)
    group = lambda x: x.reshape(B, Hkv, g, Nk, hd).astype(jnp.float32).sum(2).astype(k.dtype)  # noqa: E731
    return dq, group(dk), group(dv)


def attention_vmem_bytes(nq: int, nk: int, hd: int, dtype: str, depth: int, platform: str = "tpu",
                         block: int | None = None, tiled: bool | None = None) -> int:
    """VMEM the largest of the three kernels asks for on TPU, estimated from its block shapes: every
    operand block double-buffered (Pallas pipelining), plus scratch (in-kernel temporaries such as
    the [b, b] scores are not counted). Looped kernels hold a head's whole walked axis, so this grows
    with nq/nk; tiled ones do not."""
    b = block or _default_block(platform)
    tiled = platform == "tpu" if tiled is None else tiled
    e = jnp.dtype(dtype).itemsize
    D = _pow2(depth)
    wq, wk = (b, b) if tiled else (_blocking(nq, b)[1], _blocking(nk, b)[1])
    rows = lambda n, d=0: 4 * n * (2 + d)  # noqa: E731  seg + attach (+ anc) or seg + tpos, int32
    blocks = dict(fwd=rows(b, D) + rows(wk) + 2 * e * b * hd + 2 * e * wk * hd + 4 * b,
                  dq=rows(b, D) + rows(wk) + 3 * e * b * hd + 2 * e * wk * hd + 8 * b,
                  dkv=rows(wq, D) + rows(b) + 2 * e * wq * hd + 4 * e * b * hd + 8 * wq)
    scratch = dict(fwd=4 * b * hd + 8 * b, dq=4 * b * hd, dkv=8 * b * hd) if tiled else dict(fwd=0, dq=0, dkv=0)
    return max(2 * blocks[k] + scratch[k] for k in blocks)


def _default_block(platform: str) -> int:
    return 128 if platform == "tpu" else 64  # Mosaic tiles lanes by 128


def _blocking(n: int, block: int) -> tuple[int, int]:
    """(block size, padded length) for n slots: the block shrinks to the power-of-two length when shorter."""
    b = min(block, _pow2(n))
    return b, -(-n // b) * b


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
                          skip_empty: bool = True, platform: str | None = None, tiled: bool | None = None,
                          _poison: bool = False):
    """Drop-in for `tree_attention.tree_attention` (same arguments and result), differentiable.

    Sequences are padded to whole blocks (padding slots have seg -1 and see nothing), the ancestor
    list to a power of two; blocks (default 64, 128 on TPU) shrink to the (power-of-two) sequence
    length when it is shorter. `platform` (cpu | gpu | tpu; default this host's backend) is what the
    call will be lowered for: it picks interpret mode (cpu), block sizes and Triton settings, so that
    a step compiled here for a TPU or GPU mesh holds the real kernel, not the interpreter. `tiled`
    (default: on TPU) walks the other axis block by block through the grid, with VMEM independent of
    the sequence lengths; the looped form (GPU) walks it inside the program over global memory.
    """
    platform = platform or jax.default_backend()
    B, Nq, Hq, hd = q.shape
    Nk = k.shape[1]
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {k.shape[2]}")
    block = _default_block(platform)
    (bq, nq), (bk, nk) = _blocking(Nq, block_q or block), _blocking(Nk, block_k or block)
    D = _pow2(q_meta.anc.shape[-1])
    pad_meta = lambda m, n: TreeMeta(_pad_to(m.seg, 1, n, -1), _pad_to(m.tpos, 1, n, -1),  # noqa: E731
                                     _pad_to(m.attach, 1, n, -1), _pad_to(_pad_to(m.anc, 1, n, -1), 2, D, -1))
    cfg = KernelConfig(bq, bk, platform == "cpu" if interpret is None else interpret,
                       hd ** -0.5 if scale is None else float(scale), skip_empty, platform,
                       platform == "tpu" if tiled is None else tiled, _poison)
    heads = lambda x, n: jnp.swapaxes(_pad_to(x, 1, n, 0), 1, 2)  # noqa: E731  [B, H, N, hd]
    o = _attention(heads(q, nq), heads(k, nk), heads(v, nk), pad_meta(q_meta, nq), pad_meta(k_meta, nk), cfg)
    return jnp.swapaxes(o, 1, 2)[:, :Nq]


IMPLEMENTATIONS = ("auto", "reference", "pallas")


def select_attention(name: str = "auto", platform: str | None = None) -> Callable:
    """The attention for devices of `platform` (default: this host's backend). `auto`: the Pallas
    kernel on GPU/TPU, the jnp reference on CPU (interpret mode is for tests)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    platform = platform or jax.default_backend()
    if name == "auto":
        name = "reference" if platform == "cpu" else "pallas"
    return tree_attention if name == "reference" else functools.partial(tree_attention_pallas, platform=platform)
