"""`aurora-jax bench learn` on a recorded spool of toy-target traffic: a config that learns scores higher,
and traffic is replayed through the trainer's buffer (a trace used `max_reuse` times is gone)."""

from __future__ import annotations

import json

from aurora_jax.buffer import BufferConfig, ReplayBuffer
from bench.learn import main
from bridge.traces import encode
from tests.test_guard import _toy

CONFIG = """\
limits: {vocab_size: 64}
model: {hidden_size: 32, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 64, vocab_size: 64,
        target_hidden_size: 16}
objective: {ttt_length: 2}
batch: {rows: 4, lengths: [64], branch_slots: [0, 32], topk: 2}
optim: {lr: 3.0e-3, warmup_steps: 2}
mesh: {data: 1}
loop: {traces_per_step: 4, min_traces: 4}
"""


def test_bench_learn_scores_drafts_on_held_out_traffic(tmp_path):
    buf = ReplayBuffer(BufferConfig(spool_dir=str(tmp_path / "spool")))
    for t in _toy(48):
        buf.put(encode(t), t)
    buf.close()
    (tmp_path / "toy.yaml").write_text(CONFIG)
    assert main(["--spool", str(tmp_path / "spool"), "--config", str(tmp_path / "toy.yaml"), "--arms", "base",
                 "optim.lr=1e-9", "buffer.max_reuse=1", "--heldout", "8", "--budget", "4", "--evals", "2",
                 "--out", str(tmp_path)]) == 0
    runs = {r["arm"]: r for r in json.loads((tmp_path / "learn.json").read_text())["runs"]}
    learned, frozen, once = runs["base"], runs["optim.lr=1e-9"], runs["buffer.max_reuse=1"]
    assert learned["steps"] > 20 and len(learned["curve"]) == 3
    assert learned["proxy"] > learned["curve"][0]["proxy"] + 0.5  # the toy successor map is learnable
    assert abs(frozen["proxy"] - frozen["curve"][0]["proxy"]) < 0.05  # no learning rate, no learning
    # 40 training traces, each drawable once: at most 40 steps (a step draws at least one), and the
    # trainer waits for traffic; with 4 uses a trace (the default) it steps more (the old replay ignored the buffer)
    assert once["steps"] <= 40 < learned["steps"] and once["waited_s"] > 0
