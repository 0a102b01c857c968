"""TraceIngest gRPC server: reassemble, validate, spool durably, then acknowledge.

Per-trace problems (bad field, oversize, buffer full) are answered in that trace's PushAck
so one bad trace does not tear down a stream carrying good ones; stream-level problems (no
or wrong token, a message over the gRPC limit) end the call with the gRPC status itself.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
from typing import Callable
from concurrent import futures
from pathlib import Path

import grpc

from aurora_jax import __version__
from aurora_jax.buffer import BufferFull, ReplayBuffer
from aurora_jax.config import IngestConfig
from bridge.config import resolve_secret
from aurora_jax.validate import TraceLimits, validate
from bridge.proto import aurora_pb2 as pb
from bridge.chunks import SERVICE, Reassembler, max_message_bytes, parse_chunk
from bridge.tensors import OversizeError, TraceError
from bridge.traces import Trace, decode

log = logging.getLogger(__name__)

OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
MAX_ID, MAX_MESSAGE = 256, 4096  # characters of a request id / error message echoed in acks and logs


class StreamSlots:
    """Long-lived streams (Push, Subscribe) each hold a server thread; past `limit` open ones a new
    stream is refused with RESOURCE_EXHAUSTED, so that a few threads stay free for Health/Stats and
    a flood of idle streams cannot stall the server. Size the thread pool with `pool_size`."""

    SPARE = 4  # threads beyond the streams: unary calls (Health, Stats) always find one

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.open = limit, what, 0
        self._lock = threading.Lock()

    @property
    def pool_size(self) -> int:
        return self.limit + self.SPARE

    def enter(self, context) -> None:
        with self._lock:
            if self.open >= self.limit:
                full = True
            else:
                full, self.open = False, self.open + 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.limit} {self.what} already open (the configured "
                                                              f"limit); retry later")

    def leave(self) -> None:
        with self._lock:
            self.open -= 1


def short_id(rid: str) -> str:
    """A request id as acks and logs show it: whole when sane, else cut, with its length said."""
    return rid if len(rid) <= MAX_ID else f"{rid[:MAX_ID]}...({len(rid)} chars)"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


class IngestServicer:
    def __init__(self, buffer: ReplayBuffer, limits: TraceLimits, max_streams: int = 16,
                 on_accept: Callable[[Trace], None] | None = None):
        self.buffer = buffer
        self.on_accept = on_accept  # told of every acknowledged trace (e.g. served utility per version)
        self.limits = limits
        self.streams = StreamSlots(max_streams, "Push streams")
        self._lock = threading.Lock()
        self.rejected = 0

    def _reject(self, rid: str, code: int, msg: str, retry_after_ms: int = 0) -> pb.PushAck:
        if not retry_after_ms:  # backpressure is counted by the buffer, not as a rejection
            with self._lock:
                self.rejected += 1
        rid, msg = short_id(rid), msg[:MAX_MESSAGE]  # an ack must never outgrow the stream's send limit
        log.warning("trace %r rejected: %s", rid, msg)
        return pb.PushAck(request_id=rid, code=code, message=msg, retry_after_ms=retry_after_ms)

    def check(self, rid: str, payload) -> tuple[memoryview, Trace] | pb.PushAck:
        """Decode and validate one whole trace: (payload, trace) if sound, else the error ack."""
        try:
            trace = decode(payload)
            if trace.request_id != rid:
                raise TraceError("request_id", f"{trace.request_id!r} does not match its chunks' {rid!r}")
            validate(trace, self.limits)
        except TraceError as e:
            return self._reject(rid, INVALID_ARGUMENT, f"request {short_id(rid)!r}: {e}")
        return payload, trace

    def store(self, payload, trace: Trace) -> pb.PushAck:
        try:
            seq = self.buffer.put(payload, trace)
        except BufferFull as e:
            return self._reject(trace.request_id, RESOURCE_EXHAUSTED, str(e), e.retry_after_ms)
        if self.on_accept is not None:
            try:
                self.on_accept(trace)
            except Exception:  # noqa: BLE001  (an observer never costs a stored trace its ack)
                log.exception("on_accept failed for trace %r", short_id(trace.request_id))
        return pb.PushAck(request_id=trace.request_id, code=OK, seq=seq)

    def _read(self, request_iterator, out: queue.Queue) -> None:
        """Reader half of a stream: reassemble and validate, hand sound traces to the writer."""
        chunks = Reassembler(self.limits.max_trace_bytes, allocate=self.buffer.allocate)
        try:
            for msg in request_iterator:
                rid = ""
                try:
                    chunk, part = parse_chunk(msg)
                    rid = chunk.request_id
                    payload = chunks.add(chunk, part)
                except OversizeError as e:
                    out.put(self._reject(rid, RESOURCE_EXHAUSTED, str(e)))
                    continue
                except TraceError as e:
                    out.put(self._reject(rid, INVALID_ARGUMENT, str(e)))
                    continue
                if payload is not None:
                    out.put(self.check(rid, payload))
            for rid in chunks.pending:
                log.warning("stream ended with trace %r incomplete; the client resends it", rid)
        except Exception as e:  # the client went away (cancel, deadline): nothing of an open trace was acked
            log.debug("push stream ended: %r", e)
        finally:
            out.put(None)

    def Push(self, request_iterator, context):
        # Two halves so that receiving and validating trace N+1 overlaps spooling trace N
        # (file writes release the GIL); acks still leave in arrival order.
        self.streams.enter(context)
        try:
            ready: queue.Queue = queue.Queue(maxsize=2)
            threading.Thread(target=self._read, args=(request_iterator, ready), daemon=True,
                             name="ingest-read").start()
            while (item := ready.get()) is not None:
                yield item if isinstance(item, pb.PushAck) else self.store(*item)
        finally:
            self.streams.leave()

    def Health(self, request, context):
        return pb.HealthReply(serving=True, version=__version__)

    def Stats(self, request, context):
        s = self.buffer.snapshot_stats()
        return pb.StatsReply(accepted=s["accepted"], rejected=self.rejected, backpressured=s["backpressured"],
                             buffered=s["buffered"], buffered_bytes=s["buffered_bytes"], consumed=s["consumed"],
                             evicted_stale=s["evicted_stale"], spool_bytes=s["spool_bytes"])


class BearerAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call but Health (for liveness probes)."""

    def __init__(self, token: str, open_methods=("/aurora.v1.TraceIngest/Health",)):
        self._expected = f"Bearer {token}".encode()
        self.OPEN = set(open_methods)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method in self.OPEN:
            return handler
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return handler
        why = "missing authorization metadata" if not got else "invalid bearer token"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{details.method}: {why}")

        kind = (handler.request_streaming, handler.response_streaming)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[kind]
        return make(deny)


