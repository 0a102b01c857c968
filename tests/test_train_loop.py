"""The trainer process: ingest + train loop concurrently, publish hook, checkpoint/resume with the buffer."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from aurora_jax.batching import BatchConfig
from aurora_jax.buffer import BufferConfig, ReplayBuffer
from aurora_jax.checkpoint import CheckpointConfig
from aurora_jax.config import IngestConfig, LoopConfig, TrainerConfig
from aurora_jax.loop import Trainer
from aurora_jax.model import DraftConfig
from aurora_jax.objective import ObjectiveConfig
from aurora_jax.train import MeshConfig
from aurora_jax.validate import TraceLimits
from bridge.eagle3 import LayoutError
from bridge.synthetic import toy_target_trace
from serving.trace_client import TraceClient, TraceClientConfig
from tests.conftest import wait_for

V, HT = 64, 16


def _cfg(tmp_path, **loop) -> TrainerConfig:
    return TrainerConfig(
        ingest=IngestConfig(address="127.0.0.1:0"), limits=TraceLimits(vocab_size=V),
        buffer=BufferConfig(spool_dir=str(tmp_path / "spool"), max_reuse=1),
        model=DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                          vocab_size=V, target_hidden_size=HT),
        objective=ObjectiveConfig(ttt_length=3), batch=BatchConfig(rows=4, lengths=[64], branch_slots=[0, 32], topk=2),
        mesh=MeshConfig(data=1), checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), every=3),
        loop=LoopConfig(metrics_path=str(tmp_path / "metrics.jsonl"), progress=False, **loop))


def _traces(n, seed=0):
    rng = np.random.default_rng(seed)
    succ, feats = rng.permutation(V).astype(np.int32), rng.standard_normal((V, 3 * HT)).astype(np.float32)
    return [toy_target_trace(rng, request_id=f"t{seed}-{i}", succ=succ, features=feats) for i in range(n)]


def _push(address, traces):
    client = TraceClient(TraceClientConfig(address=address, batch_size=8))
    for t in traces:
        client.submit(t)
    assert client.flush(30)
    assert client.stats()["acked"] == len(traces)
    client.close()


def test_trainer_ingests_trains_publishes_and_checkpoints(tmp_path):
    published = []
    cfg = _cfg(tmp_path, max_steps=6, sync_every=2, traces_per_step=4, tensorboard_dir=str(tmp_path / "tb"))
    trainer = Trainer(cfg, publish=lambda v, state: published.append((v, trainer.learner.step,
                                                                      nnx.to_flat_state(state))))
    try:
        _push(trainer.start(), _traces(24))
        last = trainer.run()
    finally:
        trainer.close()
    assert last["step"] == 6 and trainer.version == 3
    assert [(v, step) for v, step, _ in published] == [(1, 2), (2, 4), (3, 6)]  # after every 2nd step
    names = {".".join(map(str, p)) for p, _ in published[-1][2]}
    assert {"fc.kernel", "midlayer.self_attn.q_proj.kernel", "lm_head.kernel", "d2t", "t2d", "embed_tokens"} <= names
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["traces"] == 4 for r in rows)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"train/loss" in events[0].read_bytes() and b"train/acc_d0" in events[0].read_bytes()
    # 6 steps x 4 traces, each used once (max_reuse=1): the buffer is drained and every mark committed
    assert ReplayBuffer(dataclasses.replace(cfg.buffer)).entries() == []


def test_run_returns_when_asked_to_stop(tmp_path):
    """SIGTERM sets the stop event: run returns at the next step boundary (a trainer that trains on
    reused traces forever must still stop)."""
    import threading
    trainer = Trainer(_cfg(tmp_path, max_steps=0, traces_per_step=4))
    stop = threading.Event()
    try:
        _push(trainer.start(), _traces(8))
        runner = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
        runner.start()
        assert wait_for(lambda: trainer.learner.step >= 1, timeout=60)
        stop.set()
        runner.join(timeout=20)
        assert not runner.is_alive()
    finally:
        trainer.close()


def test_resume_restores_step_version_and_the_buffers_consumption_position(tmp_path):
    cfg = _cfg(tmp_path, max_steps=3, sync_every=2, traces_per_step=4)  # version != step
    a = Trainer(cfg)
    _push(a.start(), _traces(24))
    a.run()  # saves at step 3 (checkpoint.every=3): 12 traces consumed with it
    a.cfg.loop.max_steps = 5
    a.run()  # 2 more steps consume 8 more, not yet covered by a checkpoint
    a.ckpt.mgr.wait_until_finished()
    a.ckpt.poll()
    # crash: no final save, no commit of the last 8 traces' consumption
    a.server.stop(grace=0)
    a.buffer.close()
    a._metrics.close()

    published = []
    b = Trainer(_cfg(tmp_path, max_steps=6, sync_every=2, traces_per_step=4), resume=True,
                publish=lambda v, state: published.append((v, b.learner.step)))
    try:
        assert b.learner.step == 3 and b.version == 1  # one version (after step 2) in the step-3 checkpoint
        left = {e.trace.request_id for e in b.buffer.entries()}
        assert len(left) == 12  # exactly what the step-3 checkpoint had not consumed
        b.run()
        assert b.learner.step == 6 and published == [(2, 4), (3, 6)]
    finally:
        b.close()


def test_train_command_help_and_config_errors():
    out = subprocess.run([sys.executable, "-m", "apps.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "sync_every" in out.stdout
    out = subprocess.run([sys.executable, "-m", "apps.cli", "train", "objective.ttt_lenght=3"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'objective.ttt_length'" in out.stderr


def test_vocab_pruned_at_start_export_hf_and_train_from_the_export(tmp_path):
    from bridge.eagle3 import load_hf, to_torch_layout
    from bridge.vocab import token_frequencies

    cfg = _cfg(tmp_path / "a", max_steps=3, sync_every=0, traces_per_step=4)
    cfg.model = dataclasses.replace(cfg.model, draft_vocab_size=32)
    a = Trainer(cfg)
    traces = _traces(16)
    try:
        _push(a.start(), traces)
        a.run()
    finally:
        a.close()
    t2d = np.asarray(a.learner.rest["t2d"].get_value())
    counts = token_frequencies(traces, V)  # trunk tokens + the target's top-k mass (test_bridge)
    assert t2d.sum() == 32 and counts[t2d].min() >= counts[~t2d].max()  # the most frequent tokens

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "apps.cli", "export-hf", str(tmp_path / "a" / "ckpt"), str(out),
                        "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf_cfg, sd = load_hf(out)
    want = to_torch_layout({k: v for k, v in a.learner.host_params().items() if k != "embed_tokens"})
    assert "embed_tokens.weight" not in sd  # the trainer never had the target's real embedding
    assert sd.keys() == want.keys()
    for k in sd:
        assert np.array_equal(sd[k], want[k]), k
    r = subprocess.run([sys.executable, "-m", "apps.cli", "import-hf", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and f"loop.init_from={out}" in r.stdout and "model.draft_vocab_size=32" in r.stdout

    cfg_b = _cfg(tmp_path / "b", max_steps=1)
    cfg_b.model = cfg.model
    cfg_b.loop.init_from = str(out)
    b = Trainer(cfg_b)
    try:
        got = b.learner.host_params()
        for k, v in a.learner.host_params().items():
            if k != "embed_tokens":
                assert np.array_equal(got[k], v), k
    finally:
        b.close()
    r = subprocess.run([sys.executable, "-m", "apps.cli", "train", "target=", f"loop.init_from={out}",
                        f"limits.vocab_size={V}", f"model.vocab_size={V}"], capture_output=True, text=True)
    assert r.returncode == 2 and "does not match model.*" in r.stderr and "Traceback" not in r.stderr


def test_import_hf_prints_the_overrides_that_make_init_from_match(tmp_path):
    """A SpecForge-style Llama-3 draft (rope_scaling llama3, eps 1e-5): the `import-hf` overrides,
    fed back through the config loader, give a model.* that `loop.init_from` accepts."""
    import shlex

    from aurora_jax.config import TrainerConfig
    from aurora_jax.export import describe_hf
    from bridge.config import load_config
    from bridge.eagle3 import DraftConfig, save_hf
    from bridge.vocab import build_vocab

    cfg = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                      vocab_size=V, draft_vocab_size=32, rope_theta=500000.0, rms_norm_eps=1e-5,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in cfg.shapes().items() if k not in ("d2t", "t2d")}
    sd["d2t"], sd["t2d"] = build_vocab(rng.integers(0, 100, V), cfg.vd)
    out = save_hf(tmp_path / "specforge", cfg, sd, torch_dtype="float32")
    line = describe_hf(str(out)).splitlines()[-1]  # the command without a target dir, run as printed
    args = shlex.split(line.partition("aurora-jax train ")[2])
    assert args[:2] == ["--config", "configs/trainer.yaml"] and f"loop.init_from={out}" in args
    assert "model.rope_scaling.rope_type=llama3" in args and "model.rms_norm_eps=1e-05" in args
    loaded = load_config(TrainerConfig, args[1], args[2:])
    assert loaded.model.differences(cfg) == {} and TrainerConfig().model.differences(cfg)
    assert loaded.loop.init_from == str(out) and loaded.limits.vocab_size == V


def test_prompt_counts_for_the_embedded_day0_leave_out_the_heldout_split(tmp_path):
    """`demo` with vocab_from_prompts: the load's prompts of its split (never the held-out ones) are
    counted with the target's tokenizer, and the trainer is told to take its vocabulary from them."""
    from transformers import AutoTokenizer

    from apps.demo import DemoConfig, prompt_counts
    from apps.load import LoadConfig

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    records = [dict(prompt="def add(a, b):\n    return a + b\n", split="train"),
               dict(prompt="zebra quagga okapi", split="heldout"), dict(prompt="import os\n")]  # no split: train
    (prompts / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    demo = DemoConfig(load=LoadConfig(prompts=str(prompts), domains=["code"]))
    assert prompt_counts(demo, tmp_path, [sys.executable, "-m", "apps.cli"], "models/demo-target") == \
        [f"loop.vocab_counts={tmp_path / 'vocab_counts.npy'}"]
    tok = AutoTokenizer.from_pretrained("models/demo-target", local_files_only=True)
    want = np.zeros(4096, np.int64)
    for r in (records[0], records[2]):
        want += np.bincount(tok(r["prompt"], add_special_tokens=False)["input_ids"], minlength=4096)
    np.testing.assert_array_equal(np.load(tmp_path / "vocab_counts.npy"), want)
    for given in ("loop.vocab_counts=mine.npy", "loop.init_from=a-draft"):  # counts the user names win; a
        demo.trainer_overrides = [given]  # draft to continue keeps its own vocabulary
        assert prompt_counts(demo, tmp_path, [sys.executable, "-m", "apps.cli"], "models/demo-target") == []


def test_day0_sglang_draft_dir_from_prompt_counts(tmp_path):
    """Day 0 on SGLang (`demo` with serving=sglang): count the workload's prompts with the target's
    tokenizer (`count-tokens`), write an untrained draft dir with that pruned vocabulary
    (`init-draft`); a trainer started from it keeps the same d2t/t2d (SGLang fixes them at load)."""
    import json as _json

    from transformers import AutoTokenizer

    from aurora_jax.config import TrainerConfig
    from apps.demo import DemoConfig, sglang_day0
    from bridge.config import load_config
    from bridge.eagle3 import load_hf
    from apps.load import LoadConfig

    out, serve = tmp_path / "day0", tmp_path / "sglang.yaml"
    serve.write_text(f"sglang:\n  model_path: models/demo-target\n  draft_path: {tmp_path / 'elsewhere'}\n")
    overrides = ["model.draft_vocab_size=512"]
    demo = DemoConfig(serving="sglang", serve_config=str(serve), serve_overrides=[f"sglang.draft_path={out}"],
                      trainer_overrides=overrides, load=LoadConfig(domains=["code"]))
    assert sglang_day0(demo, tmp_path, [sys.executable, "-m", "apps.cli"]) == [f"loop.init_from={out}"]
    counts = np.load(tmp_path / "vocab_counts.npy")
    tok = AutoTokenizer.from_pretrained("models/demo-target", local_files_only=True)
    prompts = [json.loads(line)["prompt"] for line in open("models/demo-target/prompts/code.jsonl") if line.strip()]
    assert counts.shape == (4096,) and counts.sum() == sum(len(tok(p, add_special_tokens=False)["input_ids"])
                                                          for p in prompts)
    overrides.append(f"loop.vocab_counts={tmp_path / 'vocab_counts.npy'}")
    hf_cfg, sd = load_hf(out)
    assert "embed_tokens.weight" not in sd and hf_cfg.vd == 512
    assert sd["t2d"].sum() == 512 and counts[sd["t2d"]].min() >= counts[~sd["t2d"]].max()

    cfg = load_config(TrainerConfig, "configs/demo-trainer.yaml", [
        *overrides, f"loop.init_from={out}", f"buffer.spool_dir={tmp_path / 'spool'}", "weight_sync.address=",
        f"checkpoint.dir={tmp_path / 'ckpt'}", f"loop.metrics_path={tmp_path / 'm.jsonl'}", "mesh.data=1"])
    t = Trainer(cfg)
    try:
        assert np.array_equal(np.asarray(t.learner.rest["d2t"].get_value()), sd["d2t"])
        assert cfg.model.differences(hf_cfg) == {}
    finally:
        t.close()


def test_export_writes_the_embedding_it_trained_with_and_every_config_field(tmp_path):
    """A frozen embedding is in no checkpoint: export reads it again from where training read it (an
    imported draft's own `embed_tokens`, or `loop.embedding`), never a fresh random one. Every other
    tensor is the trained one, and config.json keeps every field of the import (the context length
    too, which `init_from` compares)."""
    from aurora_jax.export import export_hf
    from aurora_jax.model import Eagle3Draft, flat_variables
    from bridge.eagle3 import load_hf, save_hf, to_torch_layout

    model_cfg = dataclasses.replace(_cfg(tmp_path).model, max_position_embeddings=131072)
    rng = np.random.default_rng(7)
    imported = Eagle3Draft(model_cfg, rngs=nnx.Rngs(3))
    imported.set_embedding(rng.standard_normal((V, model_cfg.hidden_size)).astype(np.float32))
    src = save_hf(tmp_path / "imported", model_cfg,
                  to_torch_layout({k: np.asarray(v) for k, v in flat_variables(imported).items()}), "float32")
    npy = tmp_path / "target_embedding.npy"
    np.save(npy, rng.standard_normal((V, model_cfg.hidden_size)).astype(np.float32))
    for name, loop, want_embedding in (("from-import", dict(init_from=str(src)), load_hf(src)[1]["embed_tokens.weight"]),
                                       ("from-target", dict(embedding=str(npy)), np.load(npy))):
        cfg = _cfg(tmp_path / name, max_steps=2, sync_every=0, traces_per_step=4, **loop)
        cfg.model = model_cfg
        trainer = Trainer(cfg)
        try:
            _push(trainer.start(), _traces(8))
            trainer.run()
        finally:
            trainer.close()
        out = export_hf(str(tmp_path / name / "ckpt"), str(tmp_path / name / "hf"), torch_dtype="float32")
        _, sd = load_hf(out)
        assert np.array_equal(sd["embed_tokens.weight"], want_embedding), name
        trained = to_torch_layout({k: v for k, v in trainer.learner.host_params().items() if k != "embed_tokens"})
        assert sd.keys() - {"embed_tokens.weight"} == trained.keys()
        for k in trained:
            assert np.array_equal(sd[k], trained[k]), (name, k)
        umask = os.umask(0)
        os.umask(umask)
        assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not private to its writer
        config = json.loads((out / "config.json").read_text())
        assert config == json.loads((src / "config.json").read_text()), name

    cfg = _cfg(tmp_path / "mismatch", max_steps=1, init_from=str(src))  # model.* says 8192
    with pytest.raises(LayoutError, match="max_position_embeddings"):
        Trainer(cfg)


def test_init_draft_refuses_a_pruned_vocabulary_it_cannot_choose(tmp_path):
    """SGLang fixes the draft vocabulary at load: without token counts (or an init_from draft) there
    is nothing to choose it from, and init-draft says so instead of writing an arbitrary one."""
    from aurora_jax.export import init_hf

    cfg = _cfg(tmp_path)
    cfg.model = dataclasses.replace(cfg.model, draft_vocab_size=V // 2)
    with pytest.raises(ValueError, match="SGLang fixes the draft vocabulary at load"):
        init_hf(cfg, str(tmp_path / "draft"))
    assert not (tmp_path / "draft").exists()
    counts = tmp_path / "counts.npy"
    np.save(counts, np.arange(V, dtype=np.int64))
    cfg.loop.vocab_counts = str(counts)
    assert (init_hf(cfg, str(tmp_path / "draft")) / "config.json").exists()
