"""`make demo`: the whole serve -> train -> hot-swap flywheel on CPU, from day 0.

Starts two processes, exactly as a deployment would run them: the trainer (`aurora-jax train`:
TraceIngest + buffer + train loop + WeightSync) and the embedded engine (`aurora-jax serve`) on the
shipped demo target with an untrained draft. A workload from the shipped domains runs against the
engine's OpenAI-compatible endpoint; every finished request's trace trains the draft, and every
`loop.sync_every` steps the new draft is hot-swapped into the engine. At the end: a JSON report and
a PNG of acceptance length and per-request throughput over requests, with the swap points marked.
Every process started here is stopped here (also on Ctrl-C or error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from apps.load import LoadConfig, run_load, side_by_side
from bridge.config import load_config, to_dict
from serving.sglang.config import SGLangLaunchConfig

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class DemoConfig:
    run_dir: str = "runs/demo"
    target: str = "models/demo-target"
    trainer_config: str = "configs/demo-trainer.yaml"
    serving: str = "embedded"  # embedded (`aurora-jax serve`, CPU) | sglang (`aurora-jax sglang-launch`, GPU host)
    serve_config: str = "configs/demo-serve.yaml"  # EngineConfig YAML, or SGLangLaunchConfig YAML for sglang
    trainer_overrides: list[str] = dataclasses.field(default_factory=list)
    serve_overrides: list[str] = dataclasses.field(default_factory=list)
    load: LoadConfig = dataclasses.field(default_factory=LoadConfig)
    until_version: int = 0  # after load.requests, keep sending until a request is served by this draft version
    max_requests: int = 0  # ... but never more requests than this in total
    start_timeout_s: float = 180.0
    prepare_target: str = ""  # a known real target (`aurora-jax prepare-target NAME`) made into `target` on first use
    # After the flywheel, with the trainer stopped: target-only vs the final draft on the same engine,
    # on held-out prompts (load.split=heldout), in interleaved rounds (apps.load.side_by_side).
    side_by_side_requests: int = 0  # held-out prompts per arm and round (0 = no side-by-side)
    side_by_side_rounds: int = 3
    side_by_side_concurrency: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    side_by_side_split: str = "heldout"  # the prompts' split it runs on (never sent while training)
    train: bool = True  # false: no trainer; the engine serves its draft statically (a baseline of `bench flywheel`)
    require_new_version: bool = True  # false: no version > 0 served is a result, not a failure (slow-sync arms)
    # Embedded day 0: the pruned draft vocabulary from the workload's prompts (`count-tokens`, the load's
    # split), not from the first few traces (README, "Draft vocabulary": 95% of later outputs vs 89%).
    vocab_from_prompts: bool = False

    def __post_init__(self):
        if self.serving not in ("embedded", "sglang"):
            raise ValueError("serving must be embedded or sglang")
        if not self.train and self.serving != "embedded":
            raise ValueError("train: false (static serving) is for serving: embedded")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    """A child process whose stdout lines we wait on and whose stderr goes to a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "w")
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                  start_new_session=True)

    def wait_line(self, prefix: str, timeout: float) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            line = self.p.stdout.readline()
            if line.startswith(prefix):
                return line.split()[-1]
            if not line and self.p.poll() is not None:
                break
        raise RuntimeError(f"{self.name} did not print {prefix!r} (exit {self.p.poll()}); see {self.log_path}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()


def _plot(records: list[dict], path: Path, side_by_side: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in records if "error" not in r]
    x = np.array([r["index"] for r in ok])
    acc = np.array([r["accept_length"] or 0 for r in ok])
    thr = np.array([r["throughput"] for r in ok])
    k = max(1, len(ok) // 20)
    smooth = lambda a: np.array([a[max(0, i - k + 1):i + 1].mean() for i in range(len(a))])  # trailing mean
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    colors = {d: c for d, c in zip(sorted({r["domain"] for r in ok}), ("tab:blue", "tab:orange", "tab:green"))}
    for d, c in colors.items():
        m = np.array([r["domain"] == d for r in ok])
        a1.scatter(x[m], acc[m], s=8, color=c, alpha=0.5, label=d)
        a2.scatter(x[m], thr[m], s=8, color=c, alpha=0.5, label=d)
    a1.plot(x, smooth(acc), color="black", lw=1.5, label=f"mean of {k}")
    a2.plot(x, smooth(thr), color="black", lw=1.5)
    versions = [r.get("draft_version") or 0 for r in ok]
    labelled = -np.inf  # every swap gets its line; labels keep ~1/15 of the axis apart, so they stay legible
    for i in range(1, len(ok)):
        if versions[i] != versions[i - 1]:
            for ax in (a1, a2):
                ax.axvline(x[i], color="gray", ls=":", lw=0.8)
            if x[i] - labelled >= (x[-1] - x[0]) / 15:
                a1.text(x[i], max(acc) * 1.02, f"v{versions[i]}", fontsize=7, color="gray")
                labelled = x[i]
    if side_by_side:  # measured after the flywheel with the trainer stopped, on held-out prompts
        x = side_by_side
        a2.axhline(x["target_only_request_throughput"], color="red", ls="--", lw=1,
                   label="target only (side-by-side: trainer stopped, held-out prompts)")
        a2.axhline(x["speculative_request_throughput"], color="green", ls="--", lw=1,
                   label=f"final draft v{x['draft_version']} (same side-by-side)")
        a2.legend(fontsize=8, loc="upper left")
    a1.set_ylabel("acceptance length\n(tokens / target forward)")
    a2.set_ylabel("per-request throughput\n(tokens / s)")
    a2.set_xlabel("request (order sent)")
    a1.legend(fontsize=8, loc="upper left")
    a1.set_title("online speculative decoding from day 0: draft trained on live traces, hot-swapped (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def served_per_version(text: str) -> list[dict]:
    """The trainer's per-version served acceptance, requests and proxy, from its Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"aurora_trainer_served_accept_length": "served", "aurora_trainer_proxy_accept_length": "proxy",
             "aurora_trainer_served_requests": "requests"}
    rows: dict[int, dict] = {}
    for family in text_string_to_metric_families(text):
        if family.name in names:
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                v = int(sample.labels["version"])
                rows.setdefault(v, dict(version=v))[names[family.name]] = sample.value
    return [rows[v] for v in sorted(rows)]


def proxy_gap(per_version: list[dict]) -> float | None:
    """Mean of proxy - served over the versions that have both, weighted by their requests."""
    both = [r for r in per_version if r.get("proxy") is not None and r.get("served") is not None and r.get("requests")]
    n = sum(r["requests"] for r in both)
    return sum((r["proxy"] - r["served"]) * r["requests"] for r in both) / n if n else None


def _plot_versions(per_version: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    proxy = [r for r in per_version if r.get("proxy") is not None]
    served = [r for r in per_version if r.get("served") is not None]
    ax.plot([r["version"] for r in proxy], [r["proxy"] for r in proxy], color="tab:purple", marker=".",
            label="trainer's proxy when it published the version (offline)")
    ax.scatter([r["version"] for r in served], [r["served"] for r in served], color="tab:green",
               s=[6 + 2 * r.get("requests", 0) for r in served], alpha=0.7,
               label="acceptance serving measured with it (dot size: requests)")
    ax.set_xlabel("draft version")
    ax.set_ylabel("acceptance length")
    ax.set_title("what the trainer believed vs what serving got, per draft version")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sglang_day0(cfg: DemoConfig, run: Path, py: list[str]) -> list[str]:
    """SGLang loads a draft dir before the first WeightSync version and fixes its vocabulary there.
    If `sglang.draft_path` does not exist yet, write an untrained one from the trainer's model.*
    (a pruned vocabulary counted from the workload's prompts with the target's tokenizer); either
    way the trainer starts from that dir, so both sides share d2t/t2d. Returns trainer overrides."""
    serve = load_config(SGLangLaunchConfig, ROOT / cfg.serve_config, cfg.serve_overrides).sglang
    draft = Path(serve.draft_path)
    if not (draft / "config.json").exists():
        subprocess.run(py + ["init-draft", "--config", cfg.trainer_config, "--out", str(draft),
                             *cfg.trainer_overrides, *prompt_counts(cfg, run, py, serve.model_path)], check=True)
    return [f"loop.init_from={draft}"]


def prompt_counts(cfg: DemoConfig, run: Path, py: list[str], tokenizer: str) -> list[str]:
    """The workload's prompts (the load's split: never the held-out ones) counted with the target's
    tokenizer (`count-tokens`) for the day-0 draft vocabulary; returns the trainer override that uses
    them (none if the trainer overrides already name counts, or a draft whose vocabulary it keeps)."""
    if any(o.startswith(("loop.vocab_counts=", "loop.init_from=")) for o in cfg.trainer_overrides):
        return []
    counts = run / "vocab_counts.npy"
    subprocess.run(py + ["count-tokens", str(counts), "--tokenizer", tokenizer, "--prompts", str(ROOT / cfg.load.prompts),
                         "--domains", ",".join(cfg.load.domains), "--split", cfg.load.split], check=True)
    return [f"loop.vocab_counts={counts}"]


def run_demo(cfg: DemoConfig) -> int:
    run = Path(cfg.run_dir)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    sglang = cfg.serving == "sglang"
    py = [sys.executable, "-m", "apps.cli"]
    if not sglang and not cfg.prepare_target and not (ROOT / cfg.target / "config.json").exists():
        raise FileNotFoundError(f"no model directory at {cfg.target} (the toy target: scripts/make_demo_target.py)")
    if cfg.prepare_target:  # first use: convert the registry-installed target once (torch, in a child)
        subprocess.run(py + ["prepare-target", cfg.prepare_target, "--out", cfg.target], check=True, cwd=ROOT)
    if not sglang and cfg.load.prompts == LoadConfig.prompts:  # the embedded target's own prompts
        cfg.load.prompts = str(ROOT / cfg.target / "prompts")
    cfg.load.prompts = str(ROOT / cfg.load.prompts)  # (an absolute path stays as it is)
    ingest, weights = free_port(), free_port()
    trainer = engine = None
    t0 = time.perf_counter()
    try:
        day0 = sglang_day0(cfg, run, py) if sglang else \
            prompt_counts(cfg, run, py, str(ROOT / cfg.target)) if cfg.vocab_from_prompts and cfg.train else []
        trainer = None if not cfg.train else _Proc("trainer", py + ["train", "--config", cfg.trainer_config,
                                         f"ingest.address=127.0.0.1:{ingest}", f"weight_sync.address=127.0.0.1:{weights}",
                                         f"buffer.spool_dir={run / 'spool'}", f"checkpoint.dir={run / 'ckpt'}",
                                         f"loop.metrics_path={run / 'train.jsonl'}", "loop.metrics_address=127.0.0.1:0",
                                         *([] if sglang else [f"target={cfg.target}"]),
                                         *day0, *cfg.trainer_overrides],
                        run / "trainer.log")
        trainer_metrics = None
        if trainer is not None:
            trainer.wait_line("listening on", cfg.start_timeout_s)
            trainer_metrics = trainer.wait_line("metrics on", cfg.start_timeout_s)
        if sglang:  # SGLang + sidecar + plugin + hot-swap, as `aurora-jax sglang-launch` runs them
            serve = ["sglang-launch", "--config", cfg.serve_config, f"sidecar.traces.address=127.0.0.1:{ingest}",
                     f"weights.address=127.0.0.1:{weights}", "sidecar.host=127.0.0.1", f"sidecar.port={free_port()}"]
        else:
            serve = ["serve", "--config", cfg.serve_config, f"target.path={cfg.target}",
                     f"traces.address=127.0.0.1:{ingest}", f"weights.address=127.0.0.1:{weights}",
                     *([] if cfg.train else ["export_traces=false", "subscribe_weights=false"])]
        engine = _Proc("engine", py + serve + list(cfg.serve_overrides), run / "engine.log")
        url = engine.wait_line("serving on", cfg.start_timeout_s)
        print((f"trainer: ingest :{ingest}, weights :{weights} (log {run / 'trainer.log'}); " if trainer else
               "no trainer (static draft); ") + f"engine {url} (log {run / 'engine.log'})", flush=True)
        cfg.load.endpoint = url
        def alive():
            for proc in (trainer, engine):
                if proc is not None and proc.p.poll() is not None:
                    raise RuntimeError(f"the {proc.name} exited ({proc.p.returncode}) during the demo; "
                                       f"see {proc.log_path}:\n" + "".join(open(proc.log_path).readlines()[-5:]))
            return True

        records = run_load(cfg.load)
        while alive() and cfg.until_version and len(records) < cfg.max_requests and \
                max((r.get("draft_version") or 0) for r in records) < cfg.until_version:
            more = dataclasses.replace(cfg.load, requests=min(20, cfg.max_requests - len(records)),
                                       seed=cfg.load.seed + len(records))
            base = len(records)
            for r in run_load(more, progress=False):
                r["index"] += base
                records.append(r)
        alive()
        metrics = httpx.get(url + "/metrics", timeout=30).raise_for_status().text
        health = httpx.get(url + "/health", timeout=30).raise_for_status().json()
        per_version = served_per_version(httpx.get(trainer_metrics, timeout=30).raise_for_status().text) \
            if trainer_metrics else []
        sbs = []
        if cfg.side_by_side_requests and not sglang:
            if trainer is not None:
                trainer.stop()  # paused: the engine keeps the last draft it was sent
            for c in cfg.side_by_side_concurrency:
                print(f"side-by-side on held-out prompts, concurrency {c}: target-only vs draft "
                      f"v{health['draft_version']}, {cfg.side_by_side_rounds} interleaved rounds", flush=True)
                sbs.append(side_by_side(dataclasses.replace(cfg.load, split=cfg.side_by_side_split, concurrency=c,
                                                            requests=cfg.side_by_side_requests),
                                        cfg.side_by_side_rounds))
    finally:
        for p in (engine, trainer):
            if p is not None:
                p.stop()
    elapsed = time.perf_counter() - t0
    train = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()] \
        if (run / "train.jsonl").exists() else []
    (run / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ok = [r for r in records if "error" not in r and r.get("accept_length")]
    q = max(1, len(ok) // 4)
    mean = lambda rs, k: sum(r[k] for r in rs) / max(len(rs), 1)
    versions = sorted({r.get("draft_version") or 0 for r in ok})
    summary = dict(
        requests=len(records), failed=len(records) - len([r for r in records if "error" not in r]),
        elapsed_s=round(elapsed, 1), trainer_steps=train[-1]["step"] if train else 0,
        draft_versions_served=versions,
        accept_length_first_quarter=mean(ok[:q], "accept_length"), accept_length_last_quarter=mean(ok[-q:], "accept_length"),
        throughput_first_quarter=mean(ok[:q], "throughput"), throughput_last_quarter=mean(ok[-q:], "throughput"),
        versions_refused=health["versions_refused"], last_refusal=health["last_refusal"], side_by_side=sbs,
        per_version=per_version, proxy_minus_served=proxy_gap(per_version), metrics=metrics)
    (run / "report.json").write_text(json.dumps(dict(config=to_dict(cfg), summary=summary), indent=2))
    _plot(records, run / "flywheel.png", next((x for x in sbs if x["concurrency"] == cfg.load.concurrency), None))
    if per_version:
        _plot_versions(per_version, run / "proxy_vs_served.png")
    s = summary
    print(f"\n{s['requests']} requests in {s['elapsed_s']}s; trainer took {s['trainer_steps']} steps; "
          f"the engine served draft versions {versions[0]}..{versions[-1]}")
    print(f"acceptance length (tokens per target forward): first quarter {s['accept_length_first_quarter']:.2f} "
          f"-> last quarter {s['accept_length_last_quarter']:.2f}")
    print(f"per-request throughput (tokens/s): {s['throughput_first_quarter']:.1f} -> {s['throughput_last_quarter']:.1f}")
    w = max(1, len(ok) // 10)
    print("acceptance length over time:")
    for i in range(0, len(ok), w):
        part = ok[i:i + w]
        vs = sorted({r.get("draft_version") or 0 for r in part})
        idx = [r["index"] for r in part]  # (completion order: at concurrency > 1 neighbours may swap)
        print(f"  requests {min(idx):5d}-{max(idx):5d}: {mean(part, 'accept_length'):.2f} "
              f"(draft version {vs[0]}{'' if len(vs) == 1 else f'..{vs[-1]}'})")
    if sbs:
        print("\nside-by-side on held-out prompts (same engine, trainer stopped; generated tokens/s, median of rounds):")
        print(f"  {'conc':>4} {'target-only':>11} {'speculative':>11} {'speedup':>8} {'min..max':>11} "
              f"{'AL':>5} {'identical':>9}  rounds agree")
        for x in sbs:
            print(f"  {x['concurrency']:4d} {x['target_only_tokens_per_s']:11.1f} {x['speculative_tokens_per_s']:11.1f} "
                  f"{x['speedup']:7.2f}x {x['speedup_min']:5.2f}..{x['speedup_max']:<5.2f} {x['accept_length']:5.2f} "
                  f"{x['outputs_identical']:4d}/{x['prompts']:<4d}  {'yes' if x['rounds_agree'] else 'NO: load flipped a round'}")
    if s["proxy_minus_served"] is not None:
        print(f"\nthe trainer's acceptance proxy at publish vs what serving measured, per version (weighted by requests): "
              f"proxy - served = {s['proxy_minus_served']:+.2f} over {len(per_version)} versions "
              f"(plot {run / 'proxy_vs_served.png'})")
    print(f"report {run / 'report.json'}, plot {run / 'flywheel.png'}, requests {run / 'requests.jsonl'}")
    problems = []
    if s["failed"]:
        problems.append(f"{s['failed']} requests failed")
    if health["versions_refused"]:
        problems.append(f"the engine refused {health['versions_refused']} draft versions; last: {health['last_refusal']}")
    if versions[-1] == 0 and cfg.train and cfg.require_new_version:
        problems.append("the engine never served a draft version > 0 (no version arrived, or every one was refused)")
    for p in problems:
        print(f"demo FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0
