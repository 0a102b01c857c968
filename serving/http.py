"""OpenAI-compatible HTTP front end of a serving engine (the embedded one or the SGLang sidecar's).

On the ecosystem's standard stack, as SGLang and vLLM serve theirs: FastAPI routes with pydantic
models of the OpenAI request schema, uvicorn as the server (HTTP parsing, keep-alive, backlog), and
`prometheus_client` for /metrics. Routes: POST /v1/completions, POST /v1/chat/completions (both with
`"stream": true` as server-sent events ending in `data: [DONE]`), GET /v1/models, GET /health, GET
/metrics. Every refusal is an OpenAI-style `{"error": {"message", "type", "param", "code"}}` with
its status: 400 for a request that cannot be served as sent (schema, a prompt past the context),
404 for an unknown model or route, 413 for a body over the limit, 429 past the concurrency limit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from serving.backend import Backend

log = logging.getLogger(__name__)


@dataclasses.dataclass
class HttpLimits:
    """Resource bounds of the HTTP front (config `http.*`); each refusal is said in its error body."""

    max_body_bytes: int = 8 << 20  # 413 past it
    max_concurrent: int = 64  # requests being generated at once; 429 past it
    max_prompt_tokens: int = 0  # 0 = the target's context length (prompt + max_tokens must fit it)


class _Params(BaseModel):
    """Sampling fields both routes share (OpenAI names); unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: StrictBool = False
    speculative: StrictBool = True  # false: this request is decoded target-only (a side-by-side's baseline)
    domain: str = ""  # workload label, carried into the trace


class CompletionRequest(_Params):
    prompt: StrictStr | list[StrictStr]


class ChatMessage(BaseModel):
    role: StrictStr = Field(min_length=1)
    content: StrictStr


class ChatCompletionRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, dict(error=dict(message=message, type=kind, param=param, code=code))


def _chat_prompt(tok, messages: list[ChatMessage]) -> str:
    msgs = [m.model_dump() for m in messages]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


# name, kind, help, value from the engine's snapshot
_METRICS = [
    ("aurora_requests", "counter", "finished requests", lambda m: m["requests"]),
    ("aurora_requests_running", "gauge", "requests being decoded", lambda m: m["running"]),
    ("aurora_prompt_tokens", "counter", "prompt tokens of finished requests", lambda m: m["prompt_tokens"]),
    ("aurora_output_tokens", "counter", "generated tokens of finished requests", lambda m: m["output_tokens"]),
    ("aurora_target_forwards", "counter", "target forward passes", lambda m: m["target_forwards"]),
    ("aurora_accept_length", "gauge", "tokens emitted per target forward", lambda m: m["accept_length"]),
    ("aurora_decode_tokens_per_second", "gauge", "output tokens per second of decoding",
     lambda m: m["output_tokens"] / max(m["decode_seconds"], 1e-9)),
    ("aurora_request_throughput_tokens_per_second", "gauge", "mean per-request (input + output tokens) / latency",
     lambda m: (m["prompt_tokens"] + m["output_tokens"]) / max(m["request_seconds"], 1e-9)),
    ("aurora_batch_size_mean", "gauge", "requests per fused target forward (decode rounds)", lambda m: m["mean_batch"]),
    ("aurora_draft_version", "gauge", "draft version serving", lambda m: m["draft_version"]),
    ("aurora_draft_swaps", "counter", "hot-swaps applied", lambda m: m["swaps"]),
    ("aurora_draft_swap_ms", "gauge", "duration of the last hot-swap", lambda m: m["last_swap_ms"]),
    ("aurora_draft_versions_received", "counter", "WeightSync versions accepted", lambda m: m.get("versions_received", 0)),
    ("aurora_draft_versions_refused", "counter",
     "WeightSync versions refused (corrupt, or trained for another draft; see /health)",
     lambda m: m.get("versions_refused", 0)),
    ("aurora_traces_sent", "counter", "traces acknowledged by the trainer", lambda m: m.get("traces", {}).get("acked", 0)),
    ("aurora_traces_dropped", "counter", "traces dropped (trainer unreachable or queue full)",
     lambda m: m.get("traces", {}).get("dropped", 0)),
    ("aurora_traces_rejected", "counter", "traces the trainer refused (by field: aurora_traces_rejected_by_field)",
     lambda m: m.get("traces", {}).get("rejected", 0)),
    ("aurora_traces_not_made", "counter", "finished requests no trace was made of (SGLang sidecar: a response "
     "that does not convert, or output logprobs scaled by the temperature; see its log)",
     lambda m: m.get("trace_errors", 0) + m.get("traces_skipped", 0)),
    ("aurora_errors", "counter", "requests the engine failed", lambda m: m["errors"]),
]


