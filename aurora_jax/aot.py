"""Ahead-of-time compiles of the train step for TPUs this host does not have.

Why: the trainer is meant for TPU slices, and what breaks there (a Pallas call XLA cannot partition,
a kernel block past VMEM) breaks at compile time, not at run time. JAX compiles for a TPU topology
without the chips (`jax.experimental.topologies`), with the `libtpu` wheel doing the real XLA:TPU
and Mosaic work; so a CPU machine (CI) can compile the exact step a TPU host would run, at a
trainer config's shapes, for 1 chip or a whole host, data-parallel or FSDP.

libtpu is kept off the normal import path (it makes every `import jax` probe for TPUs): the install
step puts it in `.venv/tpu-aot`, and this module runs there as a child process (`aurora-jax
aot-compile`, `bench attention --compile-only`, the tests), with TPU metadata lookups off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBTPU_DIR = ROOT / ".venv" / "tpu-aot"  # `pip install --target` of the pinned libtpu (Makefile)
TOPOLOGIES = ("v5e:2x4", "v5p:2x2x1", "v6e:2x4")  # one host of each generation


def libtpu_requirement() -> str:
    """The libtpu this JAX was released with (its own `tpu` extra pins it), e.g. 'libtpu==0.0.42.*'."""
    from importlib.metadata import requires
    for r in requires("jax") or []:
        req, _, marker = r.partition(";")
        if req.strip().startswith("libtpu") and "tpu" in marker:
            return req.strip()
    raise LookupError("this JAX names no libtpu in its tpu extra")


def libtpu_available() -> bool:
    return (LIBTPU_DIR / "libtpu" / "libtpu.so").exists()


def child_env() -> dict:
    """A compile-only TPU process: libtpu importable, no metadata-server lookups (they would leave
    this machine), the host CPU as JAX's default backend, and no persistent compilation cache (each
    compile is the evidence: it must run)."""
    path = os.pathsep.join(p for p in (str(LIBTPU_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return {**env, "PYTHONPATH": path, "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def start_child(args: list[str]) -> subprocess.Popen:
    """Start `python -m aurora_jax.aot ARGS --json` with libtpu; `child_records` collects it."""
    if not libtpu_available():
        raise FileNotFoundError(f"libtpu is not installed at {LIBTPU_DIR} (the install step, `make .venv/.installed`, "
                                f"puts it there)")
    # Output to files, not pipes: a child started early is read only at the end, and must never block on a full pipe.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    child = subprocess.Popen([sys.executable, "-m", "aurora_jax.aot", *args, "--json"], env=child_env(), cwd=ROOT,
                             stdout=out, stderr=err, text=True)
    child.outputs = (out, err)
    return child


def child_records(child: subprocess.Popen, timeout: float = 1800) -> list[dict]:
    """One record per compile (errors included)."""
    child.wait(timeout=timeout)
    stdout, stderr = (f.seek(0) or f.read() for f in child.outputs)
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if not records:
        raise RuntimeError(f"aot child produced nothing (exit {child.returncode}):\n{stderr[-4000:]}")
    return records


def run_child(args: list[str], timeout: float = 1800) -> list[dict]:
    return child_records(start_child(args), timeout)


def _mesh(topology: str, devices: int, model: int = 1):
    from jax.experimental import topologies

    from aurora_jax.train import mesh_of

    topo = topologies.get_topology_desc(topology, "tpu")
    if devices > len(topo.devices):
        raise ValueError(f"{topology} has {len(topo.devices)} devices, asked for {devices}")
    return mesh_of(topo.devices[:devices], devices // model, model)


def mesh_kind(label: str) -> tuple[bool, int]:
    """A cell's mesh: dp (data parallel), fsdp (parameters sharded over data too), and with -tpN
    (e.g. fsdp-tp2) N devices on the model axis (lm_head's vocabulary split over them)."""
    kind, _, tp = label.partition("-tp")
    if kind not in ("dp", "fsdp") or (tp and not tp.isdigit()):
        raise ValueError(f"mesh {label!r}: expected dp or fsdp, optionally -tpN")
    return kind == "fsdp", int(tp or 1)


def compile_step_cell(config: str, topology: str, devices: int, mesh: str = "dp", dtype: str = "",
                      overrides=()) -> dict:
    """Compile one trainer config's step at its largest length and branch buckets for `devices` chips
    of `topology` (rows rounded up to a multiple of the data axis). Raises what XLA or Mosaic raise."""
    from aurora_jax.batching import batch_shapes
    from aurora_jax.config import TrainerConfig
    from aurora_jax.pallas_attention import attention_vmem_bytes
    from aurora_jax.train import lower_step
    from bridge.config import load_config

    cfg = load_config(TrainerConfig, config, list(overrides))
    model = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype)
    fsdp, tp = mesh_kind(mesh)
    data = devices // tp
    rows = -(-cfg.batch.rows // data) * data
    D = cfg.objective.ttt_length
    batch = batch_shapes(dataclasses.replace(cfg.batch, rows=rows), D, 3 * model.ht)
    t0 = time.perf_counter()
    mesh_ = _mesh(topology, devices, tp)
    compiled = lower_step(model, cfg.objective, cfg.optim, mesh_, fsdp, batch).compile()
    mem = compiled.memory_analysis()
    N = batch.tokens.shape[-1]
    return dict(rows=rows, slots=N, ttt=D, dtype=model.dtype, compile_s=round(time.perf_counter() - t0, 1),
                hosts=len({d.process_index for d in mesh_.devices.flat}),  # the trainer processes it spans
                kernels=sum(compiled.as_text().count(f"tree_attention_{k}") > 0 for k in ("fwd", "dq", "dkv")),
                hbm_bytes=int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                              - mem.alias_size_in_bytes),
                vmem_bytes=attention_vmem_bytes(N, D * N, model.hd, model.dtype, D, "tpu"))


