"""One log line per window for a failure that repeats (a trainer that is down, an unreachable
WeightSync): the first occurrence at once, then at most one line per `window_s` saying how many
occurred since, so that a serving host without its trainer does not fill its log."""

from __future__ import annotations

import logging
import threading
import time


class EveryWindow:
    def __init__(self, logger: logging.Logger, window_s: float = 60.0):
        self.log, self.window_s = logger, window_s
        self._last, self._since = -float("inf"), 0
        self._lock = threading.Lock()

    def warning(self, fmt: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.window_s:
                self._since += 1
                return
            more, self._since, self._last = self._since, 0, now
        self.log.warning(fmt + (f" ({more} more since the last such line)" if more else ""), *args)

    def reset(self) -> None:
        """The failure is over: its next occurrence is logged at once."""
        with self._lock:
            self._last, self._since = -float("inf"), 0
