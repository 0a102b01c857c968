"""`aurora-jax bench attention`: the Pallas tree-attention kernel vs the jnp reference.

For growing packed-row lengths N (random trunks + trees, as the TTT loss sees them), in one run:
forward and forward+backward time of each, peak temporary memory of the compiled program (XLA's
memory analysis: what the [N, N] scores and mask of the reference cost), the largest difference
between the two, and achieved TFLOP/s counting only visible (query, key) pairs, against the
device's own measured matmul rate in the same dtype. On CPU the kernel runs in interpret mode,
which checks it but says nothing about its speed: run this on a GPU or TPU for timings.

`--compile-only TOPOLOGY` (e.g. v5e:2x4) needs no device: it compiles the kernels (forward +
backward, the TTT loss's longest step: N queries over depth*N keys) for one chip of that TPU with
libtpu (`aurora_jax.aot`), looped and tiled, and reports each one's VMEM and HBM temporaries, or
the compiler's error (a looped kernel past VMEM fails to compile; the tiled one does not).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.report import write_json


def _time(f, *args, repeats: int) -> float:
    import jax
    jax.block_until_ready(f(*args))  # compile + warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _temp_bytes(f, *args) -> int:
    try:
        return int(f.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # some backends have no memory analysis
        return -1


def matmul_rate(dtype, n: int, repeats: int) -> float:
    """Measured dense matmul TFLOP/s of this device in `dtype` (the yardstick for the kernel)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / _time(f, a, repeats=repeats) / 1e12


def main(argv: list[str] | None = None) -> int:
    import jax
    gpu = jax.default_backend() != "cpu"
    p = argparse.ArgumentParser(prog="aurora-jax bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,2048,4096,8192" if gpu else "128,256,512",
                   help="packed row lengths N (comma separated)")
    p.add_argument("--batch", type=int, default=4 if gpu else 2)
    p.add_argument("--heads", type=int, default=32 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    p.add_argument("--head-dim", type=int, default=128 if gpu else 32)
    p.add_argument("--depth", type=int, default=5, help="ancestor list length (TTT steps)")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["bfloat16", "float32"])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10 if gpu else 3)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--compile-only", default="", metavar="TOPOLOGY", help="compile for a TPU topology, no device")
    a = p.parse_args(argv)
    if a.compile_only:
        return _compile_only(a, argv)

    import jax.numpy as jnp
    import numpy as np

    from aurora_jax.pallas_attention import tree_attention_pallas
    from aurora_jax.random_trees import random_meta
    from aurora_jax.tree_attention import tree_attention, tree_mask

    dtype = jnp.dtype(a.dtype)
    rate = matmul_rate(dtype, 8192 if gpu else 1024, a.repeats)
    rng = np.random.default_rng(0)
    rows = []
    print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), {a.dtype}, B={a.batch} heads={a.heads}/"
          f"{a.kv_heads} hd={a.head_dim} block={a.block}; measured matmul {rate:.1f} TFLOP/s"
          + ("" if gpu else "; kernel in interpret mode (correctness only, not speed)") + "\n")
    head = (f"{'N':>6} {'visible':>8} {'path':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'temp MiB':>9} "
            f"{'TFLOP/s':>8} {'of matmul':>9} {'max |diff|':>10}")
    print(head + "\n" + "-" * len(head))
    for n in (int(s) for s in a.sizes.split(",")):
        meta = random_meta(rng, a.batch, n, a.depth, max_trunk=n // 2, max_tree=n // 4)  # a few requests per row
        visible = int(np.asarray(tree_mask(meta, meta)).sum())
        shape_q, shape_kv = (a.batch, n, a.heads, a.head_dim), (a.batch, n, a.kv_heads, a.head_dim)
        q = jnp.asarray(rng.standard_normal(shape_q), dtype)
        k, v = (jnp.asarray(rng.standard_normal(shape_kv), dtype) for _ in range(2))
        kern = lambda q, k, v: tree_attention_pallas(q, k, v, meta, meta, block_q=a.block, block_k=a.block)  # noqa
        ref = lambda q, k, v: tree_attention(q, k, v, meta, meta)  # noqa: E731
        outs = {}
        for name, f in (("reference", ref), ("pallas", kern)):
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
            t_f, t_b = _time(fwd, q, k, v, repeats=a.repeats), _time(grad, q, k, v, repeats=a.repeats)
            outs[name] = np.asarray(fwd(q, k, v), np.float32)
            flops = 14 * visible * a.head_dim * a.heads  # fwd 2 matmuls, bwd 5 (incl. recomputed scores)
            rows.append(dict(n=n, visible_pairs=visible, path=name, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_b * 1e3,
                             temp_bytes=max(_temp_bytes(fwd, q, k, v), _temp_bytes(grad, q, k, v)),
                             tflops=flops / t_b / 1e12, matmul_tflops=rate))
        diff = float(np.abs(outs["pallas"] - outs["reference"]).max())
        for r in rows[-2:]:
            r["max_abs_diff"] = diff
            print(f"{n:6d} {visible / (a.batch * n * n):8.1%} {r['path']:>9} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} "
                  f"{r['temp_bytes'] / 2**20:9.1f} {r['tflops']:8.3f} {r['tflops'] / rate:9.1%} {diff:10.2e}")
        ref_row, ker_row = rows[-2], rows[-1]
        print(f"{'':6} {'':8} {'ratio':>9} {ref_row['fwd_ms'] / ker_row['fwd_ms']:8.2f}x "
              f"{ref_row['fwd_bwd_ms'] / ker_row['fwd_bwd_ms']:10.2f}x "
              f"{ref_row['temp_bytes'] / max(ker_row['temp_bytes'], 1):8.1f}x   (reference / kernel)")
    print("\nvisible = share of (query, key) pairs the tree mask allows; TFLOP/s counts only those "
          "(forward + backward).")
    write_json(a.out, "attention", dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                                        args=vars(a), rows=rows))
    return 0


def _compile_only(a, argv) -> int:
    from aurora_jax.aot import run_child

    sizes = a.sizes if "--sizes" in (argv or []) else "1024,2048,4096,8192,16384,32768"
    heads, kv, hd = (a.heads, a.kv_heads, a.head_dim) if "--heads" in (argv or []) else (32, 8, 128)
    dtype = a.dtype if "--dtype" in (argv or []) else "bfloat16"
    cells = [f"{n},{heads},{kv},{hd},{a.depth},{dtype},{a.compile_only},{mode}"
             for n in sizes.split(",") for mode in ("looped", "tiled")]
    rows = run_child([x for c in cells for x in ("--attention", c)])
    print(f"\ntree-attention kernels compiled for one {a.compile_only} chip (libtpu, no device): forward + backward "
          f"of N queries over {a.depth}*N keys, {heads}/{kv} heads, hd {hd}, {dtype}\n")
    head = f"{'N':>6} {'keys':>7} {'kernels':>7} {'VMEM MiB':>9} {'HBM temp MiB':>13}  result"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ok = "error" not in r
        print(f"{r['n']:6d} {r['depth'] * r['n']:7d} {r['mode']:>7} "
              + (f"{r['vmem_bytes'] / 2**20:9.2f} {r['hbm_temp_bytes'] / 2**20:13.1f}  compiled" if ok else
                 f"{'':9} {'':13}  {r['error'][:90]}"))
    print("\nVMEM: the kernel's block buffers (double-buffered) and scratch, from its block specs.")
    write_json(a.out, "attention-compile", dict(topology=a.compile_only, rows=rows))
    return 0 if all("error" not in r for r in rows if r["mode"] == "tiled") else 1
