"""`aurora-jax bench flywheel`: the paper's experiments in miniature, on the demo's real target.

Each run is a full demo (`apps.demo`: trainer + engine processes, real gRPC/HTTP) built from
one demo config (default: `make demo`'s, SmolLM2-135M-Instruct) with one thing changed:
  a  day 0: the untrained draft trained online, then target-only vs the final draft side by side
  b  domain shift: a draft trained online on code, then served on prose statically (no trainer)
     vs kept training online; each ends with a side-by-side against target-only on held-out prose
  c  reject signal: objective.reject_weight 0 vs the config's, over several seeds (trainer init and
     prompt order), served acceptance with the spread across seeds
  d  sync interval: several loop.sync_every values, served acceptance and throughput
  e  sync policy after a shift (the Pareto): the code draft of (b) kept training on prose, published
     every 5/15/45 steps (fixed) or when the gated proxy gains (adaptive, 20% of traffic held out);
     per arm the swaps served, the served throughput (every cost of a swap included) and the
     post-shift adaptation (served acceptance length, second half)
Speedups come only from side-by-sides (target-only and speculative interleaved on one engine with
the trainer stopped, `apps.load.side_by_side`), never from comparing two runs' wall clocks: the
runs share 2 cores with a trainer whose load differs between them. Acceptance length (tokens per
target forward) does not depend on load, so (c) and (d) compare it across runs.
Prints tables, writes <out>/flywheel.json and each run's report/plot under <out>/<run>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from apps.demo import ROOT, DemoConfig, run_demo
from bridge.config import load_config


def _run(base: DemoConfig, out: Path, name: str, requests: int, trainer=(), serve=(), sbs: bool = False,
         train: bool = True, require_new_version: bool = True, **load_changes) -> dict:
    """One demo run; its served acceptance (second half, last quarter), throughput, versions, side-by-side."""
    load = dataclasses.replace(base.load, requests=requests, **load_changes)
    cfg = dataclasses.replace(base, run_dir=str(out / name), load=load, train=train,
                              require_new_version=require_new_version,
                              trainer_overrides=[*base.trainer_overrides, *trainer],
                              serve_overrides=[*base.serve_overrides, *serve],
                              side_by_side_requests=base.side_by_side_requests if sbs else 0,
                              side_by_side_concurrency=[base.load.concurrency], prepare_target="")
    print(f"\n=== {name} ===", flush=True)
    t0 = time.perf_counter()
    code = run_demo(cfg)
    report = json.loads((out / name / "report.json").read_text())["summary"]
    recs = [json.loads(line) for line in (out / name / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in recs if "error" not in r and r.get("accept_length")]
    half, quarter = ok[len(ok) // 2:], ok[-max(1, len(ok) // 4):]
    al = lambda rs: sum(r["completion_tokens"] for r in rs) / max(sum(r["target_forwards"] for r in rs), 1)
    tok_s = lambda rs: statistics.mean(r["throughput"] for r in rs) if rs else 0.0
    side = (report["side_by_side"] or [None])[0]
    return dict(name=name, exit=code, seconds=round(time.perf_counter() - t0, 1), requests=len(recs),
                failed=report["failed"], trainer_steps=report["trainer_steps"],
                versions=max((r.get("draft_version") or 0) for r in recs),
                versions_served=len({r.get("draft_version") or 0 for r in ok}),
                accept_second_half=al(half), accept_last_quarter=al(quarter),
                tok_s_second_half=tok_s(half), tok_s_all=tok_s(ok), side_by_side=side,
                speedup=side["speedup"] if side else None, heldout_accept=side["accept_length"] if side else None)


def _table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n{title}")
    print(f"  {'run':24}" + "".join(f"{c:>20}" for c in cols))
    for r in rows:
        cells = [r.get(c) for c in cols]
        print(f"  {r['name']:24}" + "".join(f"{'-':>20}" if v is None else f"{v:20.2f}" if isinstance(v, float)
                                             else f"{v!s:>20}" for v in cells))


def _spread(xs: list[float]) -> dict:
    return dict(mean=statistics.mean(xs), min=min(xs), max=max(xs), stdev=statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench flywheel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="configs/demo-smollm2.yaml", help="the demo config every run starts from "
                   "(configs/demo-cpu.yaml: the toy target, minutes)")
    p.add_argument("--experiments", default="a,b,c,d,e")
    p.add_argument("--requests", type=int, default=0, help="requests of (a) (default: the demo config's)")
    p.add_argument("--requests-shift", type=int, default=96, help="requests of each phase of (b): code, then prose "
                   "static and online (the code draft (e) starts from is (b)'s)")
    p.add_argument("--requests-short", type=int, default=48, help="requests of each run of (c), (d), (e)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm of (c)")
    p.add_argument("--sync", default="2,10", help="sync_every values for (d)")
    p.add_argument("--pareto", default="5,15,45,adaptive", help="the arms of (e): sync_every values and/or adaptive")
    p.add_argument("--code-draft", default="", help="(e) only: start from this exported code draft (e.g. an earlier "
                   "run's b-draft-code) instead of training one")
    p.add_argument("--out", default="runs/bench/flywheel")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config")
    a = p.parse_args(argv)
    base = load_config(DemoConfig, a.demo, a.overrides)
    if not base.side_by_side_requests:
        base.side_by_side_requests = 6
    if base.prepare_target:  # once, before any run
        subprocess.run([sys.executable, "-m", "apps.cli", "prepare-target", base.prepare_target, "--out",
                        base.target], check=True, cwd=ROOT)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n, n_shift = a.requests_short, a.requests_shift
    results: dict = dict(demo=a.demo, overrides=a.overrides)
    exps = set(a.experiments.split(","))
    t0 = time.perf_counter()

    if "a" in exps:
        r = _run(base, out, "a-day0", a.requests or base.load.requests, sbs=True)
        results["a"] = r
        _table("(a) day 0: untrained draft trained online; side-by-side vs target-only on held-out prompts "
               "(paper: 1.5x)", [r], ["trainer_steps", "accept_last_quarter", "heldout_accept", "speedup"])
    prose = dict(domains=["prose"], shape="ordered")
    code, hf, draft = None, [], ""
    if a.code_draft and "b" not in exps:
        draft = a.code_draft
        hf = ["draft.mode=hf", f"draft.path={draft}"]
    elif exps & {"b", "e"}:  # both start from a draft trained online on code
        code = _run(base, out, "b-code-online", n_shift, domains=["code"], shape="ordered")
        from aurora_jax.export import export_hf
        draft = export_hf(str(out / "b-code-online" / "ckpt"), str(out / "b-draft-code"))
        hf = ["draft.mode=hf", f"draft.path={draft}"]
    if "b" in exps:
        static = _run(base, out, "b-prose-static", n_shift, serve=hf, sbs=True, train=False, **prose)
        online = _run(base, out, "b-prose-online", n_shift, trainer=[f"loop.init_from={draft}"], serve=hf, sbs=True, **prose)
        ratio = online["speedup"] / static["speedup"]
        results["b"] = dict(code=code, static=static, online=online, online_over_static=ratio)
        _table(f"(b) after the shift code -> prose: static vs online; online/static speedup {ratio:.2f}x "
               "(paper: 1.25x)", [static, online], ["accept_second_half", "heldout_accept", "speedup"])
    if "c" in exps:
        w = base_reject(base)
        arms = {}
        for weight in (0.0, w):
            arms[weight] = [_run(base, out, f"c-reject{weight}-seed{s}", n, seed=s,
                                 trainer=[f"objective.reject_weight={weight}", f"loop.seed={s}"])
                            for s in range(a.seeds)]
        results["c"] = {str(k): dict(runs=v, accept_second_half=_spread([r["accept_second_half"] for r in v]))
                        for k, v in arms.items()}
        print("\n(c) reject signal at equal traces: served acceptance length, second half, over seeds")
        for k, v in results["c"].items():
            s = v["accept_second_half"]
            print(f"  reject_weight {k:>4}: mean {s['mean']:.3f}  min..max {s['min']:.3f}..{s['max']:.3f}  "
                  f"stdev {s['stdev']:.3f}  ({len(v['runs'])} seeds)")
    if "d" in exps:
        rows = [_run(base, out, f"d-sync{k}", n, trainer=[f"loop.sync_every={k}"]) for k in map(int, a.sync.split(","))]
        results["d"] = rows
        _table("(d) sync interval: versions served and acceptance", rows,
               ["trainer_steps", "versions", "accept_second_half", "tok_s_second_half"])
    if "e" in exps:
        rows = []
        for arm in a.pareto.split(","):
            policy = (["loop.sync_policy=adaptive", "loop.sync_every=5", "loop.sync_max_steps=40",
                       "buffer.holdout_fraction=0.2", "guard.gate_min_traces=3"]  # a slice that can judge early
                      if arm == "adaptive" else [f"loop.sync_every={int(arm)}"])
            r = _run(base, out, f"e-sync-{arm}", n, trainer=[f"loop.init_from={draft}", *policy], serve=hf,
                     require_new_version=False, **prose)  # a slow arm may publish after its last request
            rows.append(dict(r, policy=arm))
        results["e"] = dict(arms=rows, code=None if "b" in exps else code)
        _table("(e) sync policy after the shift code -> prose: swaps served vs throughput vs adaptation", rows,
               ["trainer_steps", "versions_served", "tok_s_all", "accept_second_half"])
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "flywheel.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['seconds'] / 60:.1f} min; wrote {out / 'flywheel.json'} (each run: {out}/<run>/)")
    failed = [r["name"] for r in _all_runs(results) if r["exit"] or r["failed"]]
    if failed:
        print(f"runs that failed (see their logs): {failed}")
    return 1 if failed else 0


def base_reject(base: DemoConfig) -> float:
    """The reject weight the demo's trainer config uses (the arm compared with 0)."""
    from aurora_jax.config import TrainerConfig
    cfg = load_config(TrainerConfig, base.trainer_config, [*base.trainer_overrides, f"target={base.target}"])
    return cfg.objective.reject_weight or 0.1


def _all_runs(results: dict) -> list[dict]:
    runs = [results.get("a")] + [results.get("b", {}).get(k) for k in ("code", "static", "online")]
    runs += [results.get("e", {}).get("code")] + list(results.get("e", {}).get("arms", []))
    runs += [r for v in results.get("c", {}).values() for r in v["runs"]] + list(results.get("d", []))
    return [r for r in runs if r]
