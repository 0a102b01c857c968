"""Engine and trainer agree on the draft without hand-matching: a day-0 engine adopts the trainer's
draft config and vocabulary (d2t/t2d) with the first version; after that a version with another
vocabulary is refused, counted, and the adopted one keeps serving."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from apps.cli import main
from aurora_jax.config import TrainerConfig, WeightSyncConfig
from aurora_jax.model import Eagle3Draft
from aurora_jax.weight_sync import WeightPublisher, WeightSyncServer
from bridge.config import load_config
from bridge.vocab import build_vocab
from serving.engine import DraftSource, Engine, EngineConfig
from serving.sglang.launch import SGLangLaunchConfig, run as sglang_run
from serving.spec_decode import SpecConfig
from serving.target import TargetConfig
from serving.weight_sync import WeightSubscriberConfig
from tests.conftest import wait_for

TARGET = "models/demo-target"


def _trainer_draft(counts: np.ndarray, seed: int) -> tuple[TrainerConfig, Eagle3Draft]:
    cfg = load_config(TrainerConfig, "configs/demo-trainer.yaml", [f"target={TARGET}", "model.draft_vocab_size=512"])
    model = Eagle3Draft(cfg.model, rngs=nnx.Rngs(seed))
    model.set_vocab(build_vocab(counts, cfg.model.vd)[0])
    return cfg, model


def test_day0_engine_adopts_the_trainers_draft_then_refuses_another_vocabulary():
    rng = np.random.default_rng(0)
    counts_a, counts_b = rng.integers(0, 1000, 4096), rng.integers(0, 1000, 4096)
    cfg, model = _trainer_draft(counts_a, 0)
    server = WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0")).start()
    engine = Engine(EngineConfig(target=TargetConfig(path=TARGET), draft=DraftSource(mode="untrained", draft_vocab_size=1024),
                                 spec=SpecConfig(topk=2, num_steps=2, num_draft_tokens=3), export_traces=False,
                                 weights=WeightSubscriberConfig(address=server.address), subscribe_weights=True,
                                 max_new_tokens=8))
    prompt = engine.tokenizer("def main():\n")["input_ids"]
    try:
        assert engine.decoder.drafter.draft.cfg.vd == 1024  # the engine's own day-0 stand-in
        publish = WeightPublisher(server, cfg.model)
        publish(1, nnx.state(model))
        assert wait_for(lambda: engine.subscriber.version == 1), engine.subscriber.last_error
        assert engine.complete(prompt)["draft_version"] == 1  # installed at a round boundary
        served = engine.decoder.drafter.draft
        assert served.cfg.vd == 512 and not served.cfg.differences(cfg.model)
        assert torch.equal(served.d2t, torch.from_numpy(build_vocab(counts_a, 512)[0]))
        assert torch.equal(served.t2d, torch.from_numpy(build_vocab(counts_a, 512)[1]))
        # the same draft, trained on: accepted
        publish(2, nnx.state(_trainer_draft(counts_a, 1)[1]))
        assert wait_for(lambda: engine.subscriber.version == 2), engine.subscriber.last_error
        # a trainer restarted with another vocabulary: refused by name, counted, v2 keeps serving
        publish(3, nnx.state(_trainer_draft(counts_b, 2)[1]))
        assert wait_for(lambda: engine.snapshot()["versions_refused"] == 1)
        assert "vocabulary map d2t" in engine.snapshot()["last_refusal"]
        assert engine.complete(prompt)["draft_version"] == 2
        assert torch.equal(engine.decoder.drafter.draft.d2t, torch.from_numpy(build_vocab(counts_a, 512)[0]))
    finally:
        engine.close()
        server.stop(0)


def test_head_from_the_target_and_an_initial_version(tmp_path):
    """loop.head_init=target: lm_head = the target's output rows of the draft vocabulary, norm = its final
    norm, fc passes the top aux feature through; loop.publish_initial publishes that draft as version 1."""
    from aurora_jax.loop import Trainer
    from aurora_jax.model import flat_state
    from bridge.eagle3 import read_tensor

    counts = np.random.default_rng(1).integers(0, 1000, 4096)
    np.save(tmp_path / "counts.npy", counts)
    cfg = load_config(TrainerConfig, "configs/demo-trainer.yaml", [
        f"buffer.spool_dir={tmp_path / 'spool'}", f"checkpoint.dir={tmp_path / 'ckpt'}", "weight_sync.address=",
        f"loop.metrics_path={tmp_path / 'm.jsonl'}", "model.draft_vocab_size=512", f"loop.vocab_counts={tmp_path / 'counts.npy'}",
        "loop.head_init=target", "loop.publish_initial=true"])
    published = []
    t = Trainer(cfg, publish=lambda v, state: published.append((v, {k: np.asarray(x.get_value())
                                                                    for k, x in flat_state(state).items()})))
    try:
        (version, flat), = published
        assert version == 1 and t.version == 1
        embed = read_tensor(f"{TARGET}/model.safetensors", "model.embed_tokens.weight").astype(np.float32)  # tied head
        ids = np.arange(512) + build_vocab(counts, 512)[0]
        np.testing.assert_array_equal(flat["lm_head.kernel"], embed[ids].T)
        np.testing.assert_array_equal(flat["norm.weight"],
                                      read_tensor(f"{TARGET}/model.safetensors", "model.norm.weight").astype(np.float32))
        H = cfg.model.hidden_size
        np.testing.assert_array_equal(flat["fc.kernel"], np.concatenate([np.zeros((2 * H, H)), np.eye(H)]))
    finally:
        t.close()



def test_a_draft_for_another_target_is_refused_by_name(tmp_path, capsys):
    """`init-draft --target` writes a draft shaped after that target, which the engine serves; a draft
    with another vocabulary is refused, naming the field, by the engine (`draft.mode: hf`) and by
    `sglang-launch` before SGLang starts."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(["init-draft", "--config", "configs/demo-trainer.yaml", "--target", TARGET, "--out", str(good),
                 "--dtype", "float32", "model.draft_vocab_size=0"]) == 0
    serve = lambda path: Engine(EngineConfig(target=TargetConfig(path=TARGET), draft=DraftSource(mode="hf", path=path),
                                             export_traces=False, subscribe_weights=False))
    serve(str(good)).close()
    assert main(["init-draft", "--config", "configs/demo-trainer.yaml", "--out", str(bad), "--dtype", "float32",
                 "target=", "model.vocab_size=8192", "limits.vocab_size=8192", "model.draft_vocab_size=0"]) == 0
    with pytest.raises(ValueError, match=f"vocab_size=8192, but the target {TARGET} has 4096"):
        serve(str(bad))

    launch = load_config(SGLangLaunchConfig, "configs/llama3.1-8b-sglang.yaml",
                         [f"sglang.model_path={TARGET}", f"sglang.draft_path={bad}"])
    with pytest.raises(ValueError, match="vocab_size"):
        sglang_run(launch, dry_run=True)
    capsys.readouterr()
    launch.sglang = dataclasses.replace(launch.sglang, draft_path=str(good))
    assert sglang_run(launch, dry_run=True) == 0
    assert f"--speculative-draft-model-path {good}" in capsys.readouterr().out
    # the map SGLang will cache at start, which the updater holds every version to
    from bridge.eagle3 import load_hf
    from serving.sglang.launch import served_vocab
    np.testing.assert_array_equal(served_vocab(str(good))["d2t"], load_hf(good)[1]["d2t"])
    assert served_vocab(str(tmp_path / "absent")) == {}
