"""Decode weight payloads as SGLang's scheduler does, in a process unrelated to the one that made them.

SGLang's `MultiprocessingSerializer.deserialize` (utils/common.py) base64-decodes the payload and
loads it with `SafeUnpickler`, which admits only its allow-list of globals and maps
`torch.storage._load_from_bytes` to a `weights_only` torch.load. It runs in the scheduler, a process
the updater did not start, so a shared-memory file descriptor (what torch's ForkingPickler makes of
a CPU tensor) cannot be received there. This worker reproduces both: started with `subprocess` (its
own multiprocessing auth key), it reads one base64 payload per line on stdin and answers one JSON
line per payload on stdout: {"tensors": {name: [dtype, shape, base64 bytes]}} or {"error": "..."}.
The admitted globals are `serving.sglang.pinned.UNPICKLE_ALLOWED`, each checked against the wheel's
allow-list by tests/test_sglang_conformance.py.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import subprocess
import sys

import torch

from serving.sglang.pinned import UNPICKLE_ALLOWED


class _AllowList(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: torch.load(io.BytesIO(b), weights_only=True)
        if (module, name) in UNPICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def _decode(line: str) -> dict:
    try:
        named = _AllowList(io.BytesIO(base64.b64decode(line, validate=True))).load()
        return dict(tensors={k: [str(t.dtype).removeprefix("torch."), list(t.shape),
                                 base64.b64encode(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).decode()]
                             for k, t in named})
    except Exception as e:  # noqa: BLE001  (SGLang's scheduler would die here; the fake reports it)
        return dict(error=f"{type(e).__name__}: {e}")


class Decoder:
    """The worker process, from the test side: `decode(payload)` -> {name: tensor}, or raises."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.sglang_unpickle"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def decode(self, payload: str) -> dict[str, torch.Tensor]:
        self.proc.stdin.write(payload + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        if "error" in out:
            raise RuntimeError(out["error"])
        return {k: torch.frombuffer(bytearray(base64.b64decode(b)), dtype=torch.uint8).view(getattr(torch, dt)).reshape(shape)
                for k, (dt, shape, b) in out["tensors"].items()}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


if __name__ == "__main__":
    for line in sys.stdin:
        print(json.dumps(_decode(line.strip())), flush=True)
