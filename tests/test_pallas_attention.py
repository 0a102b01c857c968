"""The Pallas tree-attention kernel (interpret mode on CPU) against the jnp reference.

Random packed rows (fixed seeds, plus one fresh seed that is printed): several requests per row,
each a trunk plus a random tree (chains, wide trees, nodes hung at the first trunk slot so they see two keys), padding slots,
sequence lengths that are not multiples of the block, GQA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.pallas_attention import select_attention, tree_attention_pallas
from aurora_jax.random_trees import random_meta
from aurora_jax.tree_attention import tree_attention, tree_mask


def _rng(seed: int | None) -> np.random.Generator:
    """A fixed seed (reproducible), or None: a fresh one, printed so a failure can be replayed."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
        print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def _qkv(rng, B, Nq, Nk, Hq, Hkv, hd, dtype):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return f(B, Nq, Hq, hd), f(B, Nk, Hkv, hd), f(B, Nk, Hkv, hd)


CASES = [  # B, N, Hq, Hkv, hd, D, shape, block
    (2, 37, 4, 2, 16, 3, "mixed", 16),
    (1, 50, 2, 2, 8, 5, "chain", 16),
    (2, 29, 4, 1, 8, 2, "wide", 8),
    (1, 70, 4, 2, 16, 4, "mixed", 32),
]


@pytest.mark.parametrize("tiled", [False, True], ids=["looped", "tiled"])
@pytest.mark.parametrize("seed,B,N,Hq,Hkv,hd,D,shape,block",
                         [(i, *c) for i, c in enumerate(CASES)] + [(None, *CASES[0])])  # + one fresh seed
def test_forward_and_gradients_match_the_reference(seed, B, N, Hq, Hkv, hd, D, shape, block, tiled):
    """Both drivers of the same block math: looped (GPU) and tiled over the grid (TPU)."""
    rng = _rng(seed)
    meta = random_meta(rng, B, N, D, shape)
    q, k, v = _qkv(rng, B, N, N, Hq, Hkv, hd, jnp.float32)
    kern = lambda q, k, v: tree_attention_pallas(q, k, v, meta, meta, block_q=block, block_k=block,  # noqa: E731
                                                 interpret=True, tiled=tiled)
    ref = lambda q, k, v: tree_attention(q, k, v, meta, meta)  # noqa: E731
    np.testing.assert_allclose(kern(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * w))  # noqa: E731
    g_kern = jax.grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_kern, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")
    # padding queries see nothing: zeros, as in the reference
    pad = np.asarray(meta.seg) < 0
    assert np.all(np.asarray(kern(q, k, v))[pad] == 0)


@pytest.mark.parametrize("tiled", [False, True], ids=["looped", "tiled"])
def test_query_slice_against_a_longer_key_prefix_bf16(tiled):
    """As in the TTT loss: block j's queries attend over all slots of blocks 0..j (global anc indices)."""
    rng = _rng(11)
    B, N, Hq, Hkv, hd, D = 2, 45, 4, 2, 16, 4
    meta = random_meta(rng, B, N, D)
    lo, hi = 20, 45
    qm, km = meta.slice(lo, hi), meta
    q, k, v = _qkv(rng, B, hi - lo, N, Hq, Hkv, hd, jnp.bfloat16)
    got = tree_attention_pallas(q, k, v, qm, km, block_q=16, block_k=16, interpret=True, tiled=tiled)
    want = tree_attention(q, k, v, qm, km)
    # the same kernel computation on exactly rounded inputs in f32: what bf16 may lose is input rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    gk = jax.grad(lambda k: jnp.sum(tree_attention_pallas(q, k, v, qm, km, block_q=16, block_k=16,
                                                          interpret=True, tiled=tiled).astype(jnp.float32)))(k)
    gr = jax.grad(lambda k: jnp.sum(tree_attention(q, k, v, qm, km).astype(jnp.float32)))(k)
    assert gk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gk, np.float32), np.asarray(gr, np.float32), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("tiled", [False, True], ids=["looped", "tiled"])
