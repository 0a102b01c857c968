"""Trace export client: the serving tier's side of TraceIngest.

Decoding must never wait on the trainer, so `submit` only appends to a bounded queue; a
background thread encodes, chunks and streams batches, retries with exponential backoff when
the trainer is down or pushing back, and drops the oldest traces first once the queue is
full (counted in `stats()["dropped"]`). Delivery is at-least-once: a trace whose ack was lost
in a broken stream is sent again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import re
import threading

import grpc

from bridge.proto import aurora_pb2 as pb
from bridge.proto import aurora_pb2_grpc as pb_grpc
from bridge.chunks import PUSH_METHOD, chunk_messages, max_message_bytes
from bridge.traces import Trace, encode_parts
from serving.channel import ChannelConfig
from serving.ratelimit import EveryWindow

log = logging.getLogger(__name__)

_OK = grpc.StatusCode.OK.value[0]
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_REFUSED_FIELD = re.compile(r"(?:request '.*?': )?([\w.\[\]]+): ")  # ingest names the field first


@dataclasses.dataclass
class TraceClientConfig(ChannelConfig):
    address: str = "127.0.0.1:50051"  # the trainer's ingest.address
    max_queue: int = 256  # traces held while the trainer is slow or down; oldest dropped past this
    batch_size: int = 8  # traces per stream
    streams: int = 2  # concurrent streams (sender threads): keeps the trainer's reader and writer busy
    max_chunk_bytes: int = 2 << 20  # must not exceed the server's limits.max_chunk_bytes
    rpc_timeout_s: float = 60.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0

    def __post_init__(self):
        for name in ("max_queue", "batch_size", "streams", "max_chunk_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclasses.dataclass
class _Item:
    request_id: str
    trace: Trace | None
    parts: list | None = None  # encoded once, kept across retries


class TraceClient:
    def __init__(self, cfg: TraceClientConfig):
        self.cfg = cfg
        opts = [("grpc.max_send_message_length", max_message_bytes(cfg.max_chunk_bytes)),
                ("grpc.max_receive_message_length", 4 << 20)]
        self._metadata = cfg.metadata()  # an unset env: token fails here, before a channel is opened
        self._channel = cfg.channel(opts)
        self._stub = pb_grpc.TraceIngestStub(self._channel)
        # Push sends pre-framed chunk bytes (no serializer): see bridge.chunks.
        self._push = self._channel.stream_stream(PUSH_METHOD, response_deserializer=pb.PushAck.FromString)
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._inflight = 0
        self._stop = threading.Event()
        self._counts = dict(submitted=0, acked=0, rejected=0, dropped=0, retries=0, backpressured=0)
        self.rejected_by: dict[str, int] = {}  # the trace field the trainer named in its refusal
        self._failures = EveryWindow(log)
        self.last_error = ""
        self._threads = [threading.Thread(target=self._run, name=f"trace-client-{i}", daemon=True)
                         for i in range(cfg.streams)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ caller side (never blocks)

    def submit(self, trace: Trace) -> None:
        with self._cond:
            self._counts["submitted"] += 1
            self._queue.append(_Item(trace.request_id, trace))
            self._trim()
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return dict(self._counts, queued=len(self._queue) + self._inflight, rejected_by=dict(self.rejected_by))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued trace was acked, rejected or dropped. True if that happened."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._inflight, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Try to deliver what is queued for up to `timeout` seconds, then stop."""
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=max(1.0, self.cfg.rpc_timeout_s))
        self._channel.close()

    def health(self, timeout: float = 2.0) -> pb.HealthReply:
        return self._stub.Health(pb.HealthRequest(), timeout=timeout, metadata=self._metadata)

    def server_stats(self, timeout: float = 5.0) -> pb.StatsReply:
        return self._stub.Stats(pb.StatsRequest(), timeout=timeout, metadata=self._metadata)

    def _trim(self) -> None:  # holds the lock
        while len(self._queue) > self.cfg.max_queue:
            dropped = self._queue.popleft()
            self._counts["dropped"] += 1
            log.debug("trace queue full: dropped %s", dropped.request_id)

    # ------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = self.cfg.backoff_initial_s
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop.is_set(), timeout=0.5)
                batch = [self._queue.popleft() for _ in range(min(self.cfg.batch_size, len(self._queue)))]
                self._inflight += len(batch)
            if not batch:
                continue
            pending = {item.request_id: item for item in batch}
            try:
                retry_after = self._send(batch, pending)
                backoff = self.cfg.backoff_initial_s
                self._failures.reset()
            except grpc.RpcError as e:
                retry_after = backoff
                backoff = min(2 * backoff, self.cfg.backoff_max_s)
                self.last_error = f"{e.code().name}: {e.details()}"
                self._failures.warning("trace export to %s failed (%s); retrying %d traces in %.2fs",
                                       self.cfg.address, self.last_error, len(batch), retry_after)
            left = list(pending.values())
            with self._cond:
                if left:
                    self._counts["retries"] += len(left)
                    self._queue.extendleft(reversed(left))
                    self._trim()
                self._inflight -= len(batch)
                self._cond.notify_all()
            if retry_after:
                self._stop.wait(retry_after * random.uniform(0.8, 1.2))

    def _send(self, batch: list[_Item], pending: dict[str, _Item]) -> float:
        """Stream one batch, removing settled traces from `pending`. Returns seconds to wait."""

        def requests():  # encoded lazily: trace N+1 is encoded while trace N is on the wire
            for item in batch:
                if item.parts is None:
                    item.parts = encode_parts(item.trace)
                    item.trace = None
                yield from chunk_messages(item.request_id, item.parts, self.cfg.max_chunk_bytes)

        retry_after = 0.0
        for ack in self._push(requests(), timeout=self.cfg.rpc_timeout_s, metadata=self._metadata):
            if ack.code == _OK:
                self._count("acked")
                pending.pop(ack.request_id, None)
            elif ack.code == _RESOURCE_EXHAUSTED and ack.retry_after_ms:
                self._count("backpressured")
                retry_after = max(retry_after, ack.retry_after_ms / 1000)
            else:
                self._count("rejected")
                field = _REFUSED_FIELD.match(ack.message)
                with self._cond:
                    key = field.group(1) if field else "other"
                    self.rejected_by[key] = self.rejected_by.get(key, 0) + 1
                pending.pop(ack.request_id, None)
                self.last_error = ack.message
                log.error("trainer rejected trace %s: %s", ack.request_id, ack.message)
        return retry_after

    def _count(self, key: str) -> None:
        with self._cond:
            self._counts[key] += 1
