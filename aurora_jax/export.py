"""Checkpoint -> Hugging Face EAGLE3 directory, and an HF directory's summary (import check).

`export-hf` restores the draft from an orbax checkpoint (the config saved with it says its shape),
maps it through `bridge.eagle3` and writes `config.json` + `model.safetensors`, loadable by SGLang
as `--speculative-draft-model-path`. `embed_tokens` is written only if the trainer had a real one
(the target's, or an imported draft's), read again from that source since a frozen tensor is not
checkpointed; otherwise SGLang uses the target's own. No torch: safetensors via numpy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from aurora_jax.config import TrainerConfig
from aurora_jax.model import Eagle3Draft
from aurora_jax.train import Learner, MeshConfig, make_mesh
from bridge.config import from_dict
from bridge.eagle3 import VOCAB_KEYS, load_hf, save_hf, to_torch_layout

log = logging.getLogger(__name__)


def flat_from_learner(learner: Learner, with_embedding: bool) -> dict[str, np.ndarray]:
    flat = learner.host_params()
    if not with_embedding:
        flat.pop("embed_tokens", None)
    return flat


def restore_for_export(ckpt_dir: str | Path, step: int | None = None) -> tuple[TrainerConfig, Learner, dict]:
    """(config, learner holding the checkpoint's state and vocab, meta) on one host device."""
    ckpt_dir = Path(ckpt_dir).absolute()
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax narrates read-only managers and unregistered items
    with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    cfg = from_dict(TrainerConfig, meta["config"], f"{ckpt_dir}/{step} (saved config)", known_only=True)
    learner = Learner(Eagle3Draft(cfg.model, rngs=nnx.Rngs(0)), cfg.objective, cfg.optim, make_mesh(MeshConfig(data=1)))
    from aurora_jax.checkpoint import CheckpointConfig, Checkpointer
    ck = Checkpointer(CheckpointConfig(dir=str(ckpt_dir)))
    try:
        state, meta, vocab, _ = ck.restore(learner.state, step)
    finally:
        ck.mgr.close()
    learner.restore(state)
    if vocab is not None:
        learner.set_vocab(**vocab)
    if meta.get("has_embedding"):  # frozen, so not in the checkpoint: read again from where training read it
        from aurora_jax.draft_init import frozen_embedding
        try:
            embedding = frozen_embedding(cfg)
        except OSError as e:
            raise FileNotFoundError(f"{ckpt_dir}/{step}: the embedding it trained with is not readable from here "
                                    f"(saved loop.init_from={cfg.loop.init_from!r}, loop.embedding="
                                    f"{cfg.loop.embedding!r}; relative paths are from the trainer's directory): "
                                    f"{e}") from None
        if embedding is None:
            raise FileNotFoundError(f"{ckpt_dir}/{step}: trained with the target's embedding, but neither "
                                    f"loop.init_from nor loop.embedding of its saved config holds one now")
        learner.set_buffers(embed_tokens=embedding)
    return cfg, learner, meta


def export_hf(ckpt_dir: str, out_dir: str, step: int | None = None, torch_dtype: str = "bfloat16") -> Path:
    cfg, learner, meta = restore_for_export(ckpt_dir, step)
    sd = to_torch_layout(flat_from_learner(learner, bool(meta.get("has_embedding"))))
    path = save_hf(out_dir, cfg.model, sd, torch_dtype)
    log.info("exported step %d (draft_version %d) to %s", meta["step"], meta["draft_version"], path)
    return path


def init_hf(cfg: TrainerConfig, out_dir: str, torch_dtype: str = "bfloat16") -> Path:
    """A day-0 (untrained) draft from the trainer's model.* as an EAGLE3 dir, for SGLang to load
    before the first WeightSync version. SGLang fixes d2t/t2d at load, so a pruned vocabulary must be
    chosen now (loop.vocab_counts) and the trainer must start from this dir (loop.init_from)."""
    from aurora_jax.draft_init import resolve_draft
    from aurora_jax.model import flat_variables

    m = cfg.model
    draft = resolve_draft(cfg)
    if not draft.vocab_fixed:
        raise ValueError(f"model.draft_vocab_size={m.vd} < vocab_size={m.vocab_size}: SGLang fixes the draft "
                         "vocabulary at load, so it is chosen now; set loop.vocab_counts to token counts [V] "
                         "(.npy; `aurora-jax count-tokens` makes them from prompts) or model.draft_vocab_size=0")
    flat = {k: np.asarray(v) for k, v in flat_variables(draft.model).items() if k != "embed_tokens"}
    path = save_hf(out_dir, m, to_torch_layout(flat), torch_dtype)  # no embed_tokens: SGLang uses the target's
    log.info("wrote a day-0 draft (seed %d) to %s", cfg.loop.seed, path)
    return path


def describe_hf(path: str) -> str:
    """What an EAGLE3 dir holds, and the `aurora-jax train` command lines that start from it: with the
    target's directory (shapes derived from it and checked against the draft), or without one."""
    cfg, sd = load_hf(path)
    n = sum(int(np.prod(v.shape)) for k, v in sd.items() if k not in VOCAB_KEYS)
    shape = " ".join(f"model.{k}={getattr(cfg, k)}" for k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
        "target_hidden_size", "rope_theta", "rms_norm_eps", "max_position_embeddings")) + "".join(
        f" model.rope_scaling.{k}={v}" for k, v in (cfg.rope_scaling.to_hf() if cfg.rope_scaling else {}).items())
    return (f"{path}: EAGLE3 draft, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
            f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size} -> draft {cfg.vd}, target hidden "
            f"{cfg.ht}; {len(sd)} tensors, {n / 1e6:.1f}M parameters"
            f"{'' if 'embed_tokens.weight' in sd else ' (no embed_tokens: the target embedding is used)'}\n"
            f"train from it, with its target's HF directory (shapes derived from it and checked):\n"
            f"  aurora-jax train --config configs/trainer.yaml target=TARGET_DIR loop.init_from={path} "
            f"model.draft_vocab_size={cfg.vd}\n"
            f"or without the target at hand (loop.embedding then gives its embedding):\n"
            f"  aurora-jax train --config configs/trainer.yaml target= loop.init_from={path} "
            f"limits.vocab_size={cfg.vocab_size} model.draft_vocab_size={cfg.vd} {shape}")
