"""The SGLang sidecar: users' OpenAI requests go through it to SGLang, traces go to the trainer.

It stands in for the embedded `Engine` behind `serving.http.HttpServer` (same submit/snapshot
interface), so users get the same OpenAI routes and Prometheus metrics. Each request becomes one
SGLang `/generate` call asking for the aux hidden states and the target top-k per position; the
finished response, joined with the verify-step trees the scheduler plugin posted to `/aurora/steps`
(with a draft), becomes a RequestTrace sent through the TraceClient. Two deployments:
  external without draft: stock SGLang with --enable-return-aux-hidden-states (target only);
  external with draft:    SGLang with an EAGLE3 draft, --enable-return-hidden-states, our plugin.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from serving.backend import Backend, Handle, Metrics, metrics, new_counters
from serving.channel import bearer
from serving.http import AppServer, BodyLimit, HttpLimits, error_text
from serving.ratelimit import EveryWindow
from serving.sglang.traces import (SGLangTraceError, StepRecord, served_version, step_from_record, target_forwards,
                                   trace_from_generate)
from serving.trace_client import TraceClient, TraceClientConfig

log = logging.getLogger(__name__)
SINK_PATH = "/aurora/steps"  # where the scheduler plugin posts StepRecord batches


@dataclasses.dataclass
class SidecarConfig:
    sglang_url: str = "http://127.0.0.1:30000"
    api_key: str = ""  # SGLang --api-key, sent as a Bearer token ("env:NAME" reads $NAME)
    tokenizer: str = ""  # local tokenizer directory (the target model's), for text prompts
    topk: int = 8  # target top-k exported per position
    with_draft: bool = False  # SGLang runs an EAGLE3 draft and our plugin posts verify trees
    tree_sink: str = "127.0.0.1:0"  # where the plugin posts trees (AURORA_TREE_SINK)
    tree_wait_s: float = 2.0  # how long a finished request waits for its last trees
    # SGLang runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (sglang-launch sets it). Without it, output
    # logprobs at a temperature other than 0 or 1 are of logits / T, so such requests make no trace.
    original_logprobs: bool = False
    traces: TraceClientConfig = dataclasses.field(default_factory=TraceClientConfig)
    max_running: int = 64  # concurrent /generate calls
    max_new_tokens: int = 256
    timeout_s: float = 600.0
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "aurora-target"
    http: HttpLimits = dataclasses.field(default_factory=HttpLimits)  # max_prompt_tokens: 0 = SGLang checks it


class TreeSink:
    """Loopback HTTP endpoint the scheduler plugin posts StepRecord batches to; keyed by rid."""

    def __init__(self, address: str, keep_s: float = 600.0, max_body_bytes: int = 64 << 20):
        host, port = address.rsplit(":", 1)
        self._steps: dict[str, list[StepRecord]] = collections.defaultdict(list)
        self._seen: dict[str, float] = {}
        self._cv = threading.Condition()
        self.received = self.malformed = 0
        self.keep_s = keep_s
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.post(SINK_PATH)
        async def steps(request: Request):
            try:
                recs = [StepRecord(**r) for r in await request.json()]
            except (ValueError, TypeError) as e:  # not JSON, not a list of records, unknown or missing fields
                self.malformed += 1
                return JSONResponse(dict(message=f"bad step records: {e}"), status_code=400)
            self.add(recs)
            return Response(status_code=204)

        self.http = AppServer(BodyLimit(app, max_body_bytes), host, int(port), name="aurora-tree-sink").start()
        self.url = self.http.url + SINK_PATH

    def add(self, recs: list[StepRecord]) -> None:
        now = time.monotonic()
        with self._cv:
            for r in recs:
                self._steps[r.rid].append(r)
                self._seen[r.rid] = now
            self.received += len(recs)
            for rid in [k for k, t in self._seen.items() if now - t > self.keep_s]:  # never claimed
                self._steps.pop(rid, None), self._seen.pop(rid, None)
            self._cv.notify_all()

    def take(self, rid: str, expect: int, wait_s: float) -> list[StepRecord]:
        """The request's records once `expect` have arrived (or after wait_s, whatever came)."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while len(self._steps.get(rid, ())) < expect and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            self._seen.pop(rid, None)
            return self._steps.pop(rid, [])

    def close(self) -> None:
        self.http.stop()


