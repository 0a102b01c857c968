"""Running the ingest endpoint as a process: signals, periodic stats, clean shutdown."""

from __future__ import annotations

import logging
import sys

from aurora_jax.buffer import ReplayBuffer
from aurora_jax.config import TrainerConfig
from aurora_jax.ingest import IngestServer
from bridge.signals import stop_event

log = logging.getLogger(__name__)


def start_ingest(cfg: TrainerConfig) -> IngestServer:
    buffer = ReplayBuffer(cfg.buffer)
    return IngestServer(cfg.ingest, cfg.trace_limits, buffer).start()


def run_ingest(cfg: TrainerConfig, stats_every: float = 10.0) -> int:
    """Serve until SIGINT/SIGTERM. Prints `listening on HOST:PORT` first (scripts wait for it)."""
    server = start_ingest(cfg)
    print(f"listening on {server.address}", flush=True)
    done = stop_event()
    while not done.wait(stats_every if stats_every > 0 else None):
        s = server.buffer.snapshot_stats()
        log.info("buffered=%d (%.1f MB) accepted=%d rejected=%d backpressured=%d consumed=%d spool=%.1f MB",
                 s["buffered"], s["buffered_bytes"] / 1e6, s["accepted"], server.servicer.rejected,
                 s["backpressured"], s["consumed"], s["spool_bytes"] / 1e6)
    log.info("shutting down")
    server.stop(grace=2.0)
    server.buffer.close()
    sys.stdout.flush()
    return 0
