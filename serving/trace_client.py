"""Trace export client: the serving tier's side of TraceIngest.

Decoding must never wait on the trainer, so `submit` only appends to a bounded queue; background
threads encode, chunk and stream batches, retry with exponential backoff when the trainer is down
or pushing back, and drop the oldest traces first once a queue is full (counted in
`stats()["dropped"]`). Delivery is at-least-once: a trace whose ack was lost in a broken stream is
sent again.

A multi-process trainer has one ingest endpoint per host (`address` lists them, comma-separated).
Each trace goes to the endpoint that rendezvous hashing of its request id picks among those up, so
a request's traces always land on the same host while the set is stable, and when an endpoint
fails only its traces move (to each one's next choice), coming back once its backoff has passed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import re
import threading
import time

import grpc
import xxhash

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
    address: str = "127.0.0.1:50051"  # the trainer's ingest.address; several (one per trainer host): "a:p,b:p"
    max_queue: int = 256  # traces held per endpoint while the trainer is slow or down; oldest dropped past this
    batch_size: int = 8  # traces per stream
    streams: int = 2  # concurrent streams per endpoint (sender threads): keeps the trainer's reader and writer busy
    max_chunk_bytes: int = 2 << 20  # must not exceed the server's limits.max_chunk_bytes
    rpc_timeout_s: float = 60.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0

    def __post_init__(self):
        for name in ("max_queue", "batch_size", "streams", "max_chunk_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not self.addresses() or len(set(self.addresses())) != len(self.addresses()):
            raise ValueError(f"address {self.address!r}: expected host:port, or several distinct ones separated "
                             f"by commas")

    def addresses(self) -> list[str]:
        return [a.strip() for a in self.address.split(",") if a.strip()]


@dataclasses.dataclass
class _Item:
    request_id: str
    trace: Trace | None
    parts: list | None = None  # encoded once, kept across retries


class _Lane:
    """One trainer endpoint: its channel, its queue, and until when it counts as down."""

    def __init__(self, cfg: TraceClientConfig, address: str):
        self.address = address
        opts = [("grpc.max_send_message_length", max_message_bytes(cfg.max_chunk_bytes)),
                ("grpc.max_receive_message_length", 4 << 20),
                # gRPC's own reconnect backoff (up to 120 s by default) would keep a restarted trainer
                # unreachable long after ours has passed: the two are the same.
                ("grpc.initial_reconnect_backoff_ms", int(1000 * cfg.backoff_initial_s)),
                ("grpc.min_reconnect_backoff_ms", int(1000 * cfg.backoff_initial_s)),
                ("grpc.max_reconnect_backoff_ms", int(1000 * cfg.backoff_max_s))]
        self.channel = dataclasses.replace(cfg, address=address).channel(opts)
        self.stub = pb_grpc.TraceIngestStub(self.channel)
        # Push sends pre-framed chunk bytes (no serializer): see bridge.chunks.
        self.push = self.channel.stream_stream(PUSH_METHOD, response_deserializer=pb.PushAck.FromString)
        self.queue: collections.deque[_Item] = collections.deque()
        self.inflight = 0
        self.down_until = 0.0  # monotonic time before which no new trace is routed here
        self.backoff = cfg.backoff_initial_s
        self.acked = 0
        self.failures = EveryWindow(log)

    def up(self, now: float) -> bool:
        return now >= self.down_until


class TraceClient:
    def __init__(self, cfg: TraceClientConfig):
        self.cfg = cfg
        self._metadata = cfg.metadata()  # an unset env: token fails here, before a channel is opened
        self._lanes = [_Lane(cfg, a) for a in cfg.addresses()]
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._counts = dict(submitted=0, acked=0, rejected=0, dropped=0, retries=0, backpressured=0, rerouted=0)
        self.rejected_by: dict[str, int] = {}  # the trace field the trainer named in its refusal
        self.last_error = ""
        self._threads = [threading.Thread(target=self._run, args=(lane,), name=f"trace-client-{j}-{i}", daemon=True)
                         for j, lane in enumerate(self._lanes) for i in range(cfg.streams)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ caller side (never blocks)

    def submit(self, trace: Trace) -> None:
        with self._cond:
            self._counts["submitted"] += 1
            self._enqueue([_Item(trace.request_id, trace)])
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            now = time.monotonic()
            queued = sum(len(lane.queue) + lane.inflight for lane in self._lanes)
            return dict(self._counts, queued=queued, rejected_by=dict(self.rejected_by),
                        endpoints={lane.address: dict(acked=lane.acked, queued=len(lane.queue) + lane.inflight,
                                                      up=lane.up(now)) for lane in self._lanes})

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued trace was acked, rejected or dropped. True if that happened."""
        with self._cond:
            return self._cond.wait_for(lambda: not any(lane.queue or lane.inflight for lane in self._lanes), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Try to deliver what is queued for up to `timeout` seconds, then stop."""
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=max(1.0, self.cfg.rpc_timeout_s))
        for lane in self._lanes:
            lane.channel.close()

    def health(self, timeout: float = 2.0) -> pb.HealthReply:
        """The first endpoint's health (the only one, for a single-process trainer)."""
        return self._lanes[0].stub.Health(pb.HealthRequest(), timeout=timeout, metadata=self._metadata)

    def server_stats(self, timeout: float = 5.0) -> pb.StatsReply:
        return self._lanes[0].stub.Stats(pb.StatsRequest(), timeout=timeout, metadata=self._metadata)

    # ------------------------------------------------------------ routing (callers hold the lock)

    def _route(self, request_id: str, now: float) -> _Lane:
        """The endpoint of highest rendezvous weight among those up (all down: among all)."""
        up = [lane for lane in self._lanes if lane.up(now)] or self._lanes
        return max(up, key=lambda lane: xxhash.xxh3_64_intdigest(f"{lane.address}\0{request_id}".encode()))

    def _enqueue(self, items: list[_Item], front: bool = False, origin: _Lane | None = None) -> int:
        """Queue `items` on their endpoints (`front`: ahead of what waits, for retries). Returns how
        many went to an endpoint other than `origin`."""
        now, moved = time.monotonic(), 0
        for item in reversed(items) if front else items:
            lane = self._route(item.request_id, now)
            moved += origin is not None and lane is not origin
            lane.queue.appendleft(item) if front else lane.queue.append(item)
            while len(lane.queue) > self.cfg.max_queue:
                dropped = lane.queue.popleft()
                self._counts["dropped"] += 1
                log.debug("trace queue for %s full: dropped %s", lane.address, dropped.request_id)
        return moved

    # ------------------------------------------------------------ sender threads, one lane each

    def _run(self, lane: _Lane) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: lane.queue or self._stop.is_set(), timeout=0.5)
                batch = [lane.queue.popleft() for _ in range(min(self.cfg.batch_size, len(lane.queue)))]
                lane.inflight += len(batch)
            if not batch:
                continue
            pending = {item.request_id: item for item in batch}
            failed = False
            try:
                retry_after = self._send(lane, batch, pending)
                lane.failures.reset()
            except grpc.RpcError as e:
                failed = True
                self.last_error = f"{lane.address}: {e.code().name}: {e.details()}"
                lane.failures.warning("trace export to %s failed (%s); retrying %d traces in %.2fs%s", lane.address,
                                      self.last_error, len(batch), lane.backoff,
                                      " on the other endpoints" if len(self._lanes) > 1 else "")
            left = list(pending.values())
            with self._cond:
                if failed:  # down for a backoff: new traces and this lane's queue go elsewhere meanwhile
                    retry_after = lane.backoff
                    lane.down_until = time.monotonic() + retry_after
                    lane.backoff = min(2 * lane.backoff, self.cfg.backoff_max_s)
                    left += list(lane.queue)
                    lane.queue.clear()
                else:
                    lane.backoff = self.cfg.backoff_initial_s
                if left:
                    self._counts["retries"] += len(left)
                    self._counts["rerouted"] += self._enqueue(left, front=True, origin=lane)
                lane.inflight -= len(batch)
                self._cond.notify_all()
            if retry_after:
                self._stop.wait(retry_after * random.uniform(0.8, 1.2))

    def _send(self, lane: _Lane, batch: list[_Item], pending: dict[str, _Item]) -> float:
        """Stream one batch, removing settled traces from `pending`. Returns seconds to wait."""

        def requests():  # encoded lazily: trace N+1 is encoded while trace N is on the wire
            for item in batch:
                if item.parts is None:
                    item.parts = encode_parts(item.trace)
                    item.trace = None
                yield from chunk_messages(item.request_id, item.parts, self.cfg.max_chunk_bytes)

        retry_after = 0.0
        for ack in lane.push(requests(), timeout=self.cfg.rpc_timeout_s, metadata=self._metadata):
            if ack.code == _OK:
                with self._cond:
                    self._counts["acked"] += 1
                    lane.acked += 1
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
