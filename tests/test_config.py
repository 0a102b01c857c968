import dataclasses
from typing import Literal

import numpy as np
import pytest

from aurora_jax.config import TrainerConfig
from aurora_jax.model import DraftConfig
from aurora_jax.validate import TraceLimits
from bridge.config import ConfigError, load_config


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 10
    tag: str | None = None
    on: bool = False


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "steps: 5\ninner:\n  lr: 0.5\n  names: [x, y]\n")
    cfg = load_config(Outer, p, ["inner.mode=b", "steps=7", "tag=hello", "on=true", "inner.lr=2"])
    assert cfg == Outer(inner=Inner(lr=2.0, mode="b", names=["x", "y"]), steps=7, tag="hello", on=True)
    assert isinstance(cfg.inner.lr, float)
    # YAML 1.1 reads 1e-5 (no dot) as a string; a float key takes it as the number it is
    assert load_config(Outer, write(tmp_path, "inner:\n  lr: 1e-5\n"), ["inner.lr=3e-04"]).inner.lr == 3e-4
    assert load_config(Outer, write(tmp_path, "inner:\n  lr: 1e-5\n")).inner.lr == 1e-5


def test_a_config_composes_from_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\ntag: base\ninner:\n  lr: 0.5\n  names: [x, y]\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "model.yaml"
    child.write_text("base: ../base.yaml\ntag: child\ninner:\n  mode: b\n  names: [z]\n")
    cfg = load_config(Outer, child, ["steps=6"])
    assert cfg == Outer(inner=Inner(lr=0.5, mode="b", names=["z"]), steps=6, tag="child")  # merged per key
    (tmp_path / "base.yaml").write_text("inner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'inner\.lrr'"):  # named where it is
        load_config(Outer, child)
    (tmp_path / "base.yaml").write_text("base: sub/model.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(Outer, child)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  lrr: 0.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'inner\.lrr'; did you mean 'inner\.lr'"):
        load_config(Outer, p)


def test_unknown_override_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'inner\.nope=1'.*unknown key 'inner\.nope'"):
        load_config(Outer, None, ["inner.nope=1"])


@pytest.mark.parametrize("text,match", [
    ("steps: ten\n", r"key 'steps' expects an integer, got 'ten'"),
    ("steps: 1.5\n", r"key 'steps' expects an integer"),
    ("on: 1\n", r"key 'on' expects true or false"),
    ("inner:\n  mode: c\n", r"key 'inner.mode' expects one of 'a', 'b'"),
    ("inner:\n  names: [1]\n", r"key 'inner.names\[0\]' expects a string"),
    ("inner: 3\n", r"'inner' must be a mapping"),
    ("inner:\n  lr: -1\n", r"invalid section 'inner': lr must be positive"),
    ("inner:\n  lr: fast\n", r"key 'inner.lr' expects a number, got 'fast'"),
    ("inner:\n  lr: nan\n", r"key 'inner.lr' expects a finite number"),
    ("- a\n", r"top level must be a mapping"),
    ("a: [\n", r"not valid YAML"),
])
def test_wrong_types_name_the_key_and_file(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(Outer, p)
    assert str(p) in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Outer, "/nonexistent/x.yaml")


def test_shipped_configs_load():
    from apps.demo import DemoConfig

    cfg = load_config(TrainerConfig, "configs/trainer.yaml")
    assert cfg.ingest.address.startswith("127.0.0.1")
    demo = load_config(DemoConfig, "configs/demo-cpu.yaml")
    assert demo.load.shape == "mixed" and demo.load.requests > 0
    tr = load_config(TrainerConfig, demo.trainer_config)
    assert tr.limits.vocab_size == tr.model.vocab_size == 4096
    assert tr.limits.target_hidden_size == 192  # follows the draft's target_hidden_size
    from serving.engine import EngineConfig
    eng = load_config(EngineConfig, demo.serve_config)
    assert eng.draft.mode == "untrained" and eng.subscribe_weights


def test_trainer_sections_must_agree():
    # the ingest's vocabulary and target width are the draft's: derived, and a conflicting key is refused
    with pytest.raises(ConfigError, match="'limits.vocab_size' = 100 conflicts with model.vocab_size, which says 32000"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["target=", "limits.vocab_size=100"])
    with pytest.raises(ConfigError, match="'limits.target_hidden_size' = 64 conflicts with the draft's target width"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["target=", "model.hidden_size=128", "limits.target_hidden_size=64"])
    cfg = load_config(TrainerConfig, "configs/trainer.yaml", ["target=", "model.vocab_size=1000", "model.hidden_size=128",
                                                              "model.num_attention_heads=4", "model.num_key_value_heads=2",
                                                              "model.target_hidden_size=96"])
    assert (cfg.limits.vocab_size, cfg.limits.target_hidden_size) == (1000, 96)  # derived, not typed twice
    with pytest.raises(ValueError, match="leave them out: derived"):  # a config built in code must agree too
        TrainerConfig(model=DraftConfig(vocab_size=100), limits=TraceLimits(vocab_size=200))
    with pytest.raises(ConfigError, match="batch.rows=6 must be a multiple of mesh.data=4"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["batch.rows=6", "mesh.data=4"])
    with pytest.raises(ConfigError, match="key 'objective.ttt_length'.*ttt_length must be >= 1|ttt_length must be >= 1"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["objective.ttt_length=0"])


