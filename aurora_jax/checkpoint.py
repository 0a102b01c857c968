"""Orbax checkpoints of the train state, committed together with the buffer's consumption.

Each checkpoint step directory holds `state` (params, optimizer state, step: an orbax PyTree,
restored with the live shardings) and `meta` (JSON: draft_version, sampler state, config). Saves
are asynchronous and atomic (orbax finalises a step directory only when complete). The traces the
trainer consumed before a save are marked consumed in the spool only once that save is durable,
so `train --resume` continues from a state that has seen exactly what the buffer no longer holds.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from aurora_jax.buffer import ReplayBuffer
from aurora_jax.train import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = "runs/ckpt"
    every: int = 100  # optimizer steps between saves (0 = only at exit)
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("every must be >= 0 and keep >= 1")


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, buffer: ReplayBuffer | None = None):
        self.cfg, self.buffer = cfg, buffer
        self.dir = Path(cfg.dir).absolute()
        self.mgr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True))
        self._marks = []  # consumption marks waiting for the in-flight save

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, step: int, state: TrainState, meta: dict, vocab: dict | None = None,
             extra: dict | None = None) -> None:
        """Start saving `state` at `step` (returns while it writes, unless async_save is off).

        `vocab`: the draft's d2t/t2d (not trained, so not in `state`, but fixed for its lifetime).
        `extra`: more named pytrees saved beside it (the guard's served and previous weights)."""
        self._finish()
        self._marks = self.buffer.take_consumed() if self.buffer is not None else []
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if vocab is not None:
            items["vocab"] = ocp.args.StandardSave(vocab)
        for name, tree in (extra or {}).items():
            items[name] = ocp.args.StandardSave(tree)
        self.mgr.save(step, args=ocp.args.Composite(**items), force=True)
        log.info("checkpoint %d: saving to %s", step, self.dir)

    def poll(self) -> None:
        """Commit the consumption marks of a save that has completed (cheap; call every step)."""
        if self._marks and not self.mgr.is_saving_in_progress():
            self._finish()

    def _finish(self) -> None:
        self.mgr.wait_until_finished()
        if self.buffer is not None and self._marks:
            self.buffer.commit_consumed(self._marks)
        self._marks = []

    def restore(self, like: TrainState, step: int | None = None, extra_like: dict | None = None
                ) -> tuple[TrainState, dict, dict | None, dict]:
        """Restore into the structure, dtypes and shardings of `like` (the freshly built state).
        `extra_like`: {name: a pytree like the one saved}, restored where the checkpoint has it.
        Returns (state, meta, vocab or None, {name: pytree} of the extras found)."""
        step = self.mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.dir}")
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        items = dict(state=ocp.args.StandardRestore(abstract(like)), meta=ocp.args.JsonRestore())
        saved = self.mgr.item_metadata(step)
        has_vocab = "vocab" in saved
        if has_vocab:
            items["vocab"] = ocp.args.StandardRestore()
        extras = [name for name in (extra_like or {}) if name in saved]
        for name in extras:
            items[name] = ocp.args.StandardRestore(abstract(extra_like[name]))
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # orbax names the subtree, not the setting that shaped it
            if "do not match" not in str(e):
                raise
            raise ValueError(f"checkpoint {step} in {self.dir} holds a train state shaped unlike this trainer's: "
                             f"resume with the model.* and optim.* it was saved with (the `config` in its meta; "
                             f"e.g. optim.ema_decay and optim.clip_norm add optimizer state). orbax: {e}") from None
        log.info("restored checkpoint %d from %s", step, self.dir)
        return out.state, out.meta, (dict(out.vocab) if has_vocab else None), {name: out[name] for name in extras}

    def close(self) -> None:
        self._finish()
        self.mgr.close()
