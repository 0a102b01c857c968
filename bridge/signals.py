"""How every long-running command stops: SIGINT or SIGTERM sets one event, which its loop waits on.

In `bridge` because the process entry points of both tiers (trainer, ingest, engine, SGLang
launcher) need it and `bridge` is the one package both import.
"""

from __future__ import annotations

import signal
import threading


def stop_event() -> threading.Event:
    """An event set by SIGINT or SIGTERM (call from the main thread)."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done
