"""The publication guard: held-out slice, evaluation gate, NaN guard, rollback, adaptive sync, resume."""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.buffer import BufferConfig, ReplayBuffer, held_out
from aurora_jax.config import WeightSyncConfig
from aurora_jax.guard import GuardConfig, served_worse
from aurora_jax.loop import Trainer
from bridge.synthetic import toy_target_trace
from bridge.torch_io import tensor_to_numpy
from bridge.traces import encode
from serving.weight_sync import WeightSubscriber, WeightSubscriberConfig
from tests.test_train_loop import HT, V, _cfg, _push


def _toy(n, seed=0, tag="t", succ_seed=0):
    """Toy-target traces: x_{t+1} = succ[x_t]; the succ table is fixed by succ_seed (poison: another one)."""
    rng = np.random.default_rng(succ_seed)
    succ, feats = rng.permutation(V).astype(np.int32), rng.standard_normal((V, 3 * HT)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return [dataclasses.replace(toy_target_trace(rng, request_id=f"{tag}{seed}-{i}", succ=succ, features=feats),
                                target_forwards=0) for i in range(n)]  # 0: says nothing about acceptance


def _served(trace, version, accept_length):
    """The trace as serving reports it: drafted by `version`, with this acceptance length."""
    out = int(trace.tokens.shape[0] - trace.prompt_len)
    return dataclasses.replace(trace, draft_version=version, target_forwards=max(1, round(out / accept_length)))


# ------------------------------------------------------------------ the rollback test itself

def test_served_worse_is_a_one_sided_welch_test_with_a_margin():
    cfg = GuardConfig(rollback_requests=4, rollback_margin=0.1, rollback_z=2.0)
    assert served_worse([1.0] * 3, [2.0] * 10, cfg) is None  # too few requests of the new version
    assert served_worse([1.0] * 10, [2.0] * 3, cfg) is None  # ... or before it
    cur, ref = [1.0, 1.2, 1.1, 0.9], [1.6, 1.8, 1.7, 1.5, 1.9]
    v = served_worse(cur, ref, cfg)
    se = math.sqrt(np.var(ref, ddof=1) / 5 + np.var(cur, ddof=1) / 4)
    assert v.worse and v.z == pytest.approx((1.7 - 1.05) / se) and v.current == pytest.approx(1.05)
    assert not served_worse(ref, cur, cfg).worse  # better is never worse
    assert not served_worse([1.62, 1.64, 1.63, 1.61], [1.7, 1.7, 1.7, 1.7], cfg).worse  # drop 0.075 < margin
    noisy = [0.5, 2.9, 0.6, 2.8]  # mean 1.7 - 0.0 ... a drop the spread cannot confirm
    assert not served_worse([x - 0.2 for x in noisy], noisy, cfg).worse


# ------------------------------------------------------------------ the held-out slice

def test_held_out_membership_is_a_stable_hash_of_the_request_id():
    ids = [f"req-{i}" for i in range(4000)]
    picked = [held_out(r, 0.1) for r in ids]
    assert picked == [held_out(r, 0.1) for r in ids] and 0.08 < np.mean(picked) < 0.12
    assert not any(held_out(r, 0.0) for r in ids)
    assert all(held_out(r, 0.2) for r, p in zip(ids, picked) if p)  # a larger fraction keeps the smaller's


def test_held_out_traces_are_never_sampled_and_the_freshest_survive_a_restart(tmp_path):
    cfg = BufferConfig(spool_dir=str(tmp_path / "spool"), holdout_fraction=0.4, holdout_traces=3, max_reuse=100)
    buf = ReplayBuffer(cfg)
    traces = _toy(30)
    for t in traces:
        buf.put(encode(t), t)
    held = [t.request_id for t in traces if held_out(t.request_id, 0.4)]
    assert len(held) > 3
    assert [e.trace.request_id for e in buf.holdout()] == held[-3:]  # the freshest 3, oldest first
    rng = np.random.default_rng(0)
    sampled = {e.trace.request_id for _ in range(50) for e in buf.sample(4, rng)}
    assert sampled == {t.request_id for t in traces} - set(held)
    stats = buf.snapshot_stats()
    assert stats["holdout"] == 3 and stats["buffered"] == 30 - len(held) and stats["consumed"] == len(held) - 3
    buf.close()
    again = ReplayBuffer(cfg)  # recovery: the same slice, the displaced ones stay consumed
    assert [e.trace.request_id for e in again.holdout()] == held[-3:]
    assert len(again.entries()) == 30 - len(held) + 3
    assert not again.wait_for(30 - len(held) + 1, timeout=0.1) and again.wait_for(30 - len(held), timeout=0.1)
    again.close()


# ------------------------------------------------------------------ gate, NaN guard, resume

def _guarded(tmp_path, steps=4, **kw):
    cfg = _cfg(tmp_path, max_steps=steps, sync_every=steps // 2, traces_per_step=4)
    cfg = dataclasses.replace(cfg, buffer=dataclasses.replace(cfg.buffer, holdout_fraction=0.3, holdout_traces=8,
                                                              max_reuse=8),
                              optim=dataclasses.replace(cfg.optim, lr=3e-3, warmup_steps=2),
                              guard=GuardConfig(gate=True, gate_margin=0.05, gate_min_traces=4, **kw))
    published = []
    trainer = Trainer(cfg, publish=lambda v, state: published.append(v))
    return trainer, published


def _params_like(params, fn):
    return jax.tree.map(fn, params)


def test_gate_refuses_a_worse_candidate_and_passes_an_equal_one(tmp_path):
    trainer, published = _guarded(tmp_path, steps=30)
    try:
        _push(trainer.start(), _toy(60))
        trainer.run()
        assert published == [1, 2] and trainer.guard_stats["gate_passed"] >= 1  # v1 unjudged (nothing served)
        assert trainer.last_gate["candidate"] > 1.5, trainer.last_gate  # v2 (30 steps) learned the toy target
        good = trainer.learner.state.params
        rng = np.random.default_rng(1)
        noise = _params_like(good, lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype))
        trainer.learner.reset_params(noise)
        assert trainer.sync() is False and published == [1, 2] and trainer.guard_stats["gate_refused"] == 1
        g = trainer.last_gate
        assert g["candidate"] < g["served"] - 0.05 and g["served_version"] == 2 and g["traces"] >= 4
        trainer.learner.reset_params(trainer.served_params)  # the served weights themselves: equal, so it passes
        assert trainer.sync() is True and published == [1, 2, 3]
        assert trainer.last_gate["candidate"] == pytest.approx(trainer.last_gate["served"])
    finally:
        trainer.close()


def test_non_finite_weights_are_never_published_and_training_continues_from_the_served_ones(tmp_path):
    trainer, published = _guarded(tmp_path)
    try:
        _push(trainer.start(), _toy(40))
        trainer.run()
        served = jax.device_get(trainer.served_params)
        bad = _params_like(trainer.learner.state.params, lambda x: x.at[(0,) * x.ndim].set(jnp.nan))
        trainer.learner.reset_params(bad)
        assert trainer.sync() is False and trainer.guard_stats["nonfinite_refused"] == 1 and published == [1, 2]
        now = jax.device_get(trainer.learner.state.params)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(served)))
    finally:
        trainer.close()


