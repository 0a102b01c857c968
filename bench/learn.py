"""`aurora-jax bench learn`: how fast a trainer config learns from recorded traffic (day-0 curves, offline).

Replays a spool (the traces a demo or a deployment recorded, in arrival order): the first `--train`
traces are released to the trainer as training time passes (all of them by the end of `--budget`
seconds of train steps, compiles not counted, as live traffic would arrive); the last `--heldout` are
never trained on and score the draft: the acceptance-length proxy over their generated positions (as
the loss computes it: 1 + the leading run of chain predictions that match the target's argmax).
Arrived traces go through the trainer's own replay buffer (`buffer.*`: staleness weighting against a
draft version that advances every `loop.sync_every` steps, `max_staleness`, `max_reuse`), so a buffer
policy is measured as the trainer lives it: when every arrived trace is used up, the trainer waits for
the next arrival and that time buys no steps.
Each arm is a list of trainer-config overrides on `--config`, run `--seeds` times from scratch with the
trainer's own day-0 start (vocabulary from the first traces, head from the target); arms run one after
the other in one process, so their budgets are comparable. Prints a table, writes learn.json.

    aurora-jax bench learn --spool runs/demo/spool --arms "base" "optim.lr=1e-3" "objective.ttt_length=2"
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.report import write_json


def load_spool(path: str) -> list[tuple[bytes, object]]:
    """Every trace in a spool directory, consumed or not, in arrival (seq) order: (payload, Trace), the
    Trace a zero-copy view of its payload bytes (so keeping both costs no second copy)."""
    from aurora_jax.buffer import _read_records
    from bridge.traces import decode

    records = [r for seg in sorted(Path(path).glob("seg-*.log")) for r in _read_records(seg, truncate_tail=False)]
    if not records:
        raise SystemExit(f"no traces in {path} (a spool directory: buffer.spool_dir of a trainer)")
    return [(payload, decode(payload)) for _, payload in sorted(records, key=lambda r: r[0])]


def run_arm(cfg, train: list, heldout: list, budget: float, evals: int, seed: int) -> dict:
    """One trainer from scratch on `train` [(payload, Trace)] arriving over `budget` seconds of steps."""
    import dataclasses
    import tempfile

    import jax
    import numpy as np

    from aurora_jax.batching import pack, pack_all
    from aurora_jax.buffer import ReplayBuffer
    from aurora_jax.draft_init import head_from_target_dir, resolve_draft, vocab_from_traces
    from aurora_jax.train import Learner, make_mesh

    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=seed))
    draft = resolve_draft(cfg)
    learner = Learner(draft.model, cfg.objective, cfg.optim, make_mesh(cfg.mesh), cfg.mesh.fsdp)
    first = [t for _, t in train[:max(cfg.loop.min_traces, 1)]]
    if not draft.vocab_fixed:
        d2t, t2d, _ = vocab_from_traces(cfg, first)
        learner.set_vocab(d2t, t2d)
    if cfg.loop.head_init == "target" and not cfg.loop.init_from:
        learner.set_params(head_from_target_dir(cfg, learner.vocab["d2t"]))
    ttt, to_draft = cfg.objective.ttt_length, learner.target_to_draft
    scored = pack_all(list(heldout), cfg.batch, ttt, to_draft)

    rng = np.random.default_rng(seed)
    per_step = cfg.loop.traces_per_step or cfg.batch.rows
    curve, spent, steps, waited = [dict(train_s=0.0, steps=0, proxy=learner.proxy(scored))], 0.0, 0, 0.0
    marks = [budget * (i + 1) / evals for i in range(evals)]
    arrival = lambda i: budget * i / len(train)  # trace i arrives at this much train time
    with tempfile.TemporaryDirectory(prefix="bench-learn-") as spool:
        buffer = ReplayBuffer(dataclasses.replace(cfg.buffer, spool_dir=spool, fsync="none", direct_io=False,
                                                  holdout_fraction=0.0))
        released = 0
        while spent < budget:
            version = steps // cfg.loop.sync_every if cfg.loop.sync_every else 0
            while released < len(train) and (released < len(first) or arrival(released) <= spent):
                payload, trace = train[released]  # served by the version the trainer has published by now
                buffer.put(payload, dataclasses.replace(trace, draft_version=version))
                released += 1
            entries = buffer.sample(per_step, rng, version)
            if not entries:  # every arrived trace used up: wait for the next one (no steps meanwhile)
                if released == len(train):
                    break
                waited += arrival(released) - spent
                spent = arrival(released)
                continue
            batch, _, _ = pack([e.trace for e in entries], cfg.batch, ttt, to_draft, cfg.objective.train_on_prompt)
            shapes, t0 = learner.compiled_shapes, time.perf_counter()
            jax.block_until_ready(learner.train_step(batch))
            if learner.compiled_shapes == shapes:  # a step that compiled a new shape is not charged
                spent += time.perf_counter() - t0
            steps += 1
            while marks and spent >= marks[0]:
                marks.pop(0)
                curve.append(dict(train_s=round(spent, 1), steps=steps, proxy=learner.proxy(scored)))
        buffer.close()
    if marks:  # the buffer ran dry for good before the budget was spent
        curve.append(dict(train_s=round(spent, 1), steps=steps, proxy=learner.proxy(scored)))
    return dict(seed=seed, steps=steps, waited_s=round(waited, 1), proxy=curve[-1]["proxy"], curve=curve)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench learn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spool", required=True, help="a trainer's buffer.spool_dir, e.g. runs/demo/spool after make demo")
    p.add_argument("--config", default="configs/smollm2-trainer.yaml", help="trainer config the arms override")
    p.add_argument("--arms", nargs="+", default=["base"],
                   help='each a space-separated list of key=value overrides ("base" = none)')
    p.add_argument("--train", type=int, default=0, help="traces trained on (0 = all but the held-out ones)")
    p.add_argument("--heldout", type=int, default=32, help="the last traces, never trained on, score each draft")
    p.add_argument("--budget", type=float, default=180.0, help="seconds of train steps per run")
    p.add_argument("--evals", type=int, default=4, help="scores along the way")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args(argv)

    from aurora_jax.config import TrainerConfig
    from bridge.config import load_config

    traces = load_spool(a.spool)
    if len(traces) <= a.heldout:
        raise SystemExit(f"{a.spool} holds {len(traces)} traces; --heldout {a.heldout} leaves none to train on")
    heldout = [t for _, t in traces[-a.heldout:]]
    train = traces[:a.train or len(traces) - a.heldout]
    print(f"{a.spool}: {len(traces)} traces; training on the first {len(train)}, scoring on the last {len(heldout)}; "
          f"{a.budget:.0f} s of train steps per run", flush=True)
    rows = []
    for arm in a.arms:
        overrides = [] if arm.strip() == "base" else arm.split()
        cfg = load_config(TrainerConfig, a.config, overrides)
        for seed in range(a.seeds):
            r = run_arm(cfg, train, heldout, a.budget, a.evals, seed)
            rows.append(dict(arm=arm, **r))
            print(f"  {arm}: seed {seed}: {r['steps']} steps ({r['waited_s']:.0f} s waiting for traffic), "
                  "held-out proxy " + " -> ".join(f"{c['proxy']:.3f}" for c in r["curve"]), flush=True)
    print(f"\n{'arm':40} {'runs':>4} {'steps':>6} {'waited s':>8} {'held-out acceptance proxy':>26}")
    for arm in a.arms:
        rs = [r for r in rows if r["arm"] == arm]
        vals = [r["proxy"] for r in rs]
        spread = f" ({min(vals):.3f}..{max(vals):.3f})" if len(vals) > 1 else ""
        print(f"{arm[:40]:40} {len(rs):4d} {statistics.mean(r['steps'] for r in rs):6.0f} "
              f"{statistics.mean(r['waited_s'] for r in rs):8.0f} {statistics.mean(vals):12.3f}{spread}")
    write_json(a.out, "learn", dict(args=vars(a), runs=rows))
    return 0