def server_options(limits: TraceLimits) -> list[tuple[str, int]]:
    size = max_message_bytes(limits.max_chunk_bytes)
    # so_reuseport off: a second trainer on the same port must fail, not silently split the traffic.
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0)]


def bind(server: grpc.Server, address: str, tls_cert: str, tls_key: str, key: str) -> int:
    """Bind `address` (TLS when a cert is given); a clear OSError naming the config key if it cannot."""
    try:
        if tls_cert:
            creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises this when the port cannot be bound
        port = 0
    if port == 0:
        raise OSError(f"{key}: cannot bind {address} (in use, or not a local address?)")
    return port


class IngestServer:
    """A real gRPC server around a ReplayBuffer. `port` is the bound port after start()."""

    def __init__(self, cfg: IngestConfig, limits: TraceLimits, buffer: ReplayBuffer,
                 on_accept: Callable[[Trace], None] | None = None):
        self.cfg, self.limits, self.buffer = cfg, limits, buffer
        self.servicer = IngestServicer(buffer, limits, cfg.max_streams, on_accept)
        self._token = token = resolve_secret(cfg.auth_token)
        self._server = grpc.server(futures.ThreadPoolExecutor(self.servicer.streams.pool_size,
                                                              thread_name_prefix="ingest"),
                                   options=server_options(limits),
                                   interceptors=[BearerAuth(token)] if token else [])
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self.port = bind(self._server, cfg.address, cfg.tls_cert, cfg.tls_key, "ingest.address")
        self.address = f"{cfg.address.rpartition(':')[0]}:{self.port}"

    def _handlers(self):
        # Push takes raw bytes: chunks are parsed by bridge.chunks without copying payloads.
        s = self.servicer
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Push": grpc.stream_stream_rpc_method_handler(s.Push, response_serializer=pb.PushAck.SerializeToString),
            "Health": grpc.unary_unary_rpc_method_handler(s.Health, pb.HealthRequest.FromString,
                                                          pb.HealthReply.SerializeToString),
            "Stats": grpc.unary_unary_rpc_method_handler(s.Stats, pb.StatsRequest.FromString,
                                                         pb.StatsReply.SerializeToString),
        })

    def start(self) -> "IngestServer":
        self._server.start()
        log.info("TraceIngest listening on %s (%s, auth %s)", self.address,
                 "TLS" if self.cfg.tls_cert else "plaintext", "on" if self._token else "off")
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()