def test_resume_keeps_the_served_statistics_the_slice_and_the_guards_weights(tmp_path):
    trainer, _ = _guarded(tmp_path, rollback=True)
    try:
        address = trainer.start()
        _push(address, _toy(40))
        trainer.run()
        _push(address, [_served(t, 2, 1.5) for t in _toy(6, seed=7, tag="s")])
        trainer.save()
        before = (trainer.served.snapshot(), [e.seq for e in trainer.buffer.holdout()], dict(trainer.guard_stats),
                  jax.device_get(trainer.served_params), trainer.previous[0], trainer.version)
    finally:
        trainer.close()
    cfg = dataclasses.replace(trainer.cfg, loop=dataclasses.replace(trainer.cfg.loop, max_steps=0))
    again = Trainer(cfg, resume=True)
    try:
        assert again.served.snapshot() == before[0] and again.served.snapshot()[2]["requests"] == 6
        assert [e.seq for e in again.buffer.holdout()] == before[1]
        assert again.guard_stats == before[2] and again.version == before[5] and again.previous[0] == before[4]
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(again.served_params)),
                                                        jax.tree.leaves(before[3])))
    finally:
        again.close()


def test_adaptive_sync_waits_while_nothing_gains_and_publishes_by_sync_max_steps(tmp_path):
    """sync_every=2, sync_max_steps=8, a gain no candidate reaches (1.0: candidate and served proxies here
    differ by ~0.01 while their sum is ~2.1, so a gain taken as a sum would publish): v1 at step 2
    (nothing served to compare with), then checks 2, 4 and 8 steps after each publish, publishing at
    the 8th: steps 2, 10, 18."""
    cfg = _cfg(tmp_path, max_steps=20, sync_every=2, traces_per_step=4)
    cfg = dataclasses.replace(cfg, buffer=dataclasses.replace(cfg.buffer, holdout_fraction=0.3, max_reuse=16),
                              loop=dataclasses.replace(cfg.loop, sync_policy="adaptive", sync_gain=1.0, sync_max_steps=8))
    published = []
    trainer = Trainer(cfg, publish=lambda v, state: published.append((v, trainer.learner.step)))
    try:
        _push(trainer.start(), _toy(60))
        trainer.run()
    finally:
        trainer.close()
    assert published == [(1, 2), (2, 10), (3, 18)]
    assert trainer.guard_stats["adaptive_waits"] == 5  # steps 4, 6, 12, 14 and 20
    assert trainer.last_gate["step"] == 20 and not trainer.guard_stats["gate_refused"]


