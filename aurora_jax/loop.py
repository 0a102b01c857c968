"""The trainer process: ingest endpoint + durable buffer + train loop, running concurrently.

gRPC threads fill the buffer while the loop samples from it (staleness-aware), packs a fixed-
shape batch and dispatches the jitted step; host-side packing of step N+1 overlaps the device's
work on step N (metrics are read one step late). Every `sync_every` steps the loop bumps
`draft_version` and calls the publish hook (the bridge's WeightSync publisher plugs in there);
every `checkpoint.every` steps it saves asynchronously with orbax.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from aurora_jax.batching import pack, pack_all
from aurora_jax.buffer import ReplayBuffer
from aurora_jax.checkpoint import Checkpointer
from aurora_jax.config import TrainerConfig
from aurora_jax.draft_init import head_from_target_dir, resolve_draft
from aurora_jax.guard import copy_params, finite, served_worse
from aurora_jax.hosts import STEP, STOP, Hosts
from aurora_jax.ingest import IngestServer
from aurora_jax.served import ServedUtility, serve_metrics
from aurora_jax.train import Learner, make_mesh
from bridge.config import to_dict
from bridge.signals import stop_event
from bridge.vocab import build_vocab, kept_share, token_frequencies

log = logging.getLogger(__name__)

PublishHook = Callable[[int, nnx.State], None]  # (draft_version, full draft state incl. d2t/t2d)


class Trainer:
    def __init__(self, cfg: TrainerConfig, publish: PublishHook | None = None, resume: bool = False):
        self.cfg, self.publish = cfg, publish
        mesh = make_mesh(cfg.mesh)  # first: several processes start JAX's distributed runtime before any device use
        self.hosts = Hosts(mesh)
        self.local_batch = dataclasses.replace(cfg.batch, rows=cfg.batch.rows // self.hosts.count)  # this host's rows
        self.weights = None
        if cfg.weight_sync.address and publish is None and self.hosts.primary:  # process 0 publishes
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
        if self.hosts.count > 1:
            log.info("trainer process %d of %d, %d local devices; if a process dies the others stop (within "
                     "mesh.heartbeat_timeout_s=%d s): restart every process with --resume", self.hosts.index,
                     self.hosts.count, len(jax.local_devices()), cfg.mesh.heartbeat_timeout_s)
        model, self.has_embedding = draft.model, draft.has_embedding
        self._vocab_pending = not draft.vocab_fixed and not resume
        if cfg.batch.rows % mesh.shape["data"]:
            raise ValueError(f"batch.rows={cfg.batch.rows} is not a multiple of the {mesh.shape['data']} devices on the "
                             f"data axis (set mesh.data or batch.rows)")
        self.learner = Learner(model, cfg.objective, cfg.optim, mesh, cfg.mesh.fsdp)
        self.ckpt = Checkpointer(cfg.checkpoint, self.buffer)
        self.version = 0
        self.stopped = False  # the processes agreed to stop (several processes)
        self._last_step_t = time.monotonic()
        # The guard (aurora_jax/guard.py): the weights of the version serving now and of the one before
        # it (the rollback target), kept only when something judges against them.
        self.guard_stats = dict(gate_passed=0, gate_refused=0, gate_unjudged=0, nonfinite_refused=0, rollbacks=0,
                                adaptive_waits=0)
        self.last_gate: dict | None = None
        self.last_rollback: dict | None = None
        self.keep_weights = cfg.guard.gate or cfg.guard.rollback or cfg.loop.sync_policy == "adaptive"
        self.served_params = None
        self.served_version = 0
        self.previous: tuple[int, object] | None = None
        self.rolled_back: set[int] = set()
        self._since_sync, self._next_check = 0, cfg.loop.sync_every
        if resume:
            params = self.learner.state.params
            state, meta, vocab, extra = self.ckpt.restore(
                self.learner.state, extra_like=dict(served_params=params, previous_params=params))
            self.learner.restore(state)
            if vocab is not None:
                self.learner.set_vocab(**vocab)
            self.version = int(meta["draft_version"])
            self.has_embedding |= bool(meta.get("has_embedding"))
            self.served.load(meta.get("served", {}))
            g = meta.get("guard", {})
            self.guard_stats.update(g.get("stats", {}))
            self.rolled_back = set(g.get("rolled_back", []))
            self.served_params, self.served_version = extra.get("served_params"), int(g.get("served_version", 0))
            if "previous_params" in extra:
                self.previous = (int(g["previous_version"]), extra["previous_params"])
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
        traces = [e.trace for e in self.buffer.entries()]
        counts = self.hosts.token_counts(token_frequencies(traces, self.cfg.model.vocab_size))  # every host's traffic
        d2t, t2d = build_vocab(counts, self.cfg.model.vd)
        self.learner.set_vocab(d2t, t2d)
        self._vocab_pending = False
        log.info("draft vocabulary: the %d most frequent of %d tokens the first traces hold or the target offered "
                 "there (%.1f%% of their frequency)", self.cfg.model.vd, int((counts > 0).sum()), kept_share(counts, t2d))

    def _start_from_target(self) -> None:
        """Once the draft vocabulary is fixed: the day-0 head from the target (loop.head_init=target,
        see `model.head_from_target`), then version 1 if loop.publish_initial."""
        if self._head_pending:
            self.learner.set_params(head_from_target_dir(self.cfg, self.learner.vocab["d2t"]))
            self._head_pending = False
            log.info("draft head initialised from the target %s (lm_head, final norm; fc passes its top aux layer)",
                     self.cfg.target)
        if self._initial_pending:
            self._initial_pending = False
            self.sync()

    def start(self) -> str:
        """Serve TraceIngest (and WeightSync, when configured); returns the ingest address."""
        self.server = IngestServer(self.cfg.ingest, self.cfg.trace_limits, self.buffer, on_accept=self.served.add).start()
        if self.weights is not None:
            self.weights.start()
        if self.cfg.loop.metrics_address:
            self.prometheus = serve_metrics(self, self.cfg.loop.metrics_address)
        return self.server.address

    # ------------------------------------------------------------ one step

    def step(self, timeout: float = 1.0, stop: bool = False) -> bool:
        """Sample, pack and dispatch one optimizer step. False if the buffer had too little (or, with
        several processes, the hosts did not agree to step: see `aurora_jax.hosts`; `stop` is this
        host's wish to stop, and `self.stopped` says when all agreed)."""
        cfg, hosts = self.cfg, self.hosts
        if hosts.count == 1:
            if not self.buffer.wait_for(cfg.loop.min_traces, timeout):
                return False
        else:
            self.buffer.wait_for(-(-cfg.loop.min_traces // hosts.count), timeout)
            decision = hosts.decide(self.buffer.trainable(), cfg.loop.min_traces, time.monotonic() - self._last_step_t,
                                    cfg.loop.host_deadline_s, stop)
            self.stopped = decision == STOP
            if decision != STEP:
                return False
        if self._vocab_pending:
            self._prune_vocab()
            self._start_from_target()
        # Sampling is seeded by (seed, process, step): reproducible across a resume, different per host.
        rng = np.random.default_rng([cfg.loop.seed, hosts.index, self.learner.step])
        wanted = -(-(cfg.loop.traces_per_step or cfg.batch.rows) // hosts.count)
        entries = self.buffer.sample(wanted, rng, self.version)
        if not entries and hosts.count == 1:
            return False
        traces = [e.trace for e in entries]
        args = (self.local_batch, cfg.objective.ttt_length, self.learner.target_to_draft, cfg.objective.train_on_prompt)
        batch, stats, _ = pack(traces, *args, ht3=cfg.model.ht * 3)
        shape = hosts.shape(stats.shape)  # one shape for the global batch (no-op on one process)
        if shape != stats.shape:
            batch, stats, _ = pack(traces, *args, at_least=shape, ht3=cfg.model.ht * 3)
        self._last_step_t = time.monotonic()
        metrics = self.learner.train_step(batch)
        self.ckpt.poll()
        self._flush()
        self._pending = (self.learner.step, metrics, dict(
            traces=len(entries) - stats.left_over, truncated=stats.truncated, dropped_nodes=stats.dropped_nodes,
            lag=float(np.mean([max(0, self.version - e.trace.draft_version) for e in entries])) if entries else 0.0,
            shape=list(batch.tokens.shape)))
        step = self.learner.step
        self._since_sync += 1
        if self._sync_due(step):
            self.sync()
        if cfg.guard.rollback:
            self._check_rollback()
        if self.ckpt.due(step):
            self.save()
        return True

    def _sync_due(self, step: int) -> bool:
        every = self.cfg.loop.sync_every
        if not every:
            return False
        if self.cfg.loop.sync_policy == "adaptive":
            return self._since_sync >= self._next_check
        return step % every == 0

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
                   draft_version=self.version, buffered=s["buffered"], holdout=s["holdout"], accepted=s["accepted"],
                   compiled_shapes=self.learner.compiled_shapes, **info, **m, served=served,
                   guard=dict(self.guard_stats), gate=self.last_gate, rollback=self.last_rollback)
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

    def sync(self) -> bool:
        """Publish the current draft as a new draft_version, if the guard lets it through (finite weights;
        with the gate, not worse than the served version on the held-out slice; adaptive sync: gained
        enough). A failing publisher is logged, not fatal. True if a version was published."""
        cfg, step = self.cfg, self.learner.step
        params = self.learner.published_params()
        if not finite(params):
            self.guard_stats["nonfinite_refused"] += 1
            back = self.served_params is not None
            log.error("not publishing after step %d: the draft's parameters hold NaN or Inf%s", step,
                      f"; training continues from the weights of draft_version {self.served_version}" if back else "")
            if back:
                self.learner.reset_params(copy_params(self.served_params))
            return False
        proxy = self.last.get("accept_len")  # the proxy last read back
        judge = (cfg.guard.gate or cfg.loop.sync_policy == "adaptive") and self.served_params is not None
        if judge:
            held = [e.trace for e in self.buffer.holdout()]
            if len(held) < cfg.guard.gate_min_traces:
                self.guard_stats["gate_unjudged"] += 1
                log.info("step %d: %d held-out traces, fewer than guard.gate_min_traces=%d: publishing unjudged",
                         step, len(held), cfg.guard.gate_min_traces)
            else:
                batches = pack_all(held, cfg.batch, cfg.objective.ttt_length, self.learner.target_to_draft)
                cand, served = self.learner.proxy(batches, params), self.learner.proxy(batches, self.served_params)
                proxy = cand
                self.last_gate = gate = dict(step=step, candidate=cand, served=served, served_version=self.served_version,
                                             traces=len(held), passed=cand >= served - cfg.guard.gate_margin)
                if cfg.loop.sync_policy == "adaptive":
                    limit = cfg.loop.sync_max_steps or 8 * cfg.loop.sync_every
                    if cand - served < cfg.loop.sync_gain and self._since_sync < limit:
                        self.guard_stats["adaptive_waits"] += 1
                        self._next_check = min(2 * self._next_check, limit)  # nothing gained: look again later
                        return False
                if cfg.guard.gate and not gate["passed"]:
                    self.guard_stats["gate_refused"] += 1
                    self._since_sync, self._next_check = 0, cfg.loop.sync_every
                    log.warning("step %d: candidate refused by the gate: held-out proxy %.3f vs %.3f of served "
                                "draft_version %d (margin %.3f, %d traces); training goes on", step, cand, served,
                                self.served_version, cfg.guard.gate_margin, len(held))
                    return False
                if cfg.guard.gate:
                    self.guard_stats["gate_passed"] += 1
        self._publish(params, proxy)
        return True

    def _publish(self, params, proxy: float | None) -> None:
        self.version += 1
        self._since_sync, self._next_check = 0, self.cfg.loop.sync_every
        self.served.published(self.version, proxy)
        if self.keep_weights:
            if self.served_params is not None:
                self.previous = (self.served_version, self.served_params)
            self.served_params, self.served_version = copy_params(params), self.version
        if self.publish is None and self.hosts.count == 1:
            return
        params = self.hosts.replicated(params)  # every process enters this collective; process 0 publishes
        if self.publish is None or not self.hosts.primary:
            return
        t0 = time.perf_counter()
        try:
            self.publish(self.version, nnx.state(self.learner.model(params)))
            log.info("published draft_version %d in %.3fs", self.version, time.perf_counter() - t0)
        except Exception:
            log.exception("publishing draft_version %d failed; serving keeps the previous draft", self.version)

    def _check_rollback(self) -> None:
        """After each step: is the version serving now worse, as served, than the versions before it?"""
        cfg = self.cfg.guard
        if self.previous is None or self.version in self.rolled_back:
            return
        current = self.served.accept_lengths(self.version)
        verdict = served_worse(current, self.served.accept_lengths_before(
            self.version, 4 * cfg.rollback_requests, skip=self.rolled_back), cfg)
        if verdict is None or not verdict.worse:
            return
        bad, (good, weights) = self.version, self.previous
        self.rolled_back.add(bad)
        self.guard_stats["rollbacks"] += 1
        self._publish(weights, self.served.snapshot().get(good, {}).get("proxy_accept_length"))
        self.previous = None  # never roll back onto the version just taken back
        self.last_rollback = dict(step=self.learner.step, version=bad, to_weights_of=good, as_version=self.version,
                                  requests=verdict.n_current, served=verdict.current, before=verdict.reference,
                                  z=verdict.z)
        log.warning("rolled back draft_version %d after %d requests: served acceptance %.2f vs %.2f before it "
                    "(z %.1f); draft_version %d carries the weights of version %d", bad, verdict.n_current,
                    verdict.current, verdict.reference, verdict.z, self.version, good)
        if cfg.reset_on_rollback:
            self.learner.reset_params(copy_params(weights))

    def save(self) -> None:
        guard = dict(stats=self.guard_stats, rolled_back=sorted(self.rolled_back), served_version=self.served_version,
                     previous_version=self.previous[0] if self.previous is not None else None)
        meta = dict(draft_version=self.version, step=self.learner.step, has_embedding=self.has_embedding,
                    config=to_dict(self.cfg), served=self.served.state(), guard=guard)
        extra = {}
        if self.served_params is not None:
            extra["served_params"] = self.served_params
        if self.previous is not None:
            extra["previous_params"] = self.previous[1]
        self.ckpt.save(self.learner.step, self.learner.state, meta, self.learner.vocab, extra)

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
        while not self.stopped and not (cfg.max_steps and self.learner.step >= cfg.max_steps):
            if self.hosts.count == 1 and stop.is_set():
                break
            if not self.step(timeout=0.5, stop=stop.is_set()):
                if self.cfg.guard.rollback:  # served traces still arrive while the buffer is short
                    self._check_rollback()
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

    def abandon(self) -> None:
        """Stop serving and close the spool without entering any collective (a peer process is gone)."""
        if self.server is not None:
            self.server.stop(grace=0)
        if self.weights is not None:
            self.weights.stop(grace=0)
        self.buffer.close()
        self._metrics.close()

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


def run_train(cfg: TrainerConfig, *, resume: bool) -> int:
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
    except Exception:
        if trainer.hosts.count == 1:
            raise
        # Several processes: a peer is gone (or this one failed). No collective can complete now, so
        # nothing is saved and nothing waits: what was acknowledged is in this host's spool, and every
        # process resumes from the last checkpoint all of them finished.
        log.exception("trainer process %d of %d stops: a step with the other processes failed; restart every "
                      "process with --resume (from checkpoint %s, the last all of them finished)",
                      trainer.hosts.index, trainer.hosts.count, trainer.ckpt.latest_step())
        trainer.abandon()
        logging.shutdown()
        os._exit(3)  # skips JAX's shutdown barrier, which would wait for the lost peer
    finally:
        trainer.close()
    print(json.dumps(dict(step=trainer.learner.step, draft_version=trainer.version,
                          params_digest=trainer.learner.params_digest())), flush=True)
    return 0
