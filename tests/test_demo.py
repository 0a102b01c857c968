"""A shortened `make demo` end to end: two real processes, real HTTP and gRPC, the loop closes."""

from __future__ import annotations

import json
import subprocess

from aurora_jax.demo import DemoConfig, run_demo
from serving.load import LoadConfig


def test_short_demo_closes_the_loop(tmp_path):
    run = tmp_path / "demo"
    cfg = DemoConfig(run_dir=str(run), trainer_overrides=["loop.sync_every=6", "checkpoint.every=0"],
                     load=LoadConfig(requests=40, concurrency=2, max_tokens=32), until_version=2, max_requests=400)
    assert run_demo(cfg) == 0
    summary = json.loads((run / "report.json").read_text())["summary"]
    train = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    requests = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    assert summary["failed"] == 0 and 40 <= len(requests) <= 400
    assert train[-1]["accepted"] > 0  # traces were ingested by the trainer
    swaps = float(next(l.split()[1] for l in summary["metrics"].splitlines() if l.startswith("aurora_draft_swaps_total")))
    assert swaps >= 1 and max(summary["draft_versions_served"]) > 0
    assert any((r.get("draft_version") or 0) >= 2 for r in requests)  # requests were served by trained drafts
    assert train[-1]["acc_d0"] > train[0]["acc_d0"]  # offline per-depth accuracy improved
    assert (run / "flywheel.png").stat().st_size > 10_000
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout
    assert not left.strip(), f"stray processes: {left}"
