"""The trainer process: ingest endpoint + durable buffer + train loop, running concurrently.

gRPC threads fill the buffer while the loop samples from it (staleness-aware), packs a fixed-
shape batch and dispatches the jitted step; host-side packing of step N+1 overlaps the device's
work on step N (metrics are read one step late). Every `sync_every` steps the loop bumps
`draft_version` and calls the publish hook (the bridge's WeightSync publisher plugs in there);
every `checkpoint.every` steps it saves asynchronously with orbax.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from aurora_jax.batching import pack
from aurora_jax.buffer import ReplayBuffer
from aurora_jax.checkpoint import Checkpointer
from aurora_jax.config import TrainerConfig
from aurora_jax.draft_init import resolve_draft
from aurora_jax.ingest import IngestServer
from aurora_jax.model import head_from_target
from aurora_jax.served import ServedUtility, serve_metrics
from aurora_jax.train import Learner, make_mesh
from bridge.config import to_dict
from bridge.eagle3 import read_target_config, read_tensor, weights_file
from bridge.signals import stop_event
from bridge.vocab import build_vocab, count_tokens

log = logging.getLogger(__name__)

PublishHook = Callable[[int, nnx.State], None]  # (draft_version, full draft state incl. d2t/t2d)


class Trainer:
    def __init__(self, cfg: TrainerConfig, publish: PublishHook | None = None, resume: bool = False):
        self.cfg, self.publish = cfg, publish
        self.weights = None
        if cfg.weight_sync.address and publish is None:
            from aurora_jax.weight_sync import WeightPublisher, WeightSyncServer
            self.weights = WeightSyncServer(cfg.weight_sync)  # bound now, serving from start()
            self.publish = WeightPublisher(self.weights, cfg.model)
        self.buffer = ReplayBuffer(cfg.buffer, defer_consume=True)
        self.served = ServedUtility()  # served acceptance per draft version, from the traces as they arrive
        self.prometheus = None
        self.last: dict = {}  # the last step's metrics record (a version published at start has none)
        self.server: IngestServer | None = None
        draft = resolve_draft(cfg)
        log.info("the draft starts from %s", draft.source)
        model, self.has_embedding = draft.model, draft.has_embedding
        self._vocab_pending = not draft.vocab_fixed and not resume
        mesh = make_mesh(cfg.mesh)
        if cfg.batch.rows % mesh.shape["data"]:
            raise ValueError(f"batch.rows={cfg.batch.rows} is not a multiple of the {mesh.shape['data']} devices on the "
                             f"data axis (set mesh.data or batch.rows)")
        self.learner = Learner(model, cfg.objective, cfg.optim, mesh, cfg.mesh.fsdp)
        self.ckpt = Checkpointer(cfg.checkpoint, self.buffer)
        self.version = 0
        self.rng = np.random.default_rng(cfg.loop.seed)
        if resume:
            state, meta, vocab = self.ckpt.restore(self.learner.state)
            self.learner.restore(state)
            if vocab is not None:
                self.learner.set_vocab(**vocab)
            self.version = int(meta["draft_version"])
            self.rng.bit_generator.state = meta["sampler_rng"]
            self.has_embedding |= bool(meta.get("has_embedding"))
            log.info("resumed at step %d, draft_version %d; %d traces in the buffer", self.learner.step,
                     self.version, len(self.buffer.entries()))
        self._head_pending = cfg.loop.head_init == "target" and not resume and not cfg.loop.init_from
        self._initial_pending = cfg.loop.publish_initial and not resume
        if not self._vocab_pending:
            self._start_from_target()
        Path(cfg.loop.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        self._metrics = open(cfg.loop.metrics_path, "a")
        self._tb = None
        if cfg.loop.tensorboard_dir:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("loop.tensorboard_dir needs tensorboardX: pip install 'aurora-jax[tb]'") from None
            self._tb = SummaryWriter(cfg.loop.tensorboard_dir)
        self._pending = None  # (step, device metrics, host info) awaiting readback
        self._t_last = time.perf_counter()

    def _prune_vocab(self) -> None:
        """Day 0 with draft_vocab_size < V: keep the tokens most frequent in the traces so far."""
        counts = count_tokens((e.trace for e in self.buffer.entries()), self.cfg.model.vocab_size)
        d2t, t2d = build_vocab(counts, self.cfg.model.vd)
        self.learner.set_vocab(d2t, t2d)
        self._vocab_pending = False
        log.info("draft vocabulary: the %d most frequent of %d tokens seen in %d traces (%.1f%% of occurrences)",
                 self.cfg.model.vd, int((counts > 0).sum()), len(self.buffer.entries()),
                 100 * counts[t2d].sum() / max(counts.sum(), 1))

    def _start_from_target(self) -> None:
        """Once the draft vocabulary is fixed: the day-0 head from the target (loop.head_init=target,
        see `model.head_from_target`), then version 1 if loop.publish_initial."""
        if self._head_pending:
            t = self.cfg.target
            hf = read_target_config(t)
            head_key = "model.embed_tokens.weight" if hf.get("tie_word_embeddings", True) else "lm_head.weight"
            d2t = self.learner.vocab["d2t"]
            self.learner.set_params(head_from_target(
                self.cfg.model, d2t, read_tensor(weights_file(t, head_key), head_key),
                read_tensor(weights_file(t, "model.norm.weight"), "model.norm.weight")))
            self._head_pending = False
            log.info("draft head initialised from the target %s (%s, final norm; fc passes its top aux layer)",
                     t, head_key)
        if self._initial_pending:
            self._initial_pending = False
            self.sync()

    def start(self) -> str:
        """Serve TraceIngest (and WeightSync, when configured); returns the ingest address."""
        self.server = IngestServer(self.cfg.ingest, self.cfg.limits, self.buffer, on_accept=self.served.add).start()
        if self.weights is not None:
            self.weights.start()
        if self.cfg.loop.metrics_address:
            self.prometheus = serve_metrics(self, self.cfg.loop.metrics_address)
        return self.server.address

    # ------------------------------------------------------------ one step

    def step(self, timeout: float = 1.0) -> bool:
        """Sample, pack and dispatch one optimizer step. False if the buffer had too little."""
        cfg = self.cfg
        if not self.buffer.wait_for(cfg.loop.min_traces, timeout):
            return False
        if self._vocab_pending:
            self._prune_vocab()
            self._start_from_target()
        entries = self.buffer.sample(cfg.loop.traces_per_step or cfg.batch.rows, self.rng, self.version)
        if not entries:
            return False
        batch, stats, _ = pack([e.trace for e in entries], cfg.batch, cfg.objective.ttt_length, self.learner.target_to_draft,
                               cfg.objective.train_on_prompt)
        metrics = self.learner.train_step(batch)
        self.ckpt.poll()
        self._flush()
        self._pending = (self.learner.step, metrics, dict(
            traces=len(entries) - stats.left_over, truncated=stats.truncated, dropped_nodes=stats.dropped_nodes,
            lag=float(np.mean([max(0, self.version - e.trace.draft_version) for e in entries])),
            shape=list(batch.tokens.shape)))
        step = self.learner.step
        if cfg.loop.sync_every and step % cfg.loop.sync_every == 0:
            self.sync()
        if self.ckpt.due(step):
            self.save()
        return True

    def _flush(self) -> None:
        """Read back the previous step's metrics (it has finished by now) and log them."""
        if self._pending is None:
            return
        step, metrics, info = self._pending
        self._pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, self._t_last = now - self._t_last, now
        s = self.buffer.snapshot_stats()
        served = {str(v): u for v, u in self.served.snapshot().items() if v >= self.version - 1}
        rec = dict(step=step, time=time.time(), step_s=dt, tree_tokens_per_s=m["tree_tokens"] / max(dt, 1e-9),
                   draft_version=self.version, buffered=s["buffered"], accepted=s["accepted"],
                   compiled_shapes=self.learner.compiled_shapes, **info, **m, served=served)
        self.last = rec
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if step % self.cfg.loop.log_every == 0:
            accs = " ".join(f"{m[f'acc_d{j}']:.2f}" for j in range(self.cfg.objective.ttt_length))
            log.info("step %d loss %.4f kl %.4f ul %.4f acc/depth [%s] accept_len %.2f | %.0f tree tok/s "
                     "buffer %d v%d", step, m["loss"], m["kl"], m["unlikelihood"], accs, m["accept_len"],
                     rec["tree_tokens_per_s"], s["buffered"], self.version)

    # ------------------------------------------------------------ sync / checkpoint

    def sync(self) -> None:
        """Publish the current draft as a new draft_version (a failing publisher is logged, not fatal)."""
        self.version += 1
        self.served.published(self.version, self.last.get("accept_len"))  # the proxy last read back
        if self.publish is None:
            return
        t0 = time.perf_counter()
        try:
            self.publish(self.version, nnx.state(self.learner.model()))
            log.info("published draft_version %d in %.3fs", self.version, time.perf_counter() - t0)
        except Exception:
            log.exception("publishing draft_version %d failed; serving keeps the previous draft", self.version)

    def save(self) -> None:
        meta = dict(draft_version=self.version, step=self.learner.step, sampler_rng=self.rng.bit_generator.state,
                    has_embedding=self.has_embedding, config=to_dict(self.cfg))
        vocab = self.learner.vocab
        self.ckpt.save(self.learner.step, self.learner.state, meta, vocab)

    # ------------------------------------------------------------ run

    def run(self, stop: threading.Event | None = None) -> dict:
        """Train until max_steps or `stop`; saves a final checkpoint. Returns the last metrics."""
        stop = stop or threading.Event()
        cfg = self.cfg.loop
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps or None, initial=self.learner.step, desc="train", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        waited = time.monotonic()
        while not stop.is_set() and not (cfg.max_steps and self.learner.step >= cfg.max_steps):
            if not self.step(timeout=0.5):
                if time.monotonic() - waited > 30:
                    log.info("waiting for traces (buffer has %d, need %d)", len(self.buffer.entries()),
                             cfg.min_traces)
                    waited = time.monotonic()
                continue
            waited = time.monotonic()
            if bar is not None:
                bar.update(1)
                if self.last:
                    bar.set_postfix(loss=f"{self.last['loss']:.3f}", acc=f"{self.last['acc_d0']:.2f}",
                                    v=self.version, buf=self.last["buffered"], refresh=False)
        self._flush()
        if bar is not None:
            bar.close()
        return self.last

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.shutdown()
        if self.server is not None:
            self.server.stop(grace=2.0)
        if self.weights is not None:
            self.weights.stop(grace=1.0)
        self._flush()
        if self.learner.step and self.ckpt.latest_step() != self.learner.step:
            self.save()
        self.ckpt.close()
        self.buffer.close()
        self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def run_train(cfg: TrainerConfig, resume: bool = False) -> int:
    """`aurora-jax train`: serve ingest and train until max_steps or SIGINT/SIGTERM."""
    trainer = Trainer(cfg, resume=resume)
    stop = stop_event()
    try:
        print(f"listening on {trainer.start()}", flush=True)
        if trainer.weights is not None:
            print(f"weights on {trainer.weights.address}", flush=True)
        if trainer.prometheus is not None:
            print(f"metrics on http://{cfg.loop.metrics_address.rpartition(':')[0]}:"
                  f"{trainer.prometheus.server_port}/metrics", flush=True)
        last = trainer.run(stop)
        if last:
            log.info("stopped at step %d: loss %.4f accept_len %.2f", last["step"], last["loss"], last["accept_len"])
    finally:
        trainer.close()
    return 0
