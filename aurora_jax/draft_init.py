"""Where a draft starts: its weights, its frozen embedding and its vocabulary, from the trainer config.

One answer for every command that makes a draft: `train` (the Trainer), `init-draft` (a day-0
EAGLE3 dir for SGLang) and `export-hf` (which reads the frozen embedding again, since it is in no
checkpoint). In order: `loop.init_from` (an existing EAGLE3 dir: its weights, its d2t/t2d, and its
embed_tokens if it has one), else a fresh draft seeded by `loop.seed`; the embedding is the init_from
draft's own, else `loop.embedding` (the target's), else random (never exported); the vocabulary is
init_from's, else counted from `loop.vocab_counts`, else (pruned) chosen later from the first traces.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from aurora_jax.config import TrainerConfig
from aurora_jax.model import Eagle3Draft, head_from_target, load_flat
from bridge.eagle3 import LayoutError, from_torch_layout, load_hf, read_target_config, read_tensor, weights_file
from bridge.vocab import build_vocab, kept_share, token_frequencies


@dataclasses.dataclass
class Draft:
    model: Eagle3Draft
    has_embedding: bool  # it carries a real embedding (the target's or init_from's), which export writes
    vocab_fixed: bool  # d2t/t2d are chosen; False: pruned, to be chosen from the first traces
    source: str  # what it started from, for the log


def load_embedding(path: str, key: str) -> np.ndarray:
    return np.load(path) if path.endswith(".npy") else read_tensor(path, key)


def frozen_embedding(cfg: TrainerConfig, init_sd: dict | None = None) -> np.ndarray | None:
    """The draft's frozen token embedding: the init_from draft's own `embed_tokens` if it has one
    (`init_sd`: its state dict, if already read), else `loop.embedding`, else None."""
    if cfg.loop.init_from:
        sd = init_sd if init_sd is not None else load_hf(cfg.loop.init_from)[1]
        if "embed_tokens.weight" in sd:
            return np.asarray(sd["embed_tokens.weight"])
    return load_embedding(cfg.loop.embedding, cfg.loop.embedding_key) if cfg.loop.embedding else None


def resolve_draft(cfg: TrainerConfig) -> Draft:
    m = cfg.model
    model = Eagle3Draft(m, rngs=nnx.Rngs(cfg.loop.seed))
    vocab_fixed, source, init_sd = m.vd >= m.vocab_size, f"a fresh draft (seed {cfg.loop.seed})", None
    if cfg.loop.init_from:  # "external with draft": continue an existing EAGLE3 checkpoint
        path = cfg.loop.init_from
        hf_cfg, init_sd = load_hf(path)
        diff = m.differences(hf_cfg)
        if diff:
            raise LayoutError(f"loop.init_from={path}: its config.json does not match model.* (ours, theirs): {diff}; "
                              f"`aurora-jax import-hf {path}` prints the model.* overrides that match it")
        load_flat(model, from_torch_layout(init_sd, hf_cfg))
        vocab_fixed, source = True, f"{path} ({len(init_sd)} tensors)"  # its d2t/t2d stay (SGLang caches them)
    elif not vocab_fixed and cfg.loop.vocab_counts:
        counts = np.load(cfg.loop.vocab_counts)
        d2t, t2d = build_vocab(counts, m.vd)
        model.set_vocab(d2t)
        vocab_fixed = True
        source += (f"; vocabulary: the {m.vd} most frequent tokens of {cfg.loop.vocab_counts} "
                   f"({kept_share(counts, t2d):.1f}% of its {int(counts.sum())})")
    embedding = frozen_embedding(cfg, init_sd)
    if embedding is not None:
        model.set_embedding(embedding)
    return Draft(model, embedding is not None, vocab_fixed, source)


def vocab_from_traces(cfg: TrainerConfig, traces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Day 0 with draft_vocab_size < V and no counts given: the tokens most frequent in these (the
    first) traces. Returns (d2t, t2d, counts)."""
    counts = token_frequencies(traces, cfg.model.vocab_size)
    return (*build_vocab(counts, cfg.model.vd), counts)


def head_from_target_dir(cfg: TrainerConfig, d2t: np.ndarray) -> dict[str, np.ndarray]:
    """loop.head_init=target: lm_head and norm from the target's own files (`model.head_from_target`)."""
    t = cfg.target
    key = "model.embed_tokens.weight" if read_target_config(t).get("tie_word_embeddings", True) else "lm_head.weight"
    return head_from_target(cfg.model, d2t, read_tensor(weights_file(t, key), key),
                            read_tensor(weights_file(t, "model.norm.weight"), "model.norm.weight"))