class SGLangEngine(Backend):
    """Engine-compatible front for an SGLang server (see module doc)."""

    def __init__(self, cfg: SidecarConfig, tokenizer=None, updater=None, sink: TreeSink | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        if tokenizer is None and cfg.tokenizer:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
        self.updater = updater  # SGLangWeightUpdater, when this sidecar also applies WeightSync versions
        self.sink = sink or (TreeSink(cfg.tree_sink) if cfg.with_draft else None)
        self.client = TraceClient(cfg.traces)
        self._pool = ThreadPoolExecutor(cfg.max_running, thread_name_prefix="sglang-req")
        self._http = httpx.Client(timeout=cfg.timeout_s, limits=httpx.Limits(max_connections=cfg.max_running),
                                  headers=bearer(cfg.api_key))
        self._lock = threading.Lock()
        self.last_weight_version = 0
        self._skipped_log = EveryWindow(log)
        self.metrics = dict(new_counters(), trace_errors=0, traces_skipped=0, cut_tokens=0)

    @property
    def draft_version(self) -> int:
        return self.updater.version if self.updater is not None else self.last_weight_version

    def request_body(self, prompt: list[int], max_new_tokens: int, temperature: float, seed, eos, rid: str) -> dict:
        sp = dict(max_new_tokens=max_new_tokens, temperature=temperature)
        if seed is not None:
            sp["sampling_seed"] = int(seed)
        if eos is not None:
            sp["stop_token_ids"] = [int(eos)]
        return dict(input_ids=list(prompt), sampling_params=sp, rid=rid, stream=False, return_logprob=True,
                    logprob_start_len=0, top_logprobs_num=self.cfg.topk, return_hidden_states=True)

    def _generate(self, body: dict) -> dict:
        try:
            r = self._http.post(self.cfg.sglang_url.rstrip("/") + "/generate", json=body)
        except httpx.HTTPError as e:
            raise RuntimeError(f"SGLang at {self.cfg.sglang_url} unreachable: {e!r}") from None
        if r.status_code != 200:
            raise RuntimeError(f"SGLang /generate answered {error_text(r)}")
        return r.json()

    def submit(self, prompt: list[int], max_new_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None, eos: int | None = None, domain: str = "", speculative: bool = True) -> Handle:
        h = Handle(submitted=time.perf_counter())
        if not speculative:  # SGLang fixes speculative decoding per server, not per request
            h.events.put(dict(error="'speculative': false is not available on an SGLang server (one mode per server)"))
            return h
        n = min(max_new_tokens or self.cfg.max_new_tokens, self.cfg.max_new_tokens)
        self._pool.submit(self._run, h, list(prompt), n, temperature, seed, eos, domain)
        return h

    def _run(self, h: Handle, prompt, n, temperature, seed, eos, domain) -> None:
        rid = uuid.uuid4().hex
        with self._lock:
            self.metrics["running"] += 1
        t_start = time.time()
        try:
            resp = self._generate(self.request_body(prompt, n, temperature, seed, eos, rid))
        except Exception as e:
            h.error = str(e)
            h.events.put(dict(error=str(e)))
            with self._lock:
                self.metrics["errors"] += 1
                self.metrics["running"] -= 1
            return
        elapsed = time.perf_counter() - h.submitted
        out = list(resp.get("output_ids") or [])
        meta = resp.get("meta_info") or {}
        h.events.put(out)
        forwards = target_forwards(meta, len(out))
        if (version := served_version(meta)) is not None:
            self.last_weight_version = version
        if self.cfg.original_logprobs or temperature in (0.0, 1.0):
            self._export(prompt, resp, rid, domain, t_start)
        else:
            with self._lock:
                self.metrics["traces_skipped"] += 1
            self._skipped_log.warning("no trace for requests at temperature %s: SGLang's output logprobs are then "
                                   "scaled by it; run SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (sglang-launch does) "
                                   "and set sidecar.original_logprobs", temperature)
        finish = meta.get("finish_reason") or {}
        with self._lock:
            m = self.metrics
            m["running"] -= 1
            m["requests"] += 1
            m["prompt_tokens"] += len(prompt)
            m["output_tokens"] += len(out)
            m["target_forwards"] += forwards
            m["request_seconds"] += elapsed
            m["decode_seconds"] += elapsed
        h.events.put(dict(output=out, prompt_tokens=len(prompt), target_forwards=forwards,
                          accept_lengths=[], draft_version=self.draft_version, seconds=elapsed,
                          finish_reason="length" if finish.get("type") == "length" else "stop", request_id=rid))

    def _export(self, prompt, resp, rid, domain, t_start) -> None:
        try:
            steps = []
            if self.sink is not None:
                expect = int((resp.get("meta_info") or {}).get("spec_verify_ct") or 0)
                steps = [step_from_record(r) for r in self.sink.take(rid, expect, self.cfg.tree_wait_s)]
                steps.sort(key=lambda s: s.trunk_pos)
            trace, cut = trace_from_generate(prompt, resp, request_id=rid, topk=self.cfg.topk, steps=steps,
                                             domain=domain, start_unix_s=t_start, end_unix_s=time.time())
            self.client.submit(trace)
            with self._lock:
                self.metrics["cut_tokens"] += cut
        except SGLangTraceError as e:  # the user still got the answer; say why no trace
            log.error("no trace for request %s: %s", rid, e)
            with self._lock:
                self.metrics["trace_errors"] += 1

    def snapshot(self) -> Metrics:
        with self._lock:
            counters = dict(self.metrics)
        return metrics(counters, draft_version=self.draft_version,
                       swaps=self.updater.applied if self.updater is not None else 0,
                       last_swap_ms=self.updater.last_ms if self.updater is not None else 0.0,
                       mean_batch=0.0,  # batching happens inside SGLang
                       traces=self.client.stats())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
        if self.sink is not None:
            self.sink.close()
        self.client.close(timeout=2.0)