# ------------------------------------------------------------------ rollback through the real WeightSync path

def test_a_version_that_serves_worse_is_rolled_back_through_weightsync(tmp_path):
    """v1 and v2 served well, v3 (trained on poisoned traffic) serves badly: after K of its requests the
    trainer publishes v4 carrying v2's weights; a WeightSync subscriber receives them bit for bit."""
    cfg = _cfg(tmp_path, max_steps=0, sync_every=0, traces_per_step=4)
    cfg = dataclasses.replace(cfg, weight_sync=WeightSyncConfig(address="127.0.0.1:0"),
                              guard=GuardConfig(rollback=True, rollback_requests=6, rollback_margin=0.2))
    trainer = Trainer(cfg)
    got, done = {}, threading.Event()

    def on_version(version, state_dict):
        got[version] = {k: tensor_to_numpy(v).copy() for k, v in state_dict.items()}
        done.set()
    try:
        address = trainer.start()
        sub = WeightSubscriber(WeightSubscriberConfig(address=trainer.weights.address), on_version).start()
        _push(address, _toy(24))
        def wait_for(version):
            deadline = time.monotonic() + 30
            while version not in got and time.monotonic() < deadline:
                done.wait(0.2)
            assert version in got
        for _ in range(2):
            trainer.step()
        trainer.sync()
        trainer.step()
        trainer.sync()  # v2: the weights to come back to
        wait_for(2)
        _push(address, [_served(t, v, 2.0) for v in (1, 2) for t in _toy(8, seed=10 + v, tag=f"v{v}-")])
        _push(address, _toy(24, seed=3, tag="poison", succ_seed=99))  # traffic from another "target"
        for _ in range(6):
            trainer.step()
        trainer.sync()  # v3: trained on the poison
        assert trainer.version == 3 and not trainer.rolled_back
        wait_for(3)
        bad = [_served(t, 3, 1.0) for t in _toy(10, seed=20, tag="v3-")]
        _push(address, bad[:5])
        trainer._check_rollback()
        assert trainer.version == 3  # 5 requests: not judged yet
        _push(address, bad[5:6])
        trainer._check_rollback()  # the 6th request of v3: judged, rolled back
        assert trainer.version == 4 and trainer.rolled_back == {3} and trainer.guard_stats["rollbacks"] == 1
        r = trainer.last_rollback
        assert r["version"] == 3 and r["to_weights_of"] == 2 and r["as_version"] == 4 and r["requests"] == 6
        wait_for(4)
        assert got[4].keys() == got[2].keys()
        assert all(np.array_equal(got[4][k], got[2][k]) for k in got[2])
        assert not all(np.array_equal(got[3][k], got[2][k]) for k in got[2])
        now = jax.device_get(trainer.learner.state.params)  # reset_on_rollback: training goes on from v2
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(now),
                                                        jax.tree.leaves(jax.device_get(trainer.served_params))))
        _push(address, [_served(t, 4, 1.0) for t in _toy(8, seed=30, tag="v4-")])
        trainer._check_rollback()
        assert trainer.version == 4  # nothing left to roll back to
        sub.close()
    finally:
        trainer.close()


# ------------------------------------------------------------------ a real engine serving a bad version

def _repeater_target(path):
    """A tiny Llama whose decoder layers add nothing and whose lm_head is its embedding: its greedy
    continuation repeats the last prompt token. A draft that passes the top aux layer through to the
    same head predicts that exactly, at every depth."""
    import torch
    from transformers import LlamaForCausalLM

    from bench.serve import _tiny_target

    _tiny_target(path)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(path)
    emb = model.model.embed_tokens.weight.detach().numpy()
    normed = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + model.config.rms_norm_eps)
    assert ((normed @ emb.T).argmax(-1) == np.arange(len(emb))).all()  # every token's successor is itself
    return emb


def _repeater_draft(path, target_dir, emb, permute=None):
    from bridge.eagle3 import DraftConfig, draft_fields_from_target, read_target_config, save_hf

    cfg = DraftConfig(**draft_fields_from_target(read_target_config(target_dir)))
    H = cfg.hidden_size
    sd = {k: np.zeros(s, np.float32) for k, s in cfg.shapes().items() if k not in ("embed_tokens.weight", "d2t", "t2d")}
    sd["fc.weight"][:, 2 * H:] = np.eye(H)
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k][:] = 1.0
    sd["lm_head.weight"] = emb[permute] if permute is not None else emb.copy()
    sd["d2t"], sd["t2d"] = np.zeros(cfg.vd, np.int64), np.ones(cfg.vocab_size, bool)
    return save_hf(path, cfg, sd, torch_dtype="float32"), sd


