"""A serving fleet against a multi-process trainer on one machine, and `aurora-jax bench fleet`.

`TrainerProcesses` starts `aurora-jax train` as N processes on JAX's distributed runtime over
loopback (the tests and the benchmark use it; on a real cluster each host runs the same command,
README "Mixed cluster"). The benchmark puts R embedded-engine replicas (threads of this process,
each exporting traces to every trainer ingest and subscribed to process 0's WeightSync) in front of
it for a while and checks the capacity model of `docs/design.md` §8 where one machine can: the
trace bytes the model's formula predicts from the served traces' shapes against the bytes the
trainers' spools took in, each trainer host's share of the traffic (1/N by request id), and whether
the trainers keep up (trace rows trained per second against rows arriving; the model's "trainer
processes needed"). Every process here shares this machine's cores, so the compute figures say
where the bottleneck is on it, not what a TPU host would do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from apps.demo import ROOT, free_port


class TrainerProcesses:
    """`aurora-jax train --config CONFIG` in `n` processes of `devices` CPU devices each, on loopback:
    process i spools to <dir>/spool<i>, logs to <dir>/train<i>.log and writes <dir>/metrics<i>.jsonl;
    the checkpoint directory is shared. `addresses`: each one's ingest; `weights`: process 0's
    WeightSync (when the config has weight_sync.address)."""

    def __init__(self, dir: Path, config: str | Path, n: int, devices: int = 1, overrides=(), resume: bool = False,
                 heartbeat_timeout_s: int = 10):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        mesh = [f"mesh.coordinator=127.0.0.1:{free_port()}", f"mesh.num_processes={n}",
                f"mesh.heartbeat_timeout_s={heartbeat_timeout_s}"] if n > 1 else []
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
        self.procs, self.logs = [], [self.dir / f"train{i}.log" for i in range(n)]
        for i in range(n):
            cmd = [sys.executable, "-m", "apps.cli", "train", *(["--resume"] if resume else []), "--config", str(config),
                   *mesh, f"mesh.process_id={i}", f"buffer.spool_dir={self.dir}/spool{i}",
                   f"checkpoint.dir={self.dir}/ckpt", f"loop.metrics_path={self.dir}/metrics{i}.jsonl", *overrides]
            with open(self.logs[i], "a") as log:
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                                   cwd=ROOT))
        self.addresses, self.weights = [], ""
        for i, p in enumerate(self.procs):
            self.addresses.append(self._line(i, "listening on ").split()[-1])
            if i == 0 and any(o.startswith("weight_sync.address=") for o in overrides):
                self.weights = self._line(0, "weights on ").split()[-1]

    def _line(self, i: int, prefix: str) -> str:
        """Process i's next stdout line starting with `prefix`. Other lines are skipped: gloo announces
        its connections on the same stdout, from several threads (their lines can interleave)."""
        for _ in range(100):
            line = self.procs[i].stdout.readline()
            if line.startswith(prefix):
                return line
            if not line:
                break
        self.kill()
        raise RuntimeError(f"trainer process {i} did not print {prefix!r}:\n{self.log(i)[-3000:]}")

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def metrics(self, i: int = 0) -> list[dict]:
        path = self.dir / f"metrics{i}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def published(self) -> int:
        """The last draft_version process 0 published (its log says so as it happens)."""
        return max(map(int, re.findall(r"published draft_version (\d+)", self.log(0))), default=0)

    def stop(self) -> None:
        """SIGTERM every process: they agree to stop at the next step boundary."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def finish(self, timeout: float = 120) -> list[dict]:
        """Wait for every process; each one's exit summary (its last stdout line: step, version, digest)."""
        out = []
        for i, p in enumerate(self.procs):
            stdout, _ = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"trainer process {i} exited {p.returncode}:\n{self.log(i)[-3000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ------------------------------------------------------------------ bench fleet


@dataclasses.dataclass
class FleetConfig:
    replicas: int = 4
    trainers: int = 2
    seconds: float = 60.0  # of traffic
    target: str = "models/demo-target"
    trainer_config: str = "configs/demo-trainer.yaml"
    max_new_tokens: int = 48
    out: str = "runs/bench"


def predicted_trace_bytes(trace) -> int:
    """The capacity model's formula (docs/design.md §8): per token row aux_hidden (3·Ht at its dtype)
    plus the target's top-k ids and logprobs (8·k); per tree node ~9 bytes, plus 8·k at rejected nodes."""
    rows, (k,) = trace.num_tokens, trace.target_ids.shape[1:]
    nodes = sum(int(s.tokens.shape[0]) for s in trace.steps)
    rejected = sum(int(s.target_ids.shape[0]) for s in trace.steps if s.target_ids is not None)
    return rows * (trace.aux_hidden.shape[1] * trace.aux_hidden.dtype.itemsize + 8 * k) + 9 * nodes + 8 * k * rejected