def _registry(engine: Backend):
    """A prometheus_client registry whose one collector reads the engine's counters at each scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class EngineCollector:
        def collect(self):
            m = engine.snapshot()
            for name, kind, help_, value in _METRICS:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, help_, value=float(value(m)))
            by_field = CounterMetricFamily("aurora_traces_rejected_by_field", "traces the trainer refused, by the "
                                           "field its refusal named", labels=["field"])
            for field, n in sorted(m.get("traces", {}).get("rejected_by", {}).items()):
                by_field.add_metric([field], float(n))
            yield by_field

    registry = CollectorRegistry()
    registry.register(EngineCollector())
    return registry


def make_app(engine: Backend, limits: HttpLimits | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or getattr(engine.cfg, "http", None) or HttpLimits()
    tok, name = engine.tokenizer, engine.cfg.model_name
    context = limits.max_prompt_tokens or engine.max_context
    registry = _registry(engine)
    slots = threading.BoundedSemaphore(limits.max_concurrent)
    app = FastAPI(title="aurora-jax serving", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(ApiError(400, msg, param=where or None).body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message, kind).body, status_code=e.status_code)

    @app.get("/health")
    def health():
        m = engine.snapshot()
        return dict(status="ok", draft_version=engine.draft_version, versions_refused=m.get("versions_refused", 0),
                    last_refusal=m.get("last_refusal", ""))

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        return dict(object="list", data=[dict(id=name, object="model", owned_by="aurora")])

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        prompt = req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if len(req.prompt) == 1 else None)
        if not prompt:
            raise ApiError(400, "prompt: a non-empty string (or a list of exactly one)", param="prompt")
        return _generate(req, prompt, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest):
        return _generate(req, _chat_prompt(tok, req.messages), chat=True)

    def _generate(req: _Params, prompt: str, chat: bool):
        if req.model not in (None, name):
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{name}`",
                           param="model", code="model_not_found")
        max_new = engine.cfg.max_new_tokens
        n = req.max_tokens or max_new
        if n > max_new:
            raise ApiError(400, f"max_tokens: {n} is over this server's limit of {max_new}", param="max_tokens")
        ids = tok(prompt)["input_ids"]
        if context and len(ids) + n > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(ids) + n} tokens ({len(ids)} in the prompt, {n} for the completion).",
                           param="prompt", code="context_length_exceeded")
        if not slots.acquire(blocking=False):
            raise ApiError(429, f"over {limits.max_concurrent} concurrent requests; retry later",
                           kind="rate_limit_error")
        try:
            h = engine.submit(ids, max_new_tokens=n, temperature=req.temperature, seed=req.seed,
                              eos=tok.eos_token_id, domain=req.domain, speculative=req.speculative)
        except BaseException:
            slots.release()
            raise
        head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                    model=name, object="chat.completion" if chat else "text_completion")
        if req.stream:
            return StreamingResponse(_stream(h, head, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while not isinstance(ev := h.events.get(), dict):
                pass
        finally:
            slots.release()
        if "error" in ev:
            raise ApiError(400, ev["error"])
        text = tok.decode(ev["output"], skip_special_tokens=True)
        choice = dict(index=0, finish_reason=ev["finish_reason"],
                      **(dict(message=dict(role="assistant", content=text)) if chat else dict(text=text)))
        usage = dict(prompt_tokens=ev["prompt_tokens"], completion_tokens=len(ev["output"]),
                     total_tokens=ev["prompt_tokens"] + len(ev["output"]))
        return dict(**head, choices=[choice], usage=usage,
                    aurora=dict(draft_version=ev["draft_version"], target_forwards=ev["target_forwards"],
                                request_id=ev["request_id"]))

    def _stream(h, head: dict, chat: bool) -> Iterator[str]:
        """Server-sent events: a chunk per decoded step, then the finish (or the engine's error)."""
        head = dict(head, object=head["object"] + ".chunk")
        piece = lambda text: dict(delta=dict(content=text)) if chat else dict(text=text)  # noqa: E731
        emitted, so_far = [], ""
        try:
            while not isinstance(ev := h.events.get(), dict):
                emitted += ev
                text = tok.decode(emitted, skip_special_tokens=True)
                delta, so_far = text[len(so_far):], text
                yield f"data: {json.dumps(dict(head, choices=[dict(index=0, finish_reason=None, **piece(delta))]))}\n\n"
        finally:
            slots.release()
        if "error" in ev:  # the stream has started (200): the error travels as an event, as OpenAI's does
            yield f"data: {json.dumps(ApiError(500, ev['error'], kind='server_error').body)}\n\n"
        else:
            done = dict(index=0, finish_reason=ev.get("finish_reason", "stop"), **(dict(delta={}) if chat else
                                                                                   dict(text="")))
            yield f"data: {json.dumps(dict(head, choices=[done]))}\n\n"
        yield "data: [DONE]\n\n"

    return BodyLimit(app, limits.max_body_bytes)


class BodyLimit:
    """ASGI wrapper: a request body over `limit` bytes gets a 413 before the app sees it, whether it
    declares its length or arrives chunked (the body is read up to the limit, then handed on)."""

    DRAIN = 4  # an oversized body is read on up to this many limits before the 413 (then the connection closes)

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size, body, more = int(declared) if declared.isdigit() else 0, [], True
        while more and size <= self.limit:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: let the app see it
                return await self.app(scope, _replay([msg], receive), send)
            body.append(msg)
            size = max(size, sum(len(m.get("body", b"")) for m in body))
            more = msg.get("more_body", False)
        if size > self.limit:
            drained = 0  # read (and drop) what a client is still sending, up to a bound, so that it gets
            while body and more and drained < self.DRAIN * self.limit:  # the 413, not a reset connection
                msg = await receive()
                drained += len(msg.get("body", b""))
                more = msg.get("type") == "http.request" and msg.get("more_body", False)
            message = f"request body of {size}{'+' if more or drained else ''} bytes is over the {self.limit}-byte limit"
            data = json.dumps(ApiError(413, message).body).encode()
            await send(dict(type="http.response.start", status=413,
                            headers=[(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                     (b"connection", b"close")]))
            return await send(dict(type="http.response.body", body=data))
        return await self.app(scope, _replay(body, receive), send)


def _replay(messages: list, receive):
    queue = list(messages)

    async def replayed():
        return queue.pop(0) if queue else await receive()
    return replayed


class AppServer:
    """uvicorn serving an ASGI app from a background thread (port 0: any free port)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "http"):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, backlog=2048,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self.host, self.port, self.url = host, port, ""

    def start(self):
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError(f"HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


class HttpServer(AppServer):
    """The OpenAI-compatible front of `engine` (see module doc)."""

    def __init__(self, engine: Backend, host: str = "127.0.0.1", port: int = 8000, limits: HttpLimits | None = None):
        super().__init__(make_app(engine, limits), host, port)
        self.engine = engine

    def start(self) -> "HttpServer":
        super().start()
        log.info("serving OpenAI-compatible API on %s", self.url)
        return self


def error_text(response) -> str:
    """A client's account of an error response (httpx): the server's own words (OpenAI's
    `error.message`, SGLang's `message`), else the start of the body."""
    try:
        body = response.json()
        words = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("message") or body
    except (ValueError, AttributeError, KeyError, TypeError):
        words = response.text[:300] or response.reason_phrase
    return f"HTTP {response.status_code}: {words}"
