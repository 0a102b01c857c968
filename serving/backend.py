"""What the HTTP front (`serving.http`) needs from a serving backend, and the metrics every backend
reports. Two implement it: the embedded engine (`serving.engine.Engine`) and the SGLang sidecar
(`serving.sglang.sidecar.SGLangEngine`)."""

from __future__ import annotations

import abc
import dataclasses
import queue
from typing import Any, TypedDict


@dataclasses.dataclass
class Handle:
    """A submitted request: `events` yields lists of new token ids, then a final dict (the result,
    or `{"error": ...}`)."""

    request: Any = None  # the backend's own request state, if it keeps one
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    submitted: float = 0.0
    error: str = ""
    sent: int = 0  # output tokens already streamed


class Counters(TypedDict):
    """Request counters a backend keeps (under its lock)."""

    requests: int  # finished
    running: int
    prompt_tokens: int
    output_tokens: int
    target_forwards: int
    request_seconds: float
    decode_seconds: float
    errors: int


class Metrics(Counters, total=False):
    """A backend's snapshot: its counters plus its state; what /metrics and /health read."""

    draft_version: int
    swaps: int
    last_swap_ms: float
    accept_length: float  # output tokens per target forward
    mean_batch: float  # requests per fused target forward (0 where batching is not ours)
    traces: dict  # the trace client's stats
    versions_received: int
    versions_refused: int
    last_refusal: str
    trace_errors: int  # SGLang sidecar: finished requests whose response made no trace
    traces_skipped: int  # SGLang sidecar: requests at a temperature whose logprobs are scaled
    cut_tokens: int  # SGLang sidecar: leading prompt tokens without hidden-state rows


def new_counters() -> Counters:
    return Counters(requests=0, running=0, prompt_tokens=0, output_tokens=0, target_forwards=0,
                    request_seconds=0.0, decode_seconds=0.0, errors=0)


def metrics(counters: dict, **state) -> Metrics:
    """A snapshot from a copy of the counters (and any extra counters) plus the backend's state."""
    m = Metrics(**counters, **state)
    m["accept_length"] = m["output_tokens"] / max(m["target_forwards"], 1)
    return m


class Backend(abc.ABC):
    """cfg (with `model_name`, `max_new_tokens`, `http`), `tokenizer`, `max_context` (0 = unknown)."""

    cfg: Any
    tokenizer: Any
    max_context: int = 0

    @property
    @abc.abstractmethod
    def draft_version(self) -> int: ...

    @abc.abstractmethod
    def submit(self, prompt: list[int], max_new_tokens: int | None = None, temperature: float = 0.0,
               seed: int | None = None, eos: int | None = None, domain: str = "", speculative: bool = True) -> Handle:
        """Queue a request; its tokens and final result arrive on the handle's events."""

    @abc.abstractmethod
    def snapshot(self) -> Metrics: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def complete(self, prompt: list[int], **kw) -> dict:
        """Blocking convenience: the final event of a request."""
        h = self.submit(prompt, **kw)
        while not isinstance(ev := h.events.get(), dict):
            pass
        return ev
