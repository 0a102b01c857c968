"""Served utility per draft version: what the trainer learns from the traces about how each version served."""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np

from aurora_jax.served import ServedUtility
from tests.conftest import make_trace


def _served(version: int, output: int, forwards: int, seconds: float = 2.0, i: int = 0):
    t = make_trace(i, num_tokens=40, prompt_len=40 - output)
    return dataclasses.replace(t, draft_version=version, target_forwards=forwards, start_unix_s=10.0,
                               end_unix_s=10.0 + seconds)


def test_acceptance_per_version_by_hand():
    s = ServedUtility(window=2)
    for i, (v, out, fw) in enumerate([(1, 10, 10), (1, 12, 8), (2, 20, 10), (1, 9, 3), (2, 6, 6)]):
        s.add(_served(v, out, fw, i=i))
    s.add(_served(2, 5, 0, i=9))  # no forward count: says nothing about acceptance
    s.published(2, 1.7)
    snap = s.snapshot()
    assert snap[1]["requests"] == 3 and snap[2]["requests"] == 2
    np.testing.assert_allclose(snap[1]["accept_length"], (10 + 12 + 9) / (10 + 8 + 3))
    np.testing.assert_allclose(snap[1]["accept_length_recent"], (12 + 9) / (8 + 3))  # its last 2
    np.testing.assert_allclose(snap[2]["accept_length"], 26 / 16)
    np.testing.assert_allclose(snap[2]["request_throughput"], 80 / 4.0)  # 2 requests of 40 tokens, 2 s each
    assert snap[2]["proxy_accept_length"] == 1.7 and snap[1]["proxy_accept_length"] is None


def test_the_trainer_reports_served_acceptance_per_version(tmp_path):
    from tests.test_train_loop import _cfg, _push, _traces

    cfg = _cfg(tmp_path, max_steps=4, sync_every=2, traces_per_step=4, metrics_address="127.0.0.1:0")
    from aurora_jax.loop import Trainer
    trainer = Trainer(cfg)
    try:
        traces = _traces(16)
        for k, t in enumerate(traces):  # as served by versions 0 and 1, 2 and 1.5 tokens per forward
            n = int(t.tokens.shape[0] - t.prompt_len)
            traces[k] = dataclasses.replace(t, draft_version=k % 2, target_forwards=max(1, int(n / (2.0 - 0.5 * (k % 2)))))
        _push(trainer.start(), traces)
        trainer.run()
        text = httpx.get(f"http://127.0.0.1:{trainer.prometheus.server_port}/metrics", timeout=10).text
    finally:
        trainer.close()
    want = {v: sum(int(t.tokens.shape[0] - t.prompt_len) for t in traces if t.draft_version == v) /
            sum(t.target_forwards for t in traces if t.draft_version == v) for v in (0, 1)}
    for v, al in want.items():
        line = next(x for x in text.splitlines() if x.startswith(f'aurora_trainer_served_accept_length{{version="{v}"}}'))
        np.testing.assert_allclose(float(line.split()[-1]), al, rtol=1e-9)
    assert 'aurora_trainer_served_requests_total{version="0"} 8.0' in text
    assert "aurora_trainer_step 4.0" in text and 'aurora_trainer_proxy_accept_length{version="2"}' in text
    rows = [__import__("json").loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("served" in r for r in rows) and rows[-1]["served"]["1"]["requests"] == 8