def compile_attention_cell(n: int, heads: int, kv_heads: int, hd: int, depth: int, dtype: str, topology: str,
                           tiled: bool, batch: int = 1) -> dict:
    """Compile the kernels alone (forward + backward, the TTT loss's last and longest step: n queries
    over depth * n keys) for one chip of `topology`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from aurora_jax.pallas_attention import attention_vmem_bytes, tree_attention_pallas
    from aurora_jax.tree_attention import TreeMeta

    one = NamedSharding(_mesh(topology, 1), P())
    shape = lambda *s, dt=jnp.int32: jax.ShapeDtypeStruct(s, dt, sharding=one)  # noqa: E731
    nk = depth * n
    meta = lambda m: TreeMeta(shape(batch, m), shape(batch, m), shape(batch, m), shape(batch, m, depth))  # noqa
    f = lambda q, k, v, qm, km: jnp.sum(tree_attention_pallas(q, k, v, qm, km, platform="tpu",  # noqa: E731
                                                              tiled=tiled).astype(jnp.float32))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(
        shape(batch, n, heads, hd, dt=dtype), shape(batch, nk, kv_heads, hd, dt=dtype),
        shape(batch, nk, kv_heads, hd, dt=dtype), meta(n), meta(nk)).compile()
    return dict(compile_s=round(time.perf_counter() - t0, 1), hbm_temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
                vmem_bytes=attention_vmem_bytes(n, nk, hd, dtype, depth, "tpu", tiled=tiled))


def _record(kind: str, fields: dict, run) -> dict:
    try:
        return dict(kind=kind, **fields, **run())
    except Exception as e:  # every cell of a matrix is reported; the caller decides what must pass
        return dict(kind=kind, **fields, error=f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax aot-compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="trainer YAML (repeat for several)")
    p.add_argument("--topology", action="append", default=[],
                   help=f"TPU topology, e.g. v5e:2x4 (repeat; default: {', '.join(TOPOLOGIES)})")
    p.add_argument("--devices", default="1,8", help="chips of the topology, comma-separated")
    p.add_argument("--mesh", default="dp,fsdp", help="dp and/or fsdp, each optionally -tpN (N chips on the model "
                                                    "axis), for more than one chip")
    p.add_argument("--dtype", default="", help="activation dtype (default: each config's model.dtype)")
    p.add_argument("--cell", action="append", default=[],
                   help="one step compile CONFIG,TOPOLOGY,DEVICES,MESH[,DTYPE] (MESH: dp|fsdp[-tpN]; instead of "
                        "the product above)")
    p.add_argument("--attention", action="append", default=[],
                   help="kernels alone: N,HEADS,KV_HEADS,HEAD_DIM,DEPTH,DTYPE,TOPOLOGY,tiled|looped")
    p.add_argument("--json", action="store_true", help="one JSON record per compile on stdout")
    p.add_argument("--libtpu-requirement", action="store_true", help="print the libtpu pin for this JAX and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides")
    a = p.parse_args(argv)
    if a.libtpu_requirement:  # the install step: pip install --target .venv/tpu-aot "$(... --libtpu-requirement)"
        print(libtpu_requirement())
        return 0
    cells = [c.split(",") for c in a.cell] + [
        [config, topology, n, mesh, a.dtype] for config in a.config for topology in (a.topology or TOPOLOGIES)
        for n in a.devices.split(",") for mesh in (["dp"] if n == "1" else a.mesh.split(","))]
    records = []
    for config, topology, n, mesh, *dtype in cells:
        fields = dict(config=config, topology=topology, devices=int(n), mesh=mesh)
        r = _record("step", fields, lambda: compile_step_cell(config, topology, int(n), mesh,
                                                              (dtype or [""])[0], a.overrides))
        records.append(r)
        print(json.dumps(r) if a.json else
              f"{config:34} {topology:10} {n:>2} {mesh:4} " + (f"ERROR {r['error']}" if "error" in r else
                                                              f"{r['dtype']:8} slots {r['slots']:5d}  compiled in "
                                                              f"{r['compile_s']:5.1f}s  HBM {r['hbm_bytes'] / 2**30:6.2f} GiB"
                                                              f"  kernel VMEM {r['vmem_bytes'] / 2**20:6.2f} MiB"),
              flush=True)
    for spec in a.attention:
        n, heads, kv, hd, depth, dtype, topology, mode = spec.split(",")
        fields = dict(n=int(n), heads=int(heads), kv_heads=int(kv), head_dim=int(hd), depth=int(depth), dtype=dtype,
                      topology=topology, mode=mode)
        r = _record("attention", fields, lambda: compile_attention_cell(int(n), int(heads), int(kv), int(hd),
                                                                        int(depth), dtype, topology, mode == "tiled"))
        records.append(r)
        print(json.dumps(r) if a.json else
              f"N {n:>6} {dtype:8} {topology:10} {mode:6} " + (f"ERROR {r['error'][:160]}" if "error" in r else
                                                               f"VMEM {r['vmem_bytes'] / 2**20:7.2f} MiB  HBM temp "
                                                               f"{r['hbm_temp_bytes'] / 2**20:8.1f} MiB"), flush=True)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
