"""`aurora-jax load`: a bounded workload against any OpenAI-compatible endpoint.

Prompts come from domain files (`<prompts>/<domain>.jsonl`: `prompt`, optional `chat: true` to send it
as a chat message, optional `split`: train | heldout). Stream shapes:
  mixed    domains interleaved at random
  ordered  all of the first domain, then the next, ...
  shift    the first domain until request `shift_at=N`, then only the second (an abrupt change)
Each request records latency, tokens and, from the embedded engine's `aurora` extension, the
draft_version and target forwards (so acceptance length per request). httpx, no torch, no JAX.
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
from pathlib import Path

import httpx

from serving.http import error_text


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
    split: str = "train"  # train | heldout | all: which records of the prompt files (no `split` = train)
    speculative: bool = True  # false: ask the embedded engine to decode target-only (the side-by-side baseline)
    model: str = ""  # the `model` field sent ("" = none: the server's only model)

    def __post_init__(self):
        if self.shape not in ("mixed", "ordered", "shift"):
            raise ValueError("shape must be mixed, ordered or shift")
        if self.split not in ("train", "heldout", "all"):
            raise ValueError("split must be train, heldout or all")
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
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pools[d] = [r for r in recs if cfg.split == "all" or r.get("split", "train") == cfg.split]
        if not pools[d]:
            raise ValueError(f"{path}: no prompts in split {cfg.split!r}")
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
        out.append(dict(domain=d, prompt=p["prompt"], chat=bool(p.get("chat"))))
    return out


def _one(cfg: LoadConfig, client: httpx.Client, i: int, req: dict) -> dict:
    body = dict(max_tokens=cfg.max_tokens, temperature=cfg.temperature, domain=req["domain"], seed=cfg.seed + i,
                **(dict(model=cfg.model) if cfg.model else {}))
    if not cfg.speculative:
        body["speculative"] = False
    if req.get("chat"):  # through the target's chat template
        body["messages"], route = [dict(role="user", content=req["prompt"])], "/v1/chat/completions"
    else:
        body["prompt"], route = req["prompt"], "/v1/completions"
    t0 = time.perf_counter()
    try:
        resp = client.post(cfg.endpoint.rstrip("/") + route, json=body)
    except httpx.HTTPError as e:
        return dict(index=i, domain=req["domain"], error=f"{cfg.endpoint}: {e!r}", latency_s=time.perf_counter() - t0)
    if resp.status_code != 200:  # the server's own words (OpenAI-style error body), not just the status
        return dict(index=i, domain=req["domain"], error=error_text(resp), latency_s=time.perf_counter() - t0)
    out = resp.json()
    dt = time.perf_counter() - t0
    usage, ext = out.get("usage", {}), out.get("aurora", {})
    choice = (out.get("choices") or [{}])[0]
    text = choice.get("text", (choice.get("message") or {}).get("content", ""))
    gen = usage.get("completion_tokens", 0)
    fw = ext.get("target_forwards") or 0
    return dict(index=i, domain=req["domain"], latency_s=dt, prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=gen, target_forwards=fw, accept_length=gen / fw if fw else None,
                throughput=(usage.get("prompt_tokens", 0) + gen) / dt, draft_version=ext.get("draft_version"),
                finished=time.time(), text=text)


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
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    with httpx.Client(timeout=cfg.timeout_s, limits=limits) as client, cf.ThreadPoolExecutor(cfg.concurrency) as pool:
        futs = {pool.submit(_one, cfg, client, i, r): i for i, r in enumerate(reqs)}
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


def side_by_side(cfg: LoadConfig, rounds: int) -> dict:
    """Target-only (A) against speculative (B) on one endpoint, same prompts, in interleaved rounds
    (A B, B A, A B, ...: an alternating order, so drift or background load hits both arms alike).
    Each arm-round sends every prompt of `cfg` (its split) at `cfg.concurrency`; its speed is
    generated tokens / wall time. Returns per-round ratios, their median and spread, whether every
    round agrees on the winner, and whether the greedy outputs of the two arms are identical."""
    import statistics

    arms = {False: [], True: []}
    texts: dict[bool, list] = {}
    for k in range(rounds):
        for spec in ((False, True) if k % 2 == 0 else (True, False)):
            c = dataclasses.replace(cfg, speculative=spec, shape="ordered")
            t0 = time.perf_counter()
            recs = run_load(c, progress=False)
            wall = time.perf_counter() - t0
            bad = [r for r in recs if "error" in r]
            if bad:
                raise RuntimeError(f"side-by-side request failed: {bad[0]['error']}")
            arms[spec].append(dict(tokens_per_s=sum(r["completion_tokens"] for r in recs) / wall,
                                   request_throughput=statistics.mean(r["throughput"] for r in recs),
                                   accept_length=sum(r["completion_tokens"] for r in recs) /
                                   max(sum(r["target_forwards"] for r in recs), 1),
                                   draft_version=max(r.get("draft_version") or 0 for r in recs)))
            texts.setdefault(spec, [r["text"] for r in recs])
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(arms[False], arms[True])]
    differ = [i for i, (a, b) in enumerate(zip(texts[False], texts[True])) if a != b]
    return dict(concurrency=cfg.concurrency, prompts=len(texts[False]), rounds=rounds,
                target_only_tokens_per_s=statistics.median(a["tokens_per_s"] for a in arms[False]),
                speculative_tokens_per_s=statistics.median(b["tokens_per_s"] for b in arms[True]),
                target_only_request_throughput=statistics.median(a["request_throughput"] for a in arms[False]),
                speculative_request_throughput=statistics.median(b["request_throughput"] for b in arms[True]),
                accept_length=statistics.median(b["accept_length"] for b in arms[True]),
                draft_version=max(b["draft_version"] for b in arms[True]),
                speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
                rounds_agree=all(r > 1 for r in ratios) or all(r <= 1 for r in ratios),
                outputs_identical=len(texts[False]) - len(differ), outputs_differ=differ)


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
    for r in [r for r in recs if "error" in r][:3]:
        print(f"request {r['index']} failed: {r['error']}", file=sys.stderr)
    print(f"{len(ok)}/{len(recs)} requests ok; mean accept length {sum(acc) / max(len(acc), 1):.2f}; "
          f"mean latency {sum(r['latency_s'] for r in ok) / max(len(ok), 1):.2f}s")
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return 0 if len(ok) == len(recs) else 1
