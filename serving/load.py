"""`aurora-jax load`: a bounded workload against any OpenAI-compatible endpoint.

Prompts come from the shipped domain files (`<prompts>/<domain>.jsonl`). Stream shapes:
  mixed    domains interleaved at random
  ordered  all of the first domain, then the next, ...
  shift    the first domain until request `--shift-at`, then only the second (an abrupt change)
Each request records latency, tokens and, from the embedded engine's `aurora` extension, the
draft_version and target forwards (so acceptance length per request). Plain stdlib: no torch, no JAX.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


@dataclasses.dataclass
class LoadConfig:
    endpoint: str = "http://127.0.0.1:8000"
    prompts: str = "models/demo-target/prompts"
    domains: list[str] = dataclasses.field(default_factory=lambda: ["code", "prose"])
    shape: str = "mixed"  # mixed | ordered | shift
    shift_at: int = 0  # shift: first request of the second domain (0 = half way)
    requests: int = 64
    concurrency: int = 2
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 300.0

    def __post_init__(self):
        if self.shape not in ("mixed", "ordered", "shift"):
            raise ValueError("shape must be mixed, ordered or shift")
        if self.requests < 1 or self.concurrency < 1:
            raise ValueError("requests and concurrency must be >= 1")


def schedule(cfg: LoadConfig) -> list[dict]:
    """The ordered list of requests (domain, prompt) for this stream shape."""
    rng = random.Random(cfg.seed)
    pools = {}
    for d in cfg.domains:
        path = Path(cfg.prompts) / f"{d}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no prompts for domain {d!r}: {path}")
        pools[d] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rng.shuffle(pools[d])
    n = cfg.requests
    if cfg.shape == "mixed":
        doms = [rng.choice(cfg.domains) for _ in range(n)]
    elif cfg.shape == "ordered":
        per = -(-n // len(cfg.domains))
        doms = [d for d in cfg.domains for _ in range(per)][:n]
    else:
        at = cfg.shift_at or n // 2
        doms = [cfg.domains[0] if i < at else cfg.domains[1 % len(cfg.domains)] for i in range(n)]
    used = {d: 0 for d in cfg.domains}
    out = []
    for d in doms:
        p = pools[d][used[d] % len(pools[d])]
        used[d] += 1
        out.append(dict(domain=d, prompt=p["prompt"]))
    return out


def _one(cfg: LoadConfig, i: int, req: dict) -> dict:
    body = dict(model="aurora", prompt=req["prompt"], max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                domain=req["domain"], seed=cfg.seed + i)
    t0 = time.perf_counter()
    r = urllib.request.Request(cfg.endpoint.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=cfg.timeout_s) as resp:
            out = json.loads(resp.read())
    except (urllib.error.URLError, TimeoutError) as e:
        return dict(index=i, domain=req["domain"], error=str(e), latency_s=time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    usage, ext = out.get("usage", {}), out.get("aurora", {})
    gen = usage.get("completion_tokens", 0)
    fw = ext.get("target_forwards") or 0
    return dict(index=i, domain=req["domain"], latency_s=dt, prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=gen, target_forwards=fw, accept_length=gen / fw if fw else None,
                throughput=(usage.get("prompt_tokens", 0) + gen) / dt, draft_version=ext.get("draft_version"),
                finished=time.time())


def run_load(cfg: LoadConfig, progress: bool = True, on_result=None) -> list[dict]:
    """Send the workload; returns one record per request, in request order."""
    reqs = schedule(cfg)
    results: list[dict | None] = [None] * len(reqs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(reqs), desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True)
    lock = threading.Lock()
    window: list[float] = []
    with cf.ThreadPoolExecutor(cfg.concurrency) as pool:
        futs = {pool.submit(_one, cfg, i, r): i for i, r in enumerate(reqs)}
        for f in cf.as_completed(futs):
            rec = f.result()
            results[rec["index"]] = rec
            with lock:
                if rec.get("accept_length"):
                    window = (window + [rec["accept_length"]])[-16:]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(accept=f"{sum(window) / max(len(window), 1):.2f}",
                                    v=rec.get("draft_version"), dom=rec["domain"], refresh=False)
            if on_result is not None:
                on_result(rec)
    if bar is not None:
        bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    from bridge.config import load_config

    p = argparse.ArgumentParser(prog="aurora-jax load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, help="base URL of an OpenAI-compatible server")
    p.add_argument("--out", default="", help="write per-request records here (JSONL)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="LoadConfig fields, e.g. shape=shift requests=200 concurrency=4 prompts=DIR")
    a = p.parse_args(argv)
    cfg = load_config(LoadConfig, None, [f"endpoint={a.endpoint}", *a.overrides])
    recs = run_load(cfg)
    ok = [r for r in recs if "error" not in r]
    acc = [r["accept_length"] for r in ok if r.get("accept_length")]
    print(f"{len(ok)}/{len(recs)} requests ok; mean accept length {sum(acc) / max(len(acc), 1):.2f}; "
          f"mean latency {sum(r['latency_s'] for r in ok) / max(len(ok), 1):.2f}s")
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return 0 if len(ok) == len(recs) else 1
