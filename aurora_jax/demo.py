"""`make demo`: the smallest end-to-end loop that exists so far.

Until the engine and trainer land (issues 3-6) the demo exercises the foundation for real:
it starts the TraceIngest endpoint, streams synthetic traces through the serving tier's
client, then reopens the spool as a restarted trainer would and checks nothing was lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aurora_jax.buffer import ReplayBuffer
from aurora_jax.config import TrainerConfig
from aurora_jax.service import start_ingest
from bridge.config import to_dict
from bridge.synthetic import random_trace
from serving.trace_client import TraceClient, TraceClientConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig:
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    client: TraceClientConfig = dataclasses.field(default_factory=TraceClientConfig)
    run_dir: str = "runs/demo"
    requests: int = 64
    tokens: int = 256
    hidden: int = 256  # target hidden size of the synthetic traces
    seed: int = 0


def run_demo(cfg: DemoConfig) -> int:
    run_dir = Path(cfg.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.trainer.buffer.spool_dir = str(run_dir / "spool")
    server = start_ingest(cfg.trainer)
    cfg.client.address = server.address
    client = TraceClient(cfg.client)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    try:
        for i in tqdm(range(cfg.requests), desc="traces", unit="req"):
            trace = random_trace(rng, request_id=f"demo-{i}", num_tokens=cfg.tokens, prompt_len=cfg.tokens // 4,
                                 hidden=cfg.hidden, vocab=cfg.trainer.limits.vocab_size)
            client.submit(trace)
        client.flush(timeout=120)
        elapsed = time.perf_counter() - t0
        sent = client.stats()
        stats = server.buffer.snapshot_stats()
    finally:
        client.close()
        server.stop()
        server.buffer.close()
    recovered = ReplayBuffer(cfg.trainer.buffer)
    n_recovered = len(recovered.entries())
    recovered.close()
    report = dict(config=to_dict(cfg), elapsed_s=elapsed, client=sent, server=stats, recovered_after_restart=n_recovered)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nsent {sent['submitted']} traces in {elapsed:.2f}s: acked {sent['acked']}, rejected {sent['rejected']}, "
          f"dropped {sent['dropped']}; buffered {stats['buffered']} ({stats['buffered_bytes'] / 1e6:.1f} MB); "
          f"after a restart the spool gave back {n_recovered}.\nreport: {run_dir / 'report.json'}")
    ok = sent["acked"] == cfg.requests and n_recovered == cfg.requests
    return 0 if ok else 1
