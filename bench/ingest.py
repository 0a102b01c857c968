"""`aurora-jax bench ingest`: trace ingestion throughput vs raw loopback gRPC, in one run.

The endpoint path is the real one end to end: the serving-tier TraceClient encodes, chunks
and streams traces to an `aurora-jax ingest` process, which reassembles, validates, spools
(with the chosen fsync policy) and acks each trace. The raw path streams the same number of
bytes in the same message sizes to a bare gRPC handler that only acks: the ceiling that
loopback gRPC in Python can reach on this machine. Both servers run as separate processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from bench.report import write_json
from bridge.chunks import chunk_messages, max_message_bytes
from bridge.synthetic import random_trace
from bridge.traces import encode

_RAW_METHOD = "/aurora.bench.Raw/Push"


def _raw_server(port_q, max_msg: int) -> None:
    def push(request_iterator, context):
        for _ in request_iterator:
            yield b"k"

    handler = grpc.method_handlers_generic_handler(
        "aurora.bench.Raw", {"Push": grpc.stream_stream_rpc_method_handler(push)})
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler],
                         options=[("grpc.max_receive_message_length", max_msg)])
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def bench_raw(messages: list[bytes], max_msg: int, batch: int) -> float:
    """Seconds to stream `messages` (each acked) to a bare handler, `batch` traces' worth per stream."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_raw_server, args=(q, max_msg), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", max_msg)]) as ch:
            call = ch.stream_stream(_RAW_METHOD)
            list(call(iter(messages[:2])))  # connect and warm up
            t0 = time.perf_counter()
            for i in range(0, len(messages), batch):
                part = messages[i:i + batch]
                assert len(list(call(iter(part)))) == len(part)
            return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.join()


def bench_endpoint(traces, fsync: str, chunk_bytes: int, batch: int, vocab: int, hidden: int) -> tuple[float, dict]:
    from serving.trace_client import TraceClient, TraceClientConfig

    with tempfile.TemporaryDirectory(prefix="aurora-bench-") as spool:
        cmd = [sys.executable, "-m", "apps.cli", "--log-level", "warning", "ingest", "--config",
               "configs/trainer.yaml", "--stats-every", "0", "target=", "ingest.address=127.0.0.1:0",
               f"buffer.spool_dir={spool}", f"buffer.fsync={fsync}", f"limits.vocab_size={vocab}",
               f"model.vocab_size={vocab}", f"model.target_hidden_size={hidden}",
               f"limits.target_hidden_size={hidden}", f"limits.max_chunk_bytes={chunk_bytes}",
               f"buffer.capacity_traces={len(traces) + 8}", f"buffer.capacity_bytes={8 << 30}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        try:
            line = proc.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"ingest server did not start: {line!r}")
            client = TraceClient(TraceClientConfig(address=line.split()[-1], batch_size=batch,
                                                   max_chunk_bytes=chunk_bytes, max_queue=len(traces) + 1))
            client.health(timeout=10)
            t0 = time.perf_counter()
            for t in traces:
                client.submit(t)
            if not client.flush(timeout=600):
                raise RuntimeError("endpoint did not ack every trace within 600 s")
            elapsed = time.perf_counter() - t0
            stats = client.stats()
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if stats["acked"] != len(traces):
        raise RuntimeError(f"only {stats['acked']} of {len(traces)} traces acked: {stats}")
    return elapsed, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=int, default=32, help="traces per measurement (default %(default)s)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per trace (default %(default)s)")
    p.add_argument("--hidden", type=int, default=4096, help="target hidden size H; aux is [T, 3H] bf16")
    p.add_argument("--steps", type=int, default=64, help="verification steps (trees) per trace")
    p.add_argument("--chunk-bytes", type=int, default=2 << 20, help="gRPC message payload size")
    p.add_argument("--batch", type=int, default=8, help="traces per stream")
    p.add_argument("--fsync", default="always,group,none", help="comma-separated fsync policies to measure")
    p.add_argument("--repeat", type=int, default=3, help="measurements per path; the best is reported")
    p.add_argument("--out", default="runs/bench", help="folder for ingest.json")
    a = p.parse_args(argv)

    vocab = 32000
    rng = np.random.default_rng(0)
    print(f"building {a.traces} traces: {a.tokens} tokens, aux [T, 3*{a.hidden}] bf16, {a.steps} trees each ...",
          flush=True)
    base = [random_trace(rng, request_id=f"b{i}", num_tokens=a.tokens, prompt_len=a.tokens // 4, hidden=a.hidden,
                         vocab=vocab, num_steps=a.steps, topk=8) for i in range(min(a.traces, 4))]
    traces = []
    for i in range(a.traces):  # share arrays between traces: encoding cost is what matters
        t = base[i % len(base)]
        traces.append(dataclasses.replace(t, request_id=f"trace-{i}"))
    payload = [encode(t) for t in traces]
    messages = [m for t, b in zip(traces, payload) for m in chunk_messages(t.request_id, [b], a.chunk_bytes)]
    total = sum(len(b) for b in payload)
    raw_bytes = sum(len(m) for m in messages)
    hidden_bytes = sum(t.aux_hidden.nbytes for t in traces)
    max_msg = max_message_bytes(a.chunk_bytes)
    per_trace_msgs = max(1, len(messages) // len(traces))

    # Rounds interleave the paths so that a noisy neighbour slows all of them alike; each row
    # reports its best round, and the ratio compares the best rounds.
    paths = ["raw"] + a.fsync.split(",")
    best = {p: float("inf") for p in paths}
    for r in range(a.repeat):
        for path in paths:
            if path == "raw":
                s = bench_raw(messages, max_msg, a.batch * per_trace_msgs)
            else:
                s, _ = bench_endpoint(traces, path, a.chunk_bytes, a.batch, vocab, a.hidden)
            best[path] = min(best[path], s)
            print(f"  round {r + 1}/{a.repeat} {path:>6}: {s:.2f}s", flush=True)
    raw_mbs = raw_bytes / best["raw"] / 1e6
    rows = []
    for path in paths:
        s = best[path]
        name = "raw loopback gRPC (bytes only)" if path == "raw" else f"TraceIngest endpoint, fsync={path}"
        mbs = (raw_bytes if path == "raw" else total) / s / 1e6
        rows.append(dict(path=name, seconds=s, traces_per_s=len(traces) / s, payload_mb_s=mbs,
                         hidden_mb_s=hidden_bytes / s / 1e6, ratio=mbs / raw_mbs))

    print(f"\n{len(traces)} traces, {total / 1e6:.0f} MB on the wire ({hidden_bytes / 1e6:.0f} MB hidden states), "
          f"{len(messages)} messages of <= {a.chunk_bytes >> 20} MiB, best of {a.repeat}\n")
    head = f"{'path':<36} {'traces/s':>9} {'payload MB/s':>13} {'hidden MB/s':>12} {'vs raw':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['path']:<36} {r['traces_per_s']:>9.1f} {r['payload_mb_s']:>13.0f} {r['hidden_mb_s']:>12.0f} "
              f"{r['ratio']:>6.0%}")
    write_json(a.out, "ingest", dict(args=vars(a), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