def test_a_real_engine_serving_a_bad_version_gets_the_previous_weights_back(tmp_path):
    """The engine (a real `aurora-jax serve` process) serves v1 (a draft that is always right); v2, whose
    head is scrambled, is published through WeightSync and served: its acceptance drops to 1, and after
    K of its requests the trainer publishes v3 with v1's weights, which the engine swaps in."""
    import httpx

    from apps.demo import _Proc
    from bridge.config import load_config
    from aurora_jax.config import TrainerConfig

    target = tmp_path / "target"
    emb = _repeater_target(target)
    good, _ = _repeater_draft(tmp_path / "draft", target, emb)
    K = 4
    cfg = load_config(TrainerConfig, None, [
        f"target={target}", "ingest.address=127.0.0.1:0", "weight_sync.address=127.0.0.1:0",
        f"buffer.spool_dir={tmp_path / 'spool'}", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=0",
        f"loop.metrics_path={tmp_path / 'train.jsonl'}", "loop.progress=false", f"loop.init_from={good}",
        "loop.publish_initial=true", "loop.sync_every=0", "mesh.data=1", "batch.rows=2", "batch.lengths=[64]",
        "batch.branch_slots=[0,32]", "objective.ttt_length=2", "optim.lr=1e-9", "guard.rollback=true",
        f"guard.rollback_requests={K}", "guard.rollback_margin=0.5"])
    trainer = Trainer(cfg)
    engine = None
    try:
        ingest = trainer.start()
        trainer.step(timeout=0.1)  # the vocabulary is the draft's own: publish_initial has sent v1
        assert trainer.version == 1
        engine = _Proc("engine", [sys.executable, "-m", "apps.cli", "serve", f"target.path={target}",
                                  "target.dtype=float32", "draft.mode=hf", f"draft.path={good}", "spec.topk=2",
                                  "spec.num_steps=3", "spec.num_draft_tokens=4", f"traces.address={ingest}",
                                  "traces.batch_size=1", f"weights.address={trainer.weights.address}",
                                  "subscribe_weights=true", "export_traces=true", "max_running=1", "threads=1", "port=0"],
                       tmp_path / "engine.log")
        url = engine.wait_line("serving on", 120)
        http = httpx.Client(base_url=url, timeout=60)

        def until(cond, what, timeout=60):
            deadline = time.monotonic() + timeout
            while not cond():
                assert time.monotonic() < deadline, what
                trainer.step(timeout=0.05)  # the loop's own work: train on what arrives, judge what is served
                trainer._check_rollback()

        def ask(i):
            r = http.post("/v1/completions", json=dict(prompt=f"line {i}: the quick brown fox", max_tokens=12))
            ext = r.raise_for_status().json()["aurora"]
            return ext["draft_version"], 12 / ext["target_forwards"]  # 3.0 at best: prefill + 3 rounds of 4

        def served_by(version, n=1):  # versions swap in between rounds: ask until one is served by it
            seen = [ask(i) for i in range(n)]
            while seen[-1][0] != version:
                assert len(seen) < 50, f"the engine never served version {version}"
                seen.append(ask(len(seen)))
            return seen

        def arrived(version, n):
            until(lambda: trainer.served.snapshot().get(version, {}).get("requests", 0) >= n,
                  f"the traces of version {version} never arrived")

        warm = served_by(1)
        first = [ask(i) for i in range(K)]
        assert all(v == 1 and al == 3.0 for v, al in first), (warm, first)  # the repeater draft is right at every depth
        arrived(1, K + 1)

        scrambled = jax.tree.map(lambda x: jnp.roll(x, 7, axis=-1) if x.ndim == 2 and x.shape[-1] == emb.shape[0]
                                 else x, trainer.learner.state.params)
        trainer.learner.reset_params(scrambled)
        assert trainer.sync() and trainer.version == 2  # the bad version, through the real WeightSync path
        bad = [x for x in served_by(2) if x[0] == 2]
        while trainer.version == 2:
            arrived(2, len(bad))
            trainer._check_rollback()  # the ingest thread counts arrivals: judge the last one before asking again
            if trainer.version == 2:
                bad.append(ask(100 + len(bad)))
        assert all(v == 2 and al == 1.0 for v, al in bad), bad  # the scrambled head is never right
        assert len(bad) == K and trainer.rolled_back == {2} and trainer.last_rollback["to_weights_of"] == 1
        assert trainer.last_rollback["requests"] == K
        after = served_by(3, n=1)
        after += [ask(200 + i) for i in range(3)]
        assert all(al == 3.0 for v, al in after[-3:]) and after[-1][0] == 3  # v1's weights serve again, as v3
        assert len(warm) + len(first) + len(after) > 0
        http.close()
    finally:
        if engine is not None:
            engine.stop()
        trainer.close()
