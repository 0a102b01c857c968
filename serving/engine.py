"""The embedded serving engine: a scheduler thread running requests in batched rounds.

Requests are admitted up to `max_running`; each scheduler pass runs one verification round for
every running request (each drafts its own tree; the target verifies all trees in one fused,
padded forward), streams the new tokens to each handle, and on completion exports the request's
RequestTrace through the TraceClient (never blocking: a trainer that is down only costs dropped
traces, counted). New draft versions from WeightSync are installed between rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time

import torch

from bridge.eagle3 import DraftConfig, check_draft_fits_target, draft_fields_from_target, load_hf, rope_theta_from_hf
from serving.backend import Backend, Handle, Metrics, metrics, new_counters
from serving.eagle3 import Eagle3Draft
from serving.http import HttpLimits
from serving.packed_linear import pack_linears
from serving.spec_decode import EagleDrafter, SpecConfig, SpecDecoder
from serving.target import Target, TargetConfig
from serving.trace_client import TraceClient, TraceClientConfig
from serving.weight_sync import WeightSubscriber, WeightSubscriberConfig, to_torch_state_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DraftSource:
    mode: str = "untrained"  # none (target only) | untrained (day 0) | hf (an EAGLE3 directory)
    path: str = ""  # for mode=hf
    draft_vocab_size: int = 0  # untrained: 0 = the target's vocabulary
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("none", "untrained", "hf"):
            raise ValueError("mode must be none, untrained or hf")
        if self.mode == "hf" and not self.path:
            raise ValueError("mode=hf needs path")


@dataclasses.dataclass
class EngineConfig:
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    draft: DraftSource = dataclasses.field(default_factory=DraftSource)
    spec: SpecConfig = dataclasses.field(default_factory=SpecConfig)
    traces: TraceClientConfig = dataclasses.field(default_factory=TraceClientConfig)
    export_traces: bool = True
    weights: WeightSubscriberConfig = dataclasses.field(default_factory=WeightSubscriberConfig)
    subscribe_weights: bool = False
    max_running: int = 8  # requests batched at once
    max_new_tokens: int = 256  # default and cap per request
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "aurora-target"
    http: HttpLimits = dataclasses.field(default_factory=HttpLimits)
    # CPU serving beside a trainer on the same machine: decode with this many torch threads (0 = torch's
    # default, one per core) on these CPUs only ([] = all). Two processes each spreading threads over all
    # cores make each other wait at every parallel region; on the 2-core demo machine an engine on one
    # pinned thread beside a trainer on both cores served 1.7x the tokens/s and trained 8% faster than
    # both on all cores (README, "Sharing the cores").
    threads: int = 0
    cpus: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.threads < 0 or any(c < 0 for c in self.cpus):
            raise ValueError("threads and cpus must be >= 0")


def _day0_config(target: Target, draft_vocab_size: int) -> DraftConfig:
    """A day-0 draft shaped after the target (`bridge.eagle3.draft_fields_from_target`, as the
    trainer's `target:` key derives it). A RoPE scaling we do not implement falls back to plain RoPE
    at the target's theta: this draft only serves until it adopts the trainer's first version."""
    hf = target.model.config.to_dict()
    try:
        fields = draft_fields_from_target(hf)
    except (TypeError, ValueError) as e:
        log.warning("day-0 draft: the target's RoPE scaling is not used (%s); plain RoPE", e)
        fields = draft_fields_from_target({**hf, "rope_theta": rope_theta_from_hf(hf), "rope_scaling": None,
                                           "rope_parameters": None})
    return DraftConfig(**{**fields, "draft_vocab_size": draft_vocab_size})


def load_draft(cfg: DraftConfig, state_dict: dict, target: Target, random_init: bool = False,
               seed: int = 0) -> Eagle3Draft:
    """A torch EAGLE3 draft from (config, torch state_dict) in the target's dtype; a draft that ships
    without `embed_tokens` shares the target's embedding."""
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg)
    if random_init:
        for p in draft.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    missing, _ = draft.load_state_dict(state_dict, strict=False)
    if "embed_tokens.weight" in missing:
        draft.embed_tokens.weight.data.copy_(target.model.get_input_embeddings().weight.float())
    draft = draft.to(target.model.dtype).eval()
    pack_linears(draft)
    return draft


def build_draft(src: DraftSource, target: Target) -> Eagle3Draft | None:
    if src.mode == "none":
        return None
    if src.mode == "hf":
        cfg, sd = load_hf(src.path)
        check_draft_fits_target(cfg, target.model.config.to_dict(), src.path, target.cfg.path or "(in memory)")
        return load_draft(cfg, to_torch_state_dict(sd), target)
    return load_draft(_day0_config(target, src.draft_vocab_size), {}, target, random_init=True, seed=src.seed)


