"""The optimizer step: learning a toy target, the reject term, checkpoints, and the 8-device mesh."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from flax import nnx

from aurora_jax.batching import BatchConfig, pack
from aurora_jax.checkpoint import CheckpointConfig, Checkpointer
from aurora_jax.model import DraftConfig, Eagle3Draft, flat_state, target_to_draft
from aurora_jax.objective import ObjectiveConfig
from aurora_jax.train import AverageParamsState, Learner, MeshConfig, OptimConfig, make_mesh
from bridge.synthetic import toy_target_trace

V, HT, D = 64, 16, 3
CFG = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  vocab_size=V, target_hidden_size=HT)
BC = BatchConfig(rows=8, lengths=[64], branch_slots=[0, 32, 64], topk=2)


def _toy(seed=0):
    rng = np.random.default_rng(seed)
    return rng, rng.permutation(V).astype(np.int32), rng.standard_normal((V, 3 * HT)).astype(np.float32)


def _second_choice_rejected(tr, succ):
    """Make every rejected node the target's second choice, succ[context] + 1: a token the KL term
    teaches the draft to give ~10%, so that the reject term has something to push down."""
    for st in tr.steps:
        for j in np.nonzero(~st.accepted)[0]:
            ctx = tr.tokens[st.trunk_pos] if st.parents[j] < 0 else st.tokens[st.parents[j]]
            st.tokens[j] = (succ[ctx] + 1) % V
    return tr


def _batches(n, seed=0, traces=8, second_choice=False):
    rng, succ, feats = _toy(seed)
    to_draft = target_to_draft(np.zeros(V, int), V)
    out = []
    for s in range(n):
        trs = [toy_target_trace(rng, request_id=f"{s}-{i}", succ=succ, features=feats) for i in range(traces)]
        if second_choice:
            trs = [_second_choice_rejected(t, succ) for t in trs]
        out.append(pack(trs, BC, D, to_draft)[0])
    return out


def _learner(devices=1, fsdp=False, reject_weight=0.1, lr=3e-3, attention="auto", model=1, ema_decay=0.0):
    return Learner(Eagle3Draft(CFG, rngs=nnx.Rngs(0)),
                   ObjectiveConfig(ttt_length=D, reject_weight=reject_weight, attention=attention),
                   OptimConfig(lr=lr, warmup_steps=10, ema_decay=ema_decay),
                   make_mesh(MeshConfig(data=devices, model=model)), fsdp=fsdp)


def test_training_on_a_toy_target_drives_per_depth_accuracy_up():
    learner = _learner()
    batches = _batches(150, traces=4)
    first = {k: float(v) for k, v in learner.train_step(batches[0]).items()}
    for b in batches[1:]:
        last = learner.train_step(b)
    last = {k: float(v) for k, v in last.items()}
    for j in range(D):
        assert first[f"acc_d{j}"] < 0.2 and last[f"acc_d{j}"] > 0.7, (j, first, last)
    assert last["accept_len"] > 2.5 > first["accept_len"]
    assert last["kl"] < 0.5 * first["kl"]
    assert learner.compiled_shapes <= 3  # buckets, not one shape per batch


def test_reject_term_lowers_the_rejected_tokens_probability():
    batches = _batches(100, seed=1, traces=4, second_choice=True)
    p = {}
    for w in (0.0, 4.0):
        learner = _learner(reject_weight=w)
        for b in batches:
            m = learner.train_step(b)
        p[w] = float(m["p_rejected"])
        assert float(m["negatives"]) > 0
    assert p[0.0] > 0.03 and p[4.0] < 0.6 * p[0.0], p


def _host(learner):
    return learner.host_params()


def test_checkpoint_restore_is_bit_identical_and_continues_the_same_curve(tmp_path):
    batches = _batches(8, seed=2, traces=4)
    a = _learner()
    for b in batches[:4]:
        a.train_step(b)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt"), async_save=True))
    ck.save(a.step, a.state, {"draft_version": 7})
    ck.close()
    saved = _host(a)
    curve_a = [float(a.train_step(b)["loss"]) for b in batches[4:]]

    b_ = _learner()
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt")))
    state, meta, _, _ = ck.restore(b_.state)
    b_.restore(state)
    ck.close()
    assert meta["draft_version"] == 7 and b_.step == 4
    restored = _host(b_)
    assert saved.keys() == restored.keys()
    for k in saved:
        assert saved[k].dtype == restored[k].dtype and np.array_equal(saved[k], restored[k]), k
    curve_b = [float(b_.train_step(b)["loss"]) for b in batches[4:]]
    assert curve_a == curve_b


def test_ema_decay_publishes_the_debiased_average_of_each_steps_weights_and_checkpoints_it(tmp_path):
    """optim.ema_decay leaves training alone (the live weights follow the same curve) and publishes,
    exports and scores sum_i (1-d) d^(n-1-i) w_i / (1 - d^n) over the weights w_i after each of n steps."""
    d, batches = 0.8, _batches(4, seed=3, traces=4)
    plain, avg = _learner(), _learner(ema_decay=d)
    live = lambda lr: {k: np.asarray(v.get_value()) for k, v in flat_state(lr.state.params).items()}  # noqa: E731
    assert all(np.array_equal(avg.host_params()[k], w) for k, w in live(avg).items())  # nothing averaged yet
    after = []
    for b in batches:
        plain.train_step(b), avg.train_step(b)
        after.append(live(avg))
    n = len(after)
    published = avg.host_params()
    for k, w in live(plain).items():
        np.testing.assert_allclose(after[-1][k], w, rtol=1e-6, atol=1e-7)
        expected = sum((1 - d) * d ** (n - 1 - i) * a[k] for i, a in enumerate(after)) / (1 - d ** n)
        np.testing.assert_allclose(published[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)
        assert not np.allclose(published[k], w), k  # it is not the last step's weights
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt")))
    ck.save(avg.step, avg.state, {"draft_version": 1})
    ck.close()
    back = _learner(ema_decay=d)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt")))
    back.restore(ck.restore(back.state)[0])
    ck.close()
    assert all(np.array_equal(back.host_params()[k], v) for k, v in published.items())
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path / "ckpt")))
    with pytest.raises(ValueError, match=r"resume with the model.\* and optim.\* it was saved with"):
        ck.restore(plain.state)  # saved with the average, resumed without it
    ck.close()


@pytest.mark.parametrize("fsdp,attention", [(False, "auto"), (True, "auto"), (True, "pallas")])
def test_step_on_8_forced_cpu_devices_matches_one_device(fsdp, attention):
    """Data-parallel and FSDP steps equal the one-device step; with the Pallas kernel (interpreted
    here) each device runs it on its own rows, inside the step's shard_map (`train.sharded_attention`)."""
    assert len(jax.devices()) >= 8, "conftest forces 8 host devices"
    batches = _batches(3, seed=3)
    one, eight = _learner(devices=1), _learner(devices=8, fsdp=fsdp, attention=attention)
    for b in batches:
        m1, m8 = one.train_step(b), eight.train_step(b)
        np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    p1, p8 = _host(one), _host(eight)
    for k in p1:
        np.testing.assert_allclose(p1[k], p8[k], rtol=1e-4, atol=1e-6, err_msg=k)
    leaf = eight.state.params["midlayer"]["self_attn"]["q_proj"]["kernel"].get_value()
    assert len(leaf.sharding.device_set) == 8
    if fsdp:  # parameters really are split, not replicated
        assert leaf.addressable_shards[0].data.shape != leaf.shape
    with pytest.raises(ValueError, match="not divisible by this process.s 8 devices on the data axis"):
        eight.train_step(pack(toy_target_trace_batch := [toy_target_trace(np.random.default_rng(0), request_id="x",
                                                                          succ=np.arange(V), features=np.zeros((V, 3 * HT)))],
                              BatchConfig(rows=2, lengths=[64], branch_slots=[0, 32], topk=2), D,
                              target_to_draft(np.zeros(V, int), V))[0])


