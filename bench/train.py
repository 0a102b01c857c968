"""`aurora-jax bench train`: optimizer step time and tree tokens/s of the draft trainer.

Synthetic traces with serving-like shapes (trunk of T tokens, one verification tree every few
tokens, rejected branches carrying target top-k) are packed into bucketed batches and fed to the
real jitted, sharded train step (no gRPC: `bench ingest` measures that). Trace lengths vary so
that bucketing is exercised; the table reports how many distinct shapes were compiled. Tree
tokens are the non-padding slots of a batch (trunk + TTT chains + rejected nodes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.report import write_json

CONFIGS = {
    # name: (draft config, tokens per trace, batch rows)
    "small": (dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
                   vocab_size=8192, draft_vocab_size=0), 256, 4),
    "medium": (dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1376,
                    vocab_size=16384, draft_vocab_size=8192), 256, 4),
    # SmolLM2-135M's draft (the real demo target): derived shapes, pruned vocabularies
    "smollm2": (dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     intermediate_size=1536, vocab_size=49152, draft_vocab_size=8192), 256, 4),
    "smollm2-vd4k": (dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          intermediate_size=1536, vocab_size=49152, draft_vocab_size=4096), 256, 4),
}


def run_config(name: str, steps: int, ttt: int, seed: int = 0) -> dict:
    import jax
    from flax import nnx

    from aurora_jax.batching import BatchConfig, pack
    from aurora_jax.model import DraftConfig, Eagle3Draft, target_to_draft
    from aurora_jax.objective import ObjectiveConfig
    from aurora_jax.train import Learner, MeshConfig, OptimConfig, make_mesh
    from bridge.synthetic import random_trace

    mcfg, T, rows = CONFIGS[name]
    cfg = DraftConfig(**mcfg)
    model = Eagle3Draft(cfg, rngs=nnx.Rngs(seed))
    learner = Learner(model, ObjectiveConfig(ttt_length=ttt), OptimConfig(), make_mesh(MeshConfig(data=1)))
    bc = BatchConfig(rows=rows, lengths=[T // 2, T], branch_slots=[0, 32, 128], topk=8, pack=True)
    to_draft = target_to_draft(np.asarray(model.d2t[...]), cfg.vocab_size)
    rng = np.random.default_rng(seed)

    def batch():
        traces = []
        for i in range(rows):
            n = int(rng.integers(T // 4, T + 1))
            traces.append(random_trace(rng, request_id=f"{i}", num_tokens=n, prompt_len=n // 8, hidden=cfg.ht,
                                       vocab=cfg.vocab_size, topk=8, num_steps=max(1, n // 16), tree_nodes=8))
        return pack(traces, bc, ttt, to_draft)[0]

    batches = [batch() for _ in range(steps)]
    t0 = time.perf_counter()
    for b in {tuple(a.shape for a in b): b for b in batches}.values():  # compile every shape that occurs, untimed
        jax.block_until_ready(learner.train_step(b))
    compile_s = time.perf_counter() - t0
    times, tokens = [], []
    for b in batches:
        t0 = time.perf_counter()
        m = jax.block_until_ready(learner.train_step(b))
        dt = time.perf_counter() - t0
        times.append(dt)
        tokens.append(float(m["tree_tokens"]))
        slots = b.tokens.size
    params = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(learner.state.params))
    return dict(config=name, params=params, tokens_per_trace=T, rows=rows, ttt_length=ttt, steps=len(times),
                step_s_median=float(np.median(times)), step_s_min=float(np.min(times)),
                tree_tokens_per_step=float(np.mean(tokens)),
                tree_tokens_per_s=float(np.sum(tokens) / np.sum(times)),
                slot_utilisation=float(np.mean(tokens) / slots), compiled_shapes=learner.compiled_shapes,
                warmup_s=compile_s, devices=len(learner.mesh.devices.flat), backend=jax.default_backend())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,medium", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--steps", type=int, default=6, help="timed steps per config (after one warm-up step per batch shape)")
    p.add_argument("--ttt", type=int, default=5, help="TTT depth")
    p.add_argument("--out", default="runs/bench", help="folder for train.json")
    a = p.parse_args(argv)
    rows = []
    for name in a.configs.split(","):
        print(f"{name}: warming up (compiling) ...", flush=True)
        rows.append(run_config(name, a.steps, a.ttt))
    print(f"\nbackend {rows[0]['backend']}, {rows[0]['devices']} device(s), TTT depth {a.ttt}, "
          f"median of {a.steps} steps after warm-up\n")
    head = f"{'config':8} {'params':>9} {'rows x T':>9} {'step s':>8} {'tree tok/step':>14} {'tree tok/s':>11} " \
           f"{'slot use':>9} {'shapes':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:8} {r['params'] / 1e6:8.1f}M {r['rows']:>4} x {r['tokens_per_trace']:<3} "
              f"{r['step_s_median']:8.3f} {r['tree_tokens_per_step']:14.0f} {r['tree_tokens_per_s']:11.0f} "
              f"{r['slot_utilisation']:9.0%} {r['compiled_shapes']:7d}")
    write_json(a.out, "train", rows)
    return 0
