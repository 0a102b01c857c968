"""Shared fixtures: a real TraceIngest server on 127.0.0.1 with a spool in tmp_path."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

# Eight host CPU devices so the trainer's mesh tests can shard (must precede the first jax import).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One JAX compilation cache per test session, empty at its start (as in CI): many tests, and the trainer
# processes they start, compile the same programs (a third of some files' time). Every program is still
# compiled for real once per session; the libtpu compile child runs without it (aurora_jax.aot.child_env).
_COMPILE_CACHE = tempfile.mkdtemp(prefix="aurora-jax-compile-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILE_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import grpc
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aurora_jax.buffer import BufferConfig
from aurora_jax.config import IngestConfig, TrainerConfig
from aurora_jax.model import DraftConfig
from aurora_jax.service import start_ingest
from aurora_jax.validate import TraceLimits
from bridge.proto import aurora_pb2 as pb
from bridge.chunks import PUSH_METHOD, chunk_messages
from bridge.synthetic import random_trace
from bridge.traces import encode
from serving.http import AppServer

VOCAB = 1000
TPU_CHILD = pytest.StashKey()  # the libtpu compile child, started early (tests/test_tpu_compile.py)


def pytest_collection_finish(session):
    """Start the TPU ahead-of-time compiles (minutes, mostly one core) as soon as it is known they
    will be needed, so they run beside the tests collected before them."""
    from aurora_jax.aot import libtpu_available, start_child

    if libtpu_available() and any(item.nodeid.startswith("tests/test_tpu_compile.py") for item in session.items):
        from tests.test_tpu_compile import child_args
        session.config.stash[TPU_CHILD] = start_child(child_args())


def pytest_sessionfinish(session):
    child = session.config.stash.get(TPU_CHILD, None)
    if child is not None and child.poll() is None:
        child.kill()
        child.wait()
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


def make_trace(i: int, seed: int = 0, **kw):
    rng = np.random.default_rng([seed, i])
    kw.setdefault("vocab", VOCAB)
    return random_trace(rng, request_id=f"req-{seed}-{i}", **kw)


def trainer_config(tmp_path, **sections) -> TrainerConfig:
    parts = dict(ingest=IngestConfig(address="127.0.0.1:0"), limits=TraceLimits(vocab_size=VOCAB),
                 buffer=BufferConfig(spool_dir=str(tmp_path / "spool")),
                 model=DraftConfig(vocab_size=VOCAB, target_hidden_size=32))  # random_trace's default hidden
    for name, changes in sections.items():
        parts[name] = dataclasses.replace(parts.get(name) or getattr(TrainerConfig(**{k: parts[k] for k in ("limits", "model")}), name), **changes)
    return TrainerConfig(**parts)


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def start(**sections):
        srv = start_ingest(trainer_config(tmp_path, **sections))
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop(grace=0)
        srv.buffer.close()


def push_raw(address: str, messages, metadata=(), timeout: float = 10.0) -> list[pb.PushAck]:
    """Stream serialized TraceChunks straight to the server (no client library); collect the acks."""
    with grpc.insecure_channel(address) as ch:
        push = ch.stream_stream(PUSH_METHOD, response_deserializer=pb.PushAck.FromString)
        return list(push(iter(messages), metadata=metadata, timeout=timeout))


def push_payload(address: str, rid: str, payload: bytes, max_chunk: int = 1 << 20, **kw) -> pb.PushAck:
    acks = push_raw(address, chunk_messages(rid, [payload], max_chunk), **kw)
    assert len(acks) == 1, acks
    return acks[0]


def push_trace(address: str, trace, **kw) -> pb.PushAck:
    return push_payload(address, trace.request_id, encode(trace), **kw)


def wait_for(pred, timeout: float = 10.0) -> bool:
    """Poll `pred` until true (True) or `timeout` seconds pass (False)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


class JsonHttpServer:
    """A real loopback HTTP server answering JSON POSTs with `handle(path, body, headers) -> (code, obj)`:
    the transport of the fakes that stand in for services that cannot run here (SGLang needs a GPU)."""

    def __init__(self, handle):
        app = FastAPI()

        @app.post("/{path:path}")
        async def post(path: str, request: Request):
            code, out = await run_in_threadpool(handle, "/" + path, await request.json(), request.headers)
            return JSONResponse(out, status_code=code)

        self.http = AppServer(app, name="fake-server").start()
        self.url = self.http.url

    def close(self) -> None:
        self.http.stop()