def test_tls_pair_required():
    with pytest.raises(ConfigError, match="tls_cert and tls_key must be set together"):
        load_config(TrainerConfig, None, ["ingest.tls_cert=/x.pem"])


def test_override_text_kept_for_string_keys():
    cfg = load_config(TrainerConfig, "configs/trainer.yaml", ["ingest.auth_token=0123", "ingest.address=localhost:1:30"])
    assert cfg.ingest.auth_token == "0123" and cfg.ingest.address == "localhost:1:30"
    with pytest.raises(ConfigError, match="key 'ingest.max_streams' expects an integer, got 'many'"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["ingest.max_streams=many"])


def test_a_list_of_strings_override_is_parsed_as_a_list():
    """`demo 'trainer_overrides=["buffer.max_reuse=16"]'`: a list, not its text (the trainer once got '[')."""
    from apps.demo import DemoConfig

    cfg = load_config(DemoConfig, "configs/demo-smollm2.yaml", ['trainer_overrides=["buffer.max_reuse=16", "optim.lr=1e-3"]'])
    assert cfg.trainer_overrides == ["buffer.max_reuse=16", "optim.lr=1e-3"]
    with pytest.raises(ConfigError, match="trainer_overrides"):
        load_config(DemoConfig, "configs/demo-smollm2.yaml", ["trainer_overrides=buffer.max_reuse=16"])


def test_draft_config_derived_from_the_target(tmp_path):
    """`target:` fills model.* and limits.* from the target's config.json; a key that disagrees is
    refused by name and origin; a float32 round trip of a float is not a disagreement."""
    import json

    hf = json.loads(open("models/demo-target/config.json").read())
    cfg = load_config(TrainerConfig, "configs/trainer.yaml", ["target=models/demo-target"])
    m = cfg.model
    assert (m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.hd, m.intermediate_size, m.vocab_size) == \
        (hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"],
         hf["intermediate_size"], hf["vocab_size"])
    assert m.ht == cfg.limits.target_hidden_size == hf["hidden_size"] and cfg.limits.vocab_size == hf["vocab_size"]
    assert m.rope_theta == hf["rope_parameters"]["rope_theta"] and m.rms_norm_eps == hf["rms_norm_eps"]
    assert cfg.loop.embedding == "models/demo-target/model.safetensors"
    with pytest.raises(ConfigError, match=r"override 'model.intermediate_size=512': 'model.intermediate_size' = 512 "
                                          r"conflicts with the target's config.json \(models/demo-target\), which says 576"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["model.intermediate_size=512"])
    with pytest.raises(ConfigError, match="'limits.vocab_size' = 100 conflicts"):
        load_config(TrainerConfig, "configs/trainer.yaml", ["limits.vocab_size=100"])
    bad = tmp_path / "t.yaml"
    bad.write_text("target: models/demo-target\nmodel:\n  rope_theta: 500000\n")
    with pytest.raises(ConfigError, match=f"{bad}: 'model.rope_theta' = 500000.0 conflicts"):
        load_config(TrainerConfig, str(bad))
    # 1e-6 stored as float32 and read back is 9.999999974752427e-07: the same number to a draft
    rounded = float(np.float32(hf["rms_norm_eps"]))
    assert rounded != hf["rms_norm_eps"]
    same = load_config(TrainerConfig, "configs/trainer.yaml", [f"model.rms_norm_eps={rounded!r}"])
    assert same.model.rms_norm_eps == rounded
    # an explicit embedding wins over the derived default; the draft vocabulary stays the user's choice
    mine = load_config(TrainerConfig, "configs/trainer.yaml", ["loop.embedding=x.npy", "model.draft_vocab_size=1024"])
    assert mine.loop.embedding == "x.npy" and mine.model.vd == 1024


def test_missing_target_directory_is_named(tmp_path):
    for path in (tmp_path / "nothere", tmp_path):
        with pytest.raises(ConfigError, match=f"override 'target={path}': no model directory at {path}"):
            load_config(TrainerConfig, "configs/trainer.yaml", [f"target={path}"])


def test_the_readme_trainer_and_engine_configs_work_together():
    """`aurora-jax train --config configs/trainer.yaml` beside `aurora-jax serve --config configs/serve-cpu.yaml`:
    the same target, traces the trainer accepts (aux width from that target), and each side's addresses."""
    import json

    from serving.engine import EngineConfig

    tr = load_config(TrainerConfig, "configs/trainer.yaml")
    eng = load_config(EngineConfig, "configs/serve-cpu.yaml")
    hidden = json.loads(open(f"{eng.target.path}/config.json").read())["hidden_size"]
    assert tr.target == eng.target.path and tr.limits.target_hidden_size == hidden
    assert eng.traces.address == tr.ingest.address and eng.weights.address == tr.weight_sync.address
    assert eng.export_traces and eng.subscribe_weights and eng.draft.mode == "untrained"  # adopts the trainer's draft
