"""`bench serve`'s concurrency is a closed loop of clients, not waves that wait for their slowest request."""

from __future__ import annotations

import queue
import threading
import types

from bench.serve import _arm


class GatedEngine:
    """A test double for the engine: request 0 finishes only once request 2 has been submitted. A closed
    loop of two clients gets there (the other client's next prompt is 2); waves of two would wait on
    request 0 before submitting 2, and never finish."""

    def __init__(self):
        self.decoder = types.SimpleNamespace(timing={}, fused_forwards=0, fused_requests=0)
        self.submitted: list[int] = []
        self.third = threading.Event()

    def submit(self, prompt, max_new_tokens, speculative):
        i = prompt[0]
        self.submitted.append(i)
        if i == 2:
            self.third.set()
        events: queue.Queue = queue.Queue()

        def finish():
            if i == 0 and not self.third.wait(timeout=10):
                events.put(dict(output=[], target_forwards=1, seconds=1.0, error="request 2 never came"))
                return
            events.put({"output": [i] * 3, "target_forwards": 2, "seconds": 1.0})

        threading.Thread(target=finish, daemon=True).start()
        return types.SimpleNamespace(events=events)


def test_clients_send_their_next_prompt_without_waiting_for_each_other():
    eng = GatedEngine()
    res = _arm(eng, [[0], [1], [2], [3]], conc=2, max_tokens=3, speculative=True)
    assert eng.third.is_set() and sorted(eng.submitted) == [0, 1, 2, 3]
    assert res["outputs"] == [[0] * 3, [1] * 3, [2] * 3, [3] * 3]  # in prompt order, whatever finished first
    assert res["output_tokens"] == 12 and res["target_forwards_per_token"] == 8 / 12