def pin_process(cpus: list[int]) -> None:
    """Every thread of this process (torch's pools included, which already exist) onto `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


class Engine(Backend):
    def __init__(self, cfg: EngineConfig, target: Target | None = None, tokenizer=None):
        self.cfg = cfg
        self.target = target or Target(cfg.target)
        self.max_context = int(getattr(self.target.model.config, "max_position_embeddings", 0) or 0)
        self.tokenizer = tokenizer
        if self.tokenizer is None and cfg.target.path:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.target.path, local_files_only=True)
        if cfg.cpus:
            pin_process(cfg.cpus)
        draft = build_draft(cfg.draft, self.target)
        self.decoder = SpecDecoder(self.target, EagleDrafter(draft, cfg.spec) if draft is not None else None,
                                   cfg.spec, topk=cfg.target.topk)
        self.client = TraceClient(cfg.traces) if cfg.export_traces else None
        self.subscriber = None
        if cfg.subscribe_weights and draft is not None:  # a day-0 draft adopts the trainer's config and vocabulary
            adopt = (lambda v, sd, c: self.decoder.offer_draft(v, load_draft(c, sd, self.target))) \
                if cfg.draft.mode == "untrained" else None
            self.subscriber = WeightSubscriber(cfg.weights, self.decoder.offer_swap, draft_config=draft.cfg,
                                               on_adopt=adopt).start()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.metrics = new_counters()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ API

    def submit(self, prompt: list[int], max_new_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None, eos: int | None = None, domain: str = "", speculative: bool = True) -> Handle:
        h = Handle(submitted=time.perf_counter())
        n = min(max_new_tokens or self.cfg.max_new_tokens, self.cfg.max_new_tokens)
        self._inbox.put((h, dict(prompt=list(prompt), max_new_tokens=n, temperature=temperature, seed=seed,
                                 eos=eos, domain=domain, speculative=speculative)))
        return h

    @property
    def draft_version(self) -> int:
        return self.decoder.draft_version

    # ------------------------------------------------------------ scheduler

    def _admit(self, running: list) -> None:
        block = not running
        while len(running) < self.cfg.max_running:
            try:
                h, kw = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            try:
                h.request = self.decoder.start(**kw)
            except Exception as e:  # bad request: answer it, keep serving
                self._fail(h, str(e))
                continue
            h.events.put(h.request.output)
            h.sent = len(h.request.output)
            running.append(h)

    def _loop(self) -> None:
        if self.cfg.threads:  # per thread (OpenMP): set where the decoding runs
            torch.set_num_threads(self.cfg.threads)
        running: list[Handle] = []
        while not self._stop.is_set():
            self._admit(running)
            with self._lock:
                self.metrics["running"] = len(running)
            t0 = time.perf_counter()
            live = [h for h in running if not h.request.done]
            if live:  # one round for every running request, target forwards fused into one batch
                try:
                    self.decoder.step_many([h.request for h in live])
                except Exception as e:  # a failed round fails its requests, never the engine
                    log.exception("a decode round of %d requests failed; they are answered with the error", len(live))
                    for h in live:
                        running.remove(h)
                        self._fail(h, f"decoding failed: {type(e).__name__}: {e}")
                    continue
            with self._lock:
                self.metrics["decode_seconds"] += time.perf_counter() - t0
            for h in list(running):
                r = h.request
                out = r.output
                if len(out) > h.sent:
                    h.events.put(out[h.sent:])
                    h.sent = len(out)
                if r.done:
                    running.remove(h)
                    try:
                        self._complete(h)
                    except Exception as e:
                        log.exception("finishing request %s failed", r.request_id)
                        self._fail(h, f"finishing the request failed: {type(e).__name__}: {e}")

    def _fail(self, h: Handle, message: str) -> None:
        h.error = message
        h.events.put(dict(error=message))
        with self._lock:
            self.metrics["errors"] += 1

    def _complete(self, h: Handle) -> None:
        res = self.decoder.finish(h.request)
        elapsed = time.perf_counter() - h.submitted
        if self.client is not None:
            self.client.submit(res.trace)
        with self._lock:
            m = self.metrics
            m["requests"] += 1
            m["prompt_tokens"] += len(h.request.prompt)
            m["output_tokens"] += len(res.output)
            m["target_forwards"] += res.target_forwards
            m["request_seconds"] += elapsed
        h.events.put(dict(output=res.output, prompt_tokens=len(h.request.prompt), target_forwards=res.target_forwards,
                          accept_lengths=res.accept_lengths, draft_version=res.trace.draft_version,
                          seconds=elapsed, finish_reason="stop" if h.request.eos in res.output else "length",
                          request_id=res.trace.request_id))

    def snapshot(self) -> Metrics:
        with self._lock:
            counters = dict(self.metrics)
        sub = self.subscriber
        return metrics(counters, draft_version=self.decoder.draft_version, swaps=self.decoder.swaps,
                       last_swap_ms=self.decoder.last_swap_ms,
                       mean_batch=self.decoder.fused_requests / max(self.decoder.fused_forwards, 1),
                       traces=self.client.stats() if self.client is not None else {},
                       versions_received=sub.received if sub is not None else 0,
                       versions_refused=sub.rejected if sub is not None else 0,
                       last_refusal=sub.last_error if sub is not None and sub.rejected else "")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.subscriber is not None:
            self.subscriber.close()
        if self.client is not None:
            self.client.close(timeout=2.0)

