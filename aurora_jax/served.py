"""What serving measured, per draft version: the utility feedback the online setting gives for free.

Every trace carries the `draft_version` that drafted it, its target forwards and its token counts, so
the trainer knows, per version, the acceptance length serving got (output tokens per target forward)
and the per-request throughput, beside the offline acceptance proxy it measured for the same
version when it published it. The gap between the two is the first thing to look at when a draft
that trains well does not serve well. Fed by the ingest endpoint as traces are acknowledged; read by
the train loop (metrics JSONL) and the trainer's Prometheus endpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

from bridge.traces import Trace


@dataclasses.dataclass
class _Version:
    requests: int = 0
    output_tokens: int = 0
    target_forwards: int = 0
    seconds: float = 0.0
    tokens: int = 0
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)  # (output, forwards)
    proxy: float | None = None  # the trainer's acceptance proxy when it published this version


class ServedUtility:
    def __init__(self, window: int = 64, keep_versions: int = 256):
        self.window, self.keep_versions = window, keep_versions
        self._versions: dict[int, _Version] = {}
        self._lock = threading.Lock()

    def _get(self, version: int) -> _Version:
        v = self._versions.get(version)
        if v is None:
            v = self._versions[version] = _Version(recent=collections.deque(maxlen=self.window))
            for old in sorted(self._versions)[:-self.keep_versions]:
                del self._versions[old]
        return v

    def add(self, trace: Trace) -> None:
        """One served request (a trace as acknowledged). Traces without a forward count (target-only
        serving of an old client) say nothing about acceptance and are skipped."""
        out, fw = int(trace.tokens.shape[0]) - int(trace.prompt_len), int(trace.target_forwards)
        if fw <= 0 or out <= 0:
            return
        with self._lock:
            v = self._get(int(trace.draft_version))
            v.requests += 1
            v.output_tokens += out
            v.target_forwards += fw
            v.recent.append((out, fw))
            if trace.end_unix_s > trace.start_unix_s:
                v.seconds += trace.end_unix_s - trace.start_unix_s
                v.tokens += int(trace.tokens.shape[0])

    def published(self, version: int, proxy: float | None) -> None:
        with self._lock:
            self._get(version).proxy = proxy

    def accept_lengths(self, version: int) -> list[float]:
        """Per-request acceptance lengths of one version's most recent requests (at most `window`)."""
        with self._lock:
            v = self._versions.get(version)
            return [o / f for o, f in v.recent] if v is not None else []

    def accept_lengths_before(self, version: int, n: int, skip=()) -> list[float]:
        """Up to n per-request acceptance lengths of the versions served before `version`, newest
        first (versions in `skip`, e.g. rolled back ones, left out)."""
        out: list[float] = []
        with self._lock:
            for k in sorted((k for k in self._versions if k < version and k not in skip), reverse=True):
                out += [o / f for o, f in reversed(self._versions[k].recent)]
                if len(out) >= n:
                    break
        return out[:n]

    def state(self) -> dict:
        """JSON-able state, saved with each checkpoint so a restarted trainer keeps its judgement."""
        with self._lock:
            return {str(k): dict(dataclasses.asdict(v), recent=[list(x) for x in v.recent])
                    for k, v in self._versions.items()}

    def load(self, state: dict) -> None:
        with self._lock:
            for k, v in state.items():
                recent = collections.deque((tuple(x) for x in v.pop("recent")), maxlen=self.window)
                self._versions[int(k)] = _Version(**v, recent=recent)

    def snapshot(self) -> dict[int, dict]:
        """{version: requests, accept_length (all its requests), accept_length_recent (its last
        `window`), request_throughput (tokens / second of its requests), proxy_accept_length}."""
        with self._lock:
            out = {}
            for k, v in sorted(self._versions.items()):
                rec_out, rec_fw = sum(o for o, _ in v.recent), sum(f for _, f in v.recent)
                out[k] = dict(requests=v.requests, accept_length=v.output_tokens / v.target_forwards
                              if v.target_forwards else None,
                              accept_length_recent=rec_out / rec_fw if rec_fw else None,
                              request_throughput=v.tokens / v.seconds if v.seconds > 0 else None,
                              proxy_accept_length=v.proxy)
            return out


def serve_metrics(trainer, address: str):
    """A Prometheus /metrics endpoint for `trainer` on `address` ("host:port", port 0 = any free one),
    served by prometheus_client in a thread; every scrape reads the trainer's state then. Returns the
    server (`server_port`, `shutdown()`)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class TrainerCollector:
        def collect(self):
            last = trainer.last
            yield GaugeMetricFamily("aurora_trainer_step", "optimizer steps taken", value=trainer.learner.step)
            yield GaugeMetricFamily("aurora_trainer_draft_version", "latest published draft version",
                                    value=trainer.version)
            for key, help_ in (("loss", "training loss (last step read back)"),
                               ("accept_len", "offline acceptance-length proxy (last step read back)"),
                               ("buffered", "traces in the replay buffer")):
                if key in last:
                    yield GaugeMetricFamily(f"aurora_trainer_{key}", help_, value=float(last[key]))
            families = dict(
                accept_length=GaugeMetricFamily("aurora_trainer_served_accept_length", "acceptance length serving "
                                                "measured (output tokens per target forward)", labels=["version"]),
                accept_length_recent=GaugeMetricFamily("aurora_trainer_served_accept_length_recent", "the same over "
                                                       "the version's most recent requests", labels=["version"]),
                proxy_accept_length=GaugeMetricFamily("aurora_trainer_proxy_accept_length", "the trainer's acceptance "
                                                      "proxy when it published the version", labels=["version"]),
                request_throughput=GaugeMetricFamily("aurora_trainer_served_request_throughput", "tokens per second "
                                                     "of a request served by the version", labels=["version"]))
            requests = CounterMetricFamily("aurora_trainer_served_requests", "requests served by the version",
                                           labels=["version"])
            for version, u in trainer.served.snapshot().items():
                requests.add_metric([str(version)], u["requests"])
                for key, family in families.items():
                    if u[key] is not None:
                        family.add_metric([str(version)], u[key])
            yield requests
            yield from families.values()
            guard = CounterMetricFamily("aurora_trainer_guard_events", "the publication guard's decisions: gate "
                                        "passed/refused/unjudged, non-finite weights refused, rollbacks, adaptive waits",
                                        labels=["event"])
            for event, n in trainer.guard_stats.items():
                guard.add_metric([event], n)
            yield guard

    registry = CollectorRegistry()
    registry.register(TrainerCollector())
    host, _, port = address.rpartition(":")
    server, _ = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server