def _spool_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_fleet(cfg: FleetConfig) -> dict:
    from serving.engine import DraftSource, Engine, EngineConfig
    from serving.spec_decode import SpecConfig
    from serving.target import TargetConfig
    from serving.trace_client import TraceClientConfig
    from serving.weight_sync import WeightSubscriberConfig

    run = Path(cfg.out) / "fleet-run"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    job = TrainerProcesses(run, ROOT / cfg.trainer_config, cfg.trainers, overrides=[
        f"target={cfg.target}", "mesh.data=0", "loop.traces_per_step=0", f"batch.rows={2 * cfg.trainers}",
        "checkpoint.every=0", "weight_sync.address=127.0.0.1:0", "ingest.address=127.0.0.1:0"])
    sent, lock, stop = [], threading.Lock(), threading.Event()
    engines = []
    try:
        for _ in range(cfg.replicas):
            e = Engine(EngineConfig(
                target=TargetConfig(path=cfg.target), draft=DraftSource(mode="untrained"),
                spec=SpecConfig(topk=2, num_steps=3, num_draft_tokens=4), max_new_tokens=cfg.max_new_tokens,
                traces=TraceClientConfig(address=",".join(job.addresses)), weights=WeightSubscriberConfig(address=job.weights),
                subscribe_weights=True))
            submit = e.client.submit

            def record(trace, submit=submit):
                with lock:
                    sent.append((trace.num_tokens, trace.num_tokens - trace.prompt_len, predicted_trace_bytes(trace)))
                submit(trace)
            e.client.submit = record
            engines.append(e)
        prompts = [engines[0].tokenizer(f"def task_{i}(values):\n    \"\"\"Return")["input_ids"] for i in range(16)]

        def serve(e, r):
            i = r
            while not stop.is_set():
                e.complete(prompts[i % len(prompts)])
                i += cfg.replicas

        threads = [threading.Thread(target=serve, args=(e, r), daemon=True) for r, e in enumerate(engines)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(cfg.seconds)
        stop.set()
        for t in threads:
            t.join()
        served_s = time.monotonic() - t0
        for e in engines:
            e.client.flush(30)
        stats = [e.client.stats() for e in engines]
        time.sleep(2)  # the trainers read back their last steps' metrics
        metrics = [job.metrics(i) for i in range(cfg.trainers)]
        spool = [_spool_bytes(run / f"spool{i}") for i in range(cfg.trainers)]
        versions = [e.subscriber.version for e in engines]
    finally:
        stop.set()
        for e in engines:
            e.close()
        job.stop()
    try:
        job.finish()
    finally:
        job.kill()

    rows, out_tokens, predicted = sum(x[0] for x in sent), sum(x[1] for x in sent), sum(x[2] for x in sent)
    acked = {a: sum(s["endpoints"][a]["acked"] for s in stats) for a in job.addresses}
    steps = [m[-1]["step"] if m else 0 for m in metrics]
    # each process's training rate once compiled (its first step's time is the compile): traces per second
    capacity = [sum(r["traces"] for r in m[1:]) / max(sum(r["step_s"] for r in m[1:]), 1e-9) for m in metrics]
    arrival = len(sent) / served_s
    per_process = sum(capacity) / max(len(capacity), 1)
    result = dict(
        replicas=cfg.replicas, trainers=cfg.trainers, seconds=round(served_s, 1), traces=len(sent),
        output_tokens=out_tokens, served_output_tok_s=round(out_tokens / served_s, 1),
        trace_rows=rows, predicted_bytes=predicted, spool_bytes=sum(spool),
        bytes_per_output_token_predicted=round(predicted / max(out_tokens, 1)),
        bytes_per_output_token_measured=round(sum(spool) / max(out_tokens, 1)),
        spool_over_predicted=round(sum(spool) / max(predicted, 1), 3),
        share_per_trainer=[round(acked[a] / max(sum(acked.values()), 1), 3) for a in job.addresses],
        predicted_share=round(1 / cfg.trainers, 3),
        trainer_steps=steps, arrival_traces_s=round(arrival, 2),
        trainer_traces_s=[round(c, 2) for c in capacity],
        trainer_processes_needed=round(arrival / per_process, 2) if per_process else None,
        draft_versions=versions, published=job.published(),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(FleetConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    cfg = FleetConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(FleetConfig)})
    from bench.report import write_json

    r = run_fleet(cfg)
    print(f"\n{r['replicas']} engine replicas -> {r['trainers']} trainer processes, {r['seconds']} s of traffic")
    print(f"| | predicted (capacity model) | measured |\n| --- | ---: | ---: |")
    print(f"| trace bytes per output token | {r['bytes_per_output_token_predicted']} | "
          f"{r['bytes_per_output_token_measured']} (spool/predicted {r['spool_over_predicted']}) |")
    print(f"| share of traces per trainer host | {r['predicted_share']} each | {r['share_per_trainer']} |")
    print(f"| traces arriving / s | | {r['arrival_traces_s']} |")
    print(f"| traces trained / s, per trainer process | | {r['trainer_traces_s']} |")
    print(f"| trainer processes needed (arriving / trained per process) | | {r['trainer_processes_needed']} |")
    print(f"served {r['served_output_tok_s']} output tok/s over {r['traces']} requests; trainer steps "
          f"{r['trainer_steps']}; replicas on versions {r['draft_versions']} of {r['published']} published")
    write_json(cfg.out, "fleet", r)
    return 0