def test_nodes_that_see_few_keys_and_skipped_blocks(tiled):
    """A node hung at its request's first trunk slot sees exactly two keys; with skipping on or off
    the result is the same, and every output element (poisoned with NaN first) is written."""
    rng = _rng(12)
    meta = random_meta(rng, 1, 64, 3)
    seg, attach, anc = (np.asarray(x) for x in (meta.seg, meta.attach, meta.anc))
    seen = np.asarray(tree_mask(meta, meta))[0].sum(-1)
    real = seg[0] >= 0
    assert (seen[~real] == 0).all() and (seen[real] >= 1).all()
    first_slot = np.array([np.flatnonzero(seg[0] == seg[0, i])[0] if real[i] else -1 for i in range(64)])
    hung_at_first = real & (anc[0, :, 0] == np.arange(64)) & (attach[0] == first_slot) & (attach[0] != np.arange(64))
    assert (seen[hung_at_first] == 2).all()
    q, k, v = _qkv(rng, 1, 64, 64, 2, 2, 8, jnp.float32)
    outs = [tree_attention_pallas(q, k, v, meta, meta, block_q=8, block_k=8, interpret=True, skip_empty=s,
                                  tiled=tiled, _poison=True) for s in (True, False)]
    assert not np.isnan(np.asarray(outs[0])).any()
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[0], tree_attention(q, k, v, meta, meta), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda q, k, v: jnp.sum(tree_attention_pallas(q, k, v, meta, meta, block_q=8, block_k=8,
                                                               interpret=True, tiled=tiled, _poison=True)),
                 (0, 1, 2))(q, k, v)
    assert not any(np.isnan(np.asarray(x)).any() for x in g)


def test_poison_check_can_fail():
    """With poisoning on, an output the kernel does not write stays NaN (so the checks above bite)."""
    from jax.experimental import pallas as pl

    from aurora_jax import pallas_attention as pa
    x = jnp.ones((8, 8), jnp.float32)
    spec = pl.BlockSpec((8, 8), lambda i: (0, 0))
    cfg = pa.KernelConfig(interpret=True, poison=True)
    (o,) = pa._call(lambda x_ref, o_ref: None, cfg, grid=(1,), in_specs=[spec], out_specs=[spec],
                    out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)], args=(x,), name="writes_nothing")
    assert np.isnan(np.asarray(o)).all()


@pytest.mark.parametrize("lowering,platform,call", [("cuda", "gpu", "__gpu$xla.gpu.triton"),
                                                    ("tpu", "tpu", "tpu_custom_call")])
def test_kernels_lower_for_gpu_and_tpu(lowering, platform, call):
    """Forward and backward lower to Triton (GPU) and Mosaic (TPU) from this CPU machine, with the
    kernel's settings taken from the platform lowered for: the module holds the real kernel calls,
    not the interpreter's loop (compiling and running them needs the device: `bench attention`)."""
    meta = random_meta(np.random.default_rng(0), 2, 200, 5)
    q, k = jnp.zeros((2, 200, 8, 64), jnp.bfloat16), jnp.zeros((2, 200, 2, 64), jnp.bfloat16)
    attention = select_attention("auto", platform)
    f = lambda q, k, v: jnp.sum(attention(q, k, v, meta, meta).astype(jnp.float32))  # noqa: E731
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=(lowering,)).as_text()
    assert text.count(call) >= 3, f"expected the fwd, dq and dkv kernels as {call}"
    for name in ("tree_attention_fwd", "tree_attention_dq", "tree_attention_dkv"):
        assert name in text, name
    if platform == "tpu":  # blocks of 128 lanes: 200 slots pad to 256
        assert "256x64xbf16" in text


def test_select_attention():
    assert select_attention("reference") is tree_attention
    assert select_attention("pallas", "cpu").keywords == {"platform": "cpu"}
    assert select_attention("auto", "tpu").keywords == {"platform": "tpu"}
    assert select_attention("auto", "cpu") is tree_attention
    if jax.default_backend() == "cpu":  # the default platform is this host's
        assert select_attention("auto") is tree_attention
    with pytest.raises(ValueError, match="attention must be one of"):
        select_attention("flash")


def test_ttt_loss_and_parameter_gradients_with_the_kernel():
    """The whole TTT objective on a packed batch of toy traces: loss, metrics and parameter gradients
    with the kernel (interpret) equal the reference's. (The sharded train step with the kernel:
    tests/test_training.py; which attention a config picks: test_select_attention.)"""
    from flax import nnx

    from aurora_jax.model import Eagle3Draft
    from aurora_jax.objective import ObjectiveConfig, loss_fn
    from tests.test_training import CFG, D, _batches

    batch = _batches(1, seed=3)[0]
    model = Eagle3Draft(CFG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    obj = ObjectiveConfig(ttt_length=D)

    def grads(attention):
        f = lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, obj, attention)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    kern = lambda *a: tree_attention_pallas(*a, block_q=16, block_k=16, interpret=True)  # noqa: E731
    (l1, m1), g1 = grads(kern)
    (l2, m2), g2 = grads(tree_attention)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for key in m2:
        np.testing.assert_allclose(m1[key], m2[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves_with_path(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
