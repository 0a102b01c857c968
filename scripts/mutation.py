"""`make mutation`: mutation testing (cosmic-ray) of the modules listed in tests/mutation.toml.

Per module: the working tree is copied to a temporary directory (cosmic-ray edits files in place),
the module's tests run once unmutated (baseline, and the per-mutant timeout: 3x that), cosmic-ray
enumerates the mutants, the excluded operator families and all but a seeded sample are marked
skipped, and each remaining mutant runs the module's tests. The score is killed / run with a 95%
Wilson interval; survivors are listed with their line, operator and diff for triage. Prints a table,
writes runs/mutation/<module>.json. Usage: scripts/mutation.py [--only validate,buffer] [--sample N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run_module(mod: dict, exclude: list[str], sample: int, seed: int, out: Path) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with tempfile.TemporaryDirectory(prefix="aurora-mutation-") as tmp:
        tmp = Path(tmp)
        copy_tree(tmp)
        env = dict(os.environ, PYTHONPATH=str(tmp), JAX_PLATFORMS="cpu")
        test = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {' '.join(mod['tests'])}"
        t0 = time.monotonic()
        base = subprocess.run(shlex.split(test), cwd=tmp, env=env, capture_output=True, text=True)
        baseline_s = time.monotonic() - t0
        if base.returncode != 0:
            raise SystemExit(f"{mod['path']}: its tests fail unmutated:\n{base.stdout[-2000:]}")
        cfg, db = tmp / "cosmic-ray.toml", tmp / "session.sqlite"
        cfg.write_text(
            "[cosmic-ray]\n"
            f"module-path = {json.dumps([mod['path']])}\n"
            f"timeout = {max(60.0, 3 * baseline_s):.0f}\n"
            "excluded-modules = []\n"
            f"test-command = {json.dumps(test)}\n"
            "[cosmic-ray.distributor]\nname = \"local\"\n"
            "[cosmic-ray.filters.operators-filter]\n"
            f"exclude-operators = {json.dumps(exclude)}\n")
        subprocess.run([BIN / "cosmic-ray", "init", cfg, db], cwd=tmp, env=env, check=True)
        subprocess.run([BIN / "cr-filter-operators", db, cfg], cwd=tmp, env=env, check=True)
        with use_db(str(db), WorkDB.Mode.open) as wdb:
            def where(w):  # job ids are random per run: order by the mutation itself, so a seed picks the same sample
                m = w.mutations[0]
                return (m.start_pos, m.end_pos, m.operator_name, m.occurrence)
            pending = sorted(wdb.pending_work_items, key=where)
            total = len(pending)
            keep = set(random.Random(seed).sample(range(total), min(sample, total))) if sample else set(range(total))
            skip = [w.job_id for i, w in enumerate(pending) if i not in keep]
            if skip:
                wdb.set_multiple_results(skip, WorkResult(output="not in the sample",
                                                          worker_outcome=WorkerOutcome.SKIPPED))
        t0 = time.monotonic()
        subprocess.run([BIN / "cosmic-ray", "exec", cfg, db], cwd=tmp, env=env, check=True)
        exec_s = time.monotonic() - t0
        runs = []
        with use_db(str(db), WorkDB.Mode.open) as wdb:
            for item, res in wdb.completed_work_items:
                if res.worker_outcome == WorkerOutcome.SKIPPED:
                    continue
                m = item.mutations[0]
                runs.append(dict(line=m.start_pos[0], operator=m.operator_name, occurrence=m.occurrence,
                                 definition=m.definition_name, outcome=(res.test_outcome or res.worker_outcome).value,
                                 diff=res.diff or ""))
    killed = sum(r["outcome"] in ("killed", "incompetent") for r in runs)
    lo, hi = wilson(killed, len(runs))
    report = dict(module=mod["path"], tests=mod["tests"], mutants_total=total, run=len(runs), killed=killed,
                  score=killed / max(len(runs), 1), score_95=[lo, hi], baseline_s=baseline_s, exec_s=exec_s,
                  seed=seed, survivors=sorted((r for r in runs if r["outcome"] == "survived"), key=lambda r: r["line"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / (Path(mod["path"]).stem + ".json")).write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "tests" / "mutation.toml"))
    p.add_argument("--only", default="", help="comma-separated module stems (e.g. validate,buffer)")
    p.add_argument("--sample", type=int, default=-1, help="mutants per module (-1: the config's; 0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "mutation"))
    a = p.parse_args(argv)
    conf = tomllib.loads(Path(a.config).read_text())
    only = {s for s in a.only.split(",") if s}
    mods = [m for m in conf["module"] if not only or Path(m["path"]).stem in only]
    rows = []
    for mod in mods:
        r = run_module(mod, conf.get("exclude_operators", []), mod.get("sample", 0) if a.sample < 0 else a.sample,
                       a.seed, Path(a.out))
        rows.append(r)
        print(f"{r['module']}: {r['killed']}/{r['run']} killed ({100 * r['score']:.0f}%, 95% "
              f"{100 * r['score_95'][0]:.0f}-{100 * r['score_95'][1]:.0f}%) of {r['mutants_total']} mutants, "
              f"{r['exec_s'] / 60:.1f} min", flush=True)
        for s in r["survivors"]:
            print(f"  survived: line {s['line']} in {s['definition']}: {s['operator']}")
    print(f"\n{'module':32} {'run':>5} {'killed':>7} {'score':>6} {'95% interval':>13} {'mutants':>8}")
    for r in rows:
        print(f"{r['module']:32} {r['run']:5d} {r['killed']:7d} {100 * r['score']:5.0f}% "
              f"{100 * r['score_95'][0]:5.0f}-{100 * r['score_95'][1]:3.0f}% {r['mutants_total']:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
