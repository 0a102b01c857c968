"""A shortened `make demo` end to end: two real processes, real HTTP and gRPC, the loop closes."""

from __future__ import annotations

import json
import subprocess

from apps.demo import DemoConfig, run_demo
from apps.load import LoadConfig


def test_short_demo_closes_the_loop(tmp_path):
    run = tmp_path / "demo"
    cfg = DemoConfig(run_dir=str(run), trainer_overrides=["loop.sync_every=3", "checkpoint.every=0"],
                     load=LoadConfig(requests=24, concurrency=2, max_tokens=32), until_version=2, max_requests=400,
                     side_by_side_requests=3, side_by_side_rounds=2, side_by_side_concurrency=[2],
                     side_by_side_split="train")  # (the toy prompts have no held-out split)
    assert run_demo(cfg) == 0
    summary = json.loads((run / "report.json").read_text())["summary"]
    train = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    requests = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    assert summary["failed"] == 0 and 24 <= len(requests) <= 400
    assert sorted(r["index"] for r in requests) == list(range(len(requests)))  # each request once, numbered in order sent
    assert train[-1]["accepted"] > 0  # traces were ingested by the trainer
    swaps = float(next(l.split()[1] for l in summary["metrics"].splitlines() if l.startswith("aurora_draft_swaps_total")))
    assert swaps >= 1 and max(summary["draft_versions_served"]) > 0
    assert any((r.get("draft_version") or 0) >= 2 for r in requests)  # requests were served by trained drafts
    assert train[-1]["acc_d0"] > train[0]["acc_d0"]  # offline per-depth accuracy improved
    assert (run / "flywheel.png").stat().st_size > 10_000
    # proxy vs served per version, read from the trainer's Prometheus endpoint before it stopped
    per_version = {r["version"]: r for r in summary["per_version"]}
    served = [r for r in per_version.values() if r.get("requests")]
    counted, sent = sum(r["requests"] for r in served), summary["requests"] - summary["failed"]
    assert 0.8 * sent <= counted <= sent  # the last traces may still be in flight when it is read
    assert any(r.get("proxy") is not None and r.get("served") is not None for r in served)
    assert summary["proxy_minus_served"] is not None and (run / "proxy_vs_served.png").stat().st_size > 10_000
    (sbs,) = summary["side_by_side"]  # target-only vs the last draft on the same engine, f32: lossless
    assert sbs["prompts"] == 3 and sbs["outputs_identical"] == 3 and not sbs["outputs_differ"]
    assert sbs["target_only_tokens_per_s"] > 0 and sbs["speculative_tokens_per_s"] > 0 and sbs["accept_length"] > 1
    assert sbs["draft_version"] >= 2 and summary["versions_refused"] == 0
    left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout
    assert not left.strip(), f"stray processes: {left}"


def test_demo_fails_loudly_when_the_engine_refuses_every_version(tmp_path, capsys):
    """An engine serving a draft the trainer did not train for (here: another draft vocabulary) refuses
    every version; the demo says so, counts it in the report and exits non-zero."""
    import numpy as np

    from bridge.eagle3 import DraftConfig, draft_fields_from_target, read_target_config, save_hf

    cfg = DraftConfig(**{**draft_fields_from_target(read_target_config("models/demo-target")), "draft_vocab_size": 1024})
    rng = np.random.default_rng(0)
    sd = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in cfg.shapes().items()
          if k not in ("embed_tokens.weight", "d2t", "t2d")}
    sd["d2t"], sd["t2d"] = np.zeros(1024, np.int64), np.arange(cfg.vocab_size) < 1024
    other = save_hf(tmp_path / "other-draft", cfg, sd)
    run = tmp_path / "demo"
    demo = DemoConfig(run_dir=str(run), trainer_overrides=["loop.publish_initial=true", "checkpoint.every=0"],
                      serve_overrides=["draft.mode=hf", f"draft.path={other}"],
                      load=LoadConfig(requests=8, concurrency=2, max_tokens=8))
    assert run_demo(demo) == 1
    summary = json.loads((run / "report.json").read_text())["summary"]
    assert summary["versions_refused"] >= 1 and summary["draft_versions_served"] == [0]
    assert "draft_vocab_size" in summary["last_refusal"]
    err = capsys.readouterr().err
    assert "demo FAILED: the engine refused" in err and "never served a draft version > 0" in err
