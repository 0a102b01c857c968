"""OpenAI-compatible HTTP front end of the embedded engine (stdlib `http.server`, threaded).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as server-sent
events ending in `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Bad requests get a 400 with an OpenAI-style `{"error": {"message": ...}}` body.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving.engine import Engine

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    pass


def _chat_prompt(tok, messages) -> str:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prometheus(m: dict) -> str:
    t = m.get("traces", {})
    rows = [
        ("aurora_requests_total", "counter", "finished requests", m["requests"]),
        ("aurora_requests_running", "gauge", "requests being decoded", m["running"]),
        ("aurora_prompt_tokens_total", "counter", "prompt tokens of finished requests", m["prompt_tokens"]),
        ("aurora_output_tokens_total", "counter", "generated tokens of finished requests", m["output_tokens"]),
        ("aurora_target_forwards_total", "counter", "target forward passes", m["target_forwards"]),
        ("aurora_accept_length", "gauge", "tokens emitted per target forward", m["accept_length"]),
        ("aurora_decode_tokens_per_second", "gauge", "output tokens per second of decoding",
         m["output_tokens"] / max(m["decode_seconds"], 1e-9)),
        ("aurora_request_throughput_tokens_per_second", "gauge",
         "mean per-request (input + output tokens) / latency",
         (m["prompt_tokens"] + m["output_tokens"]) / max(m["request_seconds"], 1e-9)),
        ("aurora_batch_size_mean", "gauge", "requests per fused target forward (decode rounds)", m["mean_batch"]),
        ("aurora_draft_version", "gauge", "draft version serving", m["draft_version"]),
        ("aurora_draft_swaps_total", "counter", "hot-swaps applied", m["swaps"]),
        ("aurora_draft_swap_ms", "gauge", "duration of the last hot-swap", m["last_swap_ms"]),
        ("aurora_draft_versions_received_total", "counter", "WeightSync versions accepted", m.get("versions_received", 0)),
        ("aurora_draft_versions_refused_total", "counter",
         "WeightSync versions refused (corrupt, or trained for another draft; see /health)", m.get("versions_refused", 0)),
        ("aurora_traces_sent_total", "counter", "traces acknowledged by the trainer", t.get("acked", 0)),
        ("aurora_traces_dropped_total", "counter", "traces dropped (trainer unreachable or queue full)",
         t.get("dropped", 0)),
        ("aurora_errors_total", "counter", "rejected requests", m["errors"]),
    ]
    return "".join(f"# HELP {n} {h}\n# TYPE {n} {k}\n{n} {float(v):g}\n" for n, k, h, v in rows)


def make_handler(engine: Engine, model_name: str):
    tok = engine.tokenizer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # route access logs through logging
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else (json.dumps(body) if not isinstance(body, str) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                m = engine.snapshot()
                self._send(200, dict(status="ok", draft_version=engine.draft_version,
                                     versions_refused=m.get("versions_refused", 0),
                                     last_refusal=m.get("last_refusal", "")))
            elif self.path == "/metrics":
                self._send(200, prometheus(engine.snapshot()), "text/plain; version=0.0.4")
            elif self.path == "/v1/models":
                self._send(200, dict(object="list", data=[dict(id=model_name, object="model", owned_by="aurora")]))
            else:
                self._send(404, dict(error=dict(message=f"no route {self.path}", type="not_found")))

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length", 0))
                if n > 8 << 20:
                    raise BadRequest("request body over 8 MiB")
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError as e:
                    raise BadRequest(f"body is not JSON: {e}") from None
                if not isinstance(body, dict):
                    raise BadRequest("body must be a JSON object")
                if self.path == "/v1/completions":
                    prompt = body.get("prompt")
                    if isinstance(prompt, list) and len(prompt) == 1:
                        prompt = prompt[0]
                    if not isinstance(prompt, str) or not prompt:
                        raise BadRequest("'prompt' must be a non-empty string")
                    self._generate(body, prompt, chat=False)
                elif self.path == "/v1/chat/completions":
                    self._generate(body, _chat_prompt(tok, body.get("messages")), chat=True)
                else:
                    self._send(404, dict(error=dict(message=f"no route {self.path}", type="not_found")))
            except BadRequest as e:
                self._send(400, dict(error=dict(message=str(e), type="invalid_request_error")))

        def _params(self, body):
            def num(key, default, kind, lo, hi):
                v = body.get(key, default)
                if v is None:
                    return default
                if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
                    raise BadRequest(f"'{key}' must be a number")
                if not lo <= v <= hi:
                    raise BadRequest(f"'{key}'={v} outside [{lo}, {hi}]")
                return kind(v)
            return dict(max_new_tokens=num("max_tokens", engine.cfg.max_new_tokens, int, 1, engine.cfg.max_new_tokens),
                        temperature=num("temperature", 0.0, float, 0.0, 10.0),
                        seed=body.get("seed") if isinstance(body.get("seed"), int) else None,
                        speculative=self._flag(body, "speculative", True))

        def _flag(self, body, key, default):
            v = body.get(key, default)
            if not isinstance(v, bool):
                raise BadRequest(f"'{key}' must be true or false")
            return v

        def _generate(self, body, prompt: str, chat: bool):
            params = self._params(body)
            ids = tok(prompt)["input_ids"]
            h = engine.submit(ids, eos=tok.eos_token_id, domain=str(body.get("domain", "")), **params)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            obj = "chat.completion" if chat else "text_completion"
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                emitted: list[int] = []
                text_so_far = ""
                while True:
                    ev = h.events.get()
                    if isinstance(ev, dict):
                        break
                    emitted += ev
                    text = tok.decode(emitted, skip_special_tokens=True)
                    delta, text_so_far = text[len(text_so_far):], text
                    chunk = dict(id=rid, object=obj + ".chunk", created=created, model=engine.cfg.model_name,
                                 choices=[dict(index=0, finish_reason=None,
                                               **(dict(delta=dict(content=delta)) if chat else dict(text=delta)))])
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                final = dict(id=rid, object=obj + ".chunk", created=created, model=engine.cfg.model_name,
                             choices=[dict(index=0, finish_reason=ev.get("finish_reason", "stop"),
                                           **(dict(delta={}) if chat else dict(text="")))])
                self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
                return
            while not isinstance(ev := h.events.get(), dict):
                pass
            if "error" in ev:
                raise BadRequest(ev["error"])
            text = tok.decode(ev["output"], skip_special_tokens=True)
            choice = dict(index=0, finish_reason=ev["finish_reason"],
                          **(dict(message=dict(role="assistant", content=text)) if chat else dict(text=text)))
            usage = dict(prompt_tokens=ev["prompt_tokens"], completion_tokens=len(ev["output"]),
                         total_tokens=ev["prompt_tokens"] + len(ev["output"]))
            self._send(200, dict(id=rid, object=obj, created=created, model=engine.cfg.model_name, choices=[choice],
                                 usage=usage, aurora=dict(draft_version=ev["draft_version"],
                                                          target_forwards=ev["target_forwards"],
                                                          request_id=ev["request_id"])))

    return Handler


class HttpServer:
    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000):
        self.engine = engine
        self.httpd = ThreadingHTTPServer((host, port), make_handler(engine, engine.cfg.model_name))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self) -> "HttpServer":
        self._thread.start()
        log.info("serving OpenAI-compatible API on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
