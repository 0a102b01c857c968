"""`aurora-jax bench flywheel`: the paper's experiments in miniature, on the shipped demo target.

Each run is a full demo (trainer + engine processes, real gRPC/HTTP) with one thing changed:
  a  day 0: an untrained draft trained online vs target-only serving of the same workload
  b  domain shift: a draft trained on code, then served on prose statically vs kept training online
  c  reject signal: reject_weight 0 vs 0.1 on the same workload
  d  sync interval: several sync_every values, throughput vs adaptation
Tables print ratios; JSON and PNGs go to --out. Minutes per run on 2 cores; not part of the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from aurora_jax.demo import DemoConfig, run_demo
from serving.load import LoadConfig


def _run(out: Path, name: str, load: LoadConfig, trainer=(), serve=()) -> dict:
    cfg = DemoConfig(run_dir=str(out / name), trainer_overrides=list(trainer), serve_overrides=list(serve), load=load)
    print(f"\n=== {name} ===", flush=True)
    run_demo(cfg)
    recs = [json.loads(line) for line in (out / name / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in recs if "error" not in r and r.get("accept_length")]
    half = ok[len(ok) // 2:]
    q = ok[-max(1, len(ok) // 4):]
    mean = lambda rs, k: sum(r[k] for r in rs) / max(len(rs), 1)
    tok_s = lambda rs: sum(r["completion_tokens"] for r in rs) / max(sum(r["latency_s"] for r in rs), 1e-9)
    return dict(name=name, requests=len(recs), accept_all=mean(ok, "accept_length"),
                accept_second_half=mean(half, "accept_length"), accept_last_quarter=mean(q, "accept_length"),
                tok_s_second_half=tok_s(half), tok_s_last_quarter=tok_s(q),
                versions=max((r.get("draft_version") or 0) for r in recs))


def _table(title: str, rows: list[dict], base: dict, cols: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'run':30} " + " ".join(f"{c:>20}" for c in cols) + f" {'tok/s vs base':>14}")
    for r in rows:
        print(f"{r['name']:30} " + " ".join(f"{r[c]:20.2f}" for c in cols) +
              f" {r['tok_s_second_half'] / max(base['tok_s_second_half'], 1e-9):13.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench flywheel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", default="a,b,c,d")
    p.add_argument("--requests", type=int, default=200, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--sync", default="5,15,45", help="sync_every values for (d)")
    p.add_argument("--out", default="runs/bench/flywheel")
    a = p.parse_args(argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load = LoadConfig(requests=a.requests, concurrency=2, max_tokens=a.max_tokens)
    none = ["draft.mode=none", "subscribe_weights=false"]
    results: dict = {}
    exps = set(a.experiments.split(","))

    if "a" in exps:
        base = _run(out, "a-target-only", load, serve=none)
        online = _run(out, "a-day0-online", load)
        results["a"] = dict(target_only=base, online=online)
        _table("(a) day 0: untrained draft trained online vs target-only (paper: 1.5x)", [base, online], base,
               ["accept_second_half", "tok_s_second_half"])
    if "b" in exps:
        code = dataclasses.replace(load, domains=["code"], shape="ordered")
        prose = dataclasses.replace(load, domains=["prose"], shape="ordered")
        _run(out, "b-train-on-code", code)
        from aurora_jax.export import export_hf
        draft = export_hf(str(out / "b-train-on-code" / "ckpt"), str(out / "b-draft-code"))
        hf = ["draft.mode=hf", f"draft.path={draft}"]
        base = _run(out, "b-target-only-prose", prose, serve=none)
        static = _run(out, "b-static-on-prose", prose, serve=hf + ["subscribe_weights=false"])
        online = _run(out, "b-online-on-prose", prose, trainer=[f"loop.init_from={draft}"], serve=hf)
        results["b"] = dict(target_only=base, static=static, online=online)
        _table("(b) after the shift to prose: static vs online (paper: 1.25x online over static)",
               [base, static, online], static, ["accept_second_half", "tok_s_second_half"])
    if "c" in exps:
        rows = [_run(out, f"c-reject-{w}", load, trainer=[f"objective.reject_weight={w}"]) for w in (0.0, 0.1)]
        results["c"] = rows
        _table("(c) reject signal at equal traces", rows, rows[0], ["accept_second_half", "accept_last_quarter"])
    if "d" in exps:
        rows = [_run(out, f"d-sync-{k}", load, trainer=[f"loop.sync_every={k}"]) for k in map(int, a.sync.split(","))]
        results["d"] = rows
        _table("(d) sync interval: adaptation vs throughput", rows, rows[0],
               ["versions", "accept_second_half", "tok_s_second_half"])
        _pareto(rows, out / "d-pareto.png")
    (out / "flywheel.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'flywheel.json'} (each run's plot: {out}/<run>/flywheel.png)")
    return 0


def _pareto(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        ax.scatter(r["accept_second_half"], r["tok_s_second_half"])
        ax.annotate(r["name"].replace("d-", ""), (r["accept_second_half"], r["tok_s_second_half"]), fontsize=8)
    ax.set_xlabel("acceptance length (second half)")
    ax.set_ylabel("tokens/s (second half)")
    ax.set_title("sync interval: adaptation vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