def test_shardings_come_from_the_models_partition_metadata():
    """A 4 x 2 (data x model) mesh with FSDP: each kernel's hidden ("embed") dim over data, lm_head's
    vocabulary over model, norms whole; Adam's moments and the weights' moving average sharded like
    their parameter; and the step, and the averaged weights published, equal the one-device ones."""
    one, mesh8 = _learner(devices=1, ema_decay=0.9), _learner(devices=4, model=2, fsdp=True, ema_decay=0.9)
    spec = lambda tree, *path: tree[path[0]] if len(path) == 1 else spec(tree[path[0]], *path[1:])  # noqa: E731
    params = mesh8.state.params
    assert spec(params, "lm_head", "kernel").get_value().sharding.spec == P("data", "model")
    assert spec(params, "fc", "kernel").get_value().sharding.spec == P(None, "data")
    assert spec(params, "midlayer", "mlp", "down_proj", "kernel").get_value().sharding.spec == P(None, "data")
    assert spec(params, "norm", "weight").get_value().sharding.spec == P()
    moments = [s for s in jax.tree.leaves(mesh8.state.opt_state) if getattr(s, "ndim", 0) == 2]
    assert moments and {m.sharding.spec for m in moments} <= {P("data", "model"), P(None, "data"), P("data")}
    assert any(m.sharding.spec == P("data", "model") for m in moments)  # lm_head's moments
    averages = [s.ema for s in jax.tree.leaves(mesh8.state.opt_state, is_leaf=lambda x: isinstance(x, AverageParamsState))
                if isinstance(s, AverageParamsState)]
    assert len(averages) == 1
    assert spec(averages[0], "lm_head", "kernel").get_value().sharding.spec == P("data", "model")
    for b in _batches(2, seed=5):
        np.testing.assert_allclose(float(one.train_step(b)["loss"]), float(mesh8.train_step(b)["loss"]), rtol=1e-5)
    p1, p8 = _host(one), _host(mesh8)
    for k in p1:
        np.testing.assert_allclose(p1[k], p8[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_bf16_activations_with_f32_master_weights():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    learner = Learner(Eagle3Draft(cfg, rngs=nnx.Rngs(0)), ObjectiveConfig(ttt_length=D), OptimConfig(lr=3e-3),
                      make_mesh(MeshConfig(data=1)))
    losses = [float(learner.train_step(b)["loss"]) for b in _batches(30, seed=4, traces=4)]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(v.dtype == np.float32 for k, v in learner.host_params().items() if "kernel" in k)
