"""`make demo`: the smallest end-to-end loop that exists so far.

Until the engine and bridge land (issues 4-6) the demo runs the trainer half for real: a
trainer process's ingest endpoint and train loop run concurrently while the serving tier's
client streams traces from a toy target (greedy next token = a fixed random successor of the
current one), and the draft's offline acceptance proxy climbs from 1 as it learns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from aurora_jax.config import TrainerConfig
from aurora_jax.loop import Trainer
from bridge.config import to_dict
from bridge.synthetic import toy_target_trace
from serving.trace_client import TraceClient, TraceClientConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig:
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    client: TraceClientConfig = dataclasses.field(default_factory=TraceClientConfig)
    run_dir: str = "runs/demo"
    requests: int = 256  # traces the toy "serving tier" sends
    requests_per_s: float = 50.0
    tokens: int = 96
    seed: int = 0


def _serve(cfg: DemoConfig, client: TraceClient, stop: threading.Event) -> None:
    V, Ht = cfg.trainer.model.vocab_size, cfg.trainer.model.ht
    rng = np.random.default_rng(cfg.seed)
    succ = rng.permutation(V).astype(np.int32)
    feats = rng.standard_normal((V, 3 * Ht)).astype(np.float32)
    for i in range(cfg.requests):
        if stop.wait(1.0 / cfg.requests_per_s):
            return
        client.submit(toy_target_trace(rng, request_id=f"demo-{i}", succ=succ, features=feats,
                                       num_tokens=cfg.tokens, prompt_len=cfg.tokens // 8, topk=4))


def run_demo(cfg: DemoConfig) -> int:
    run_dir = Path(cfg.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    t = cfg.trainer
    t.buffer.spool_dir, t.checkpoint.dir = str(run_dir / "spool"), str(run_dir / "ckpt")
    t.loop.metrics_path = str(run_dir / "metrics.jsonl")
    trainer = Trainer(t)
    cfg.client.address = trainer.start_ingest()
    client = TraceClient(cfg.client)
    stop = threading.Event()
    feeder = threading.Thread(target=_serve, args=(cfg, client, stop), daemon=True)
    t0 = time.perf_counter()
    feeder.start()
    try:
        last = trainer.run()
    finally:
        stop.set()
        feeder.join()
        client.close()
        trainer.close()
    elapsed = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, sent = rows[0], client.stats()
    report = dict(config=to_dict(cfg), elapsed_s=elapsed, client=sent, first=first, last=last)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\n{last['step']} steps in {elapsed:.1f}s on {sent['acked']} traces (draft_version {last['draft_version']}): "
          f"accept_len proxy {first['accept_len']:.2f} -> {last['accept_len']:.2f}, "
          f"acc@depth0 {first['acc_d0']:.2f} -> {last['acc_d0']:.2f}, loss {first['loss']:.3f} -> {last['loss']:.3f}"
          f"\nreport: {run_dir / 'report.json'}, metrics: {run_dir / 'metrics.jsonl'}, checkpoints: {t.checkpoint.dir}")
    return 0 if last["accept_len"] > first["accept_len"] else 1
