"""The shipped train step compiled for TPUs by the real XLA:TPU + Mosaic compilers (libtpu, no
TPU needed; `aurora_jax/aot.py`), and lowered for CUDA with the real Triton kernel in it.

What this catches that interpret mode cannot: a Pallas call XLA cannot partition over a mesh (the
step's shard_map), kernel blocks past a chip's VMEM (the tiled kernels), kernel settings picked
from the host rather than the platform compiled for. The negative case shows the check bites: the
looped kernels at long rows do not fit VMEM and the compiler says so.
"""

from __future__ import annotations

import os

import pytest

from aurora_jax.aot import child_records, libtpu_available, start_child
from tests.conftest import TPU_CHILD

pytestmark = [pytest.mark.skipif(not libtpu_available() and not os.environ.get("CI"),
                                 reason="libtpu is not installed in .venv/tpu-aot (the install step brings it; "
                                        "under CI this test never skips)"),
              pytest.mark.timeout(900)]  # the fixture's compiles take ~4 minutes on 2 cores (~6 with the long profile)

# (config, topology, chips, mesh, activation dtype): every shipped trainer config, every TPU generation,
# 1 chip, a whole host and a multi-host slice (the step several trainer processes run: `aurora_jax/hosts.py`), data-parallel, FSDP and a model axis, f32 and bf16. The 8B drafts (rows of 2048 + 512
# slots, TTT 5) sit on the hosts they need: with f32 Adam state Llama-3.1-8B's does not fit one 16 GiB
# v5e chip (32.7 GB of temporaries) and fits 8 with FSDP (13.9 GiB each). An 8B compile takes minutes
# on 2 cores, so the rest of the full product (README, `aurora-jax aot-compile`) is not in the suite.
STEP_CELLS = [
    ("configs/demo-trainer.yaml", "v5e:2x4", 1, "dp", "float32"),
    ("configs/demo-trainer.yaml", "v5e:4x4", 16, "fsdp", "bfloat16"),  # a slice of 4 hosts: one trainer process each
    ("configs/demo-trainer.yaml", "v6e:2x4", 8, "fsdp", "bfloat16"),
    ("configs/demo-trainer.yaml", "v6e:2x4", 8, "fsdp-tp2", "bfloat16"),  # lm_head's vocabulary over 2 chips
    ("configs/llama3.1-8b-trainer.yaml", "v5e:2x4", 8, "fsdp", "bfloat16"),
]
# The second 8B draft (the same code at Qwen3-8B's shapes, ~2 minutes) only in the long profile: the
# suite must stay under 15 minutes on 2 cores.
if os.environ.get("AURORA_TEST_PROFILE") == "long":
    STEP_CELLS.append(("configs/qwen3-8b-trainer.yaml", "v6e:2x4", 8, "fsdp", "bfloat16"))
# kernels alone (v5p, and longer rows) at the 8B configs' longest TTT step (N = 2048 + 512 slots over
# 5 * N keys) and at N = 8192: the looped form holds a head's whole K/V in VMEM and cannot compile;
# the tiled form's VMEM does not grow with N.
ATTENTION_CELLS = [
    ("2560,32,8,128,5,float32,v5p:2x2x1,looped", False),
    ("2560,32,8,128,5,float32,v5p:2x2x1,tiled", True),
    ("8192,32,8,128,5,bfloat16,v5e:2x4,looped", False),
    ("8192,32,8,128,5,bfloat16,v5e:2x4,tiled", True),
]


def child_args() -> list[str]:
    args = [x for c in STEP_CELLS for x in ("--cell", ",".join(map(str, c)))]
    return args + [x for c, _ in ATTENTION_CELLS for x in ("--attention", c)]


@pytest.fixture(scope="module")
def compiled(request):
    """One libtpu child compiles every cell (JAX and libtpu start once); records by cell. conftest
    starts it when the session's tests are collected, so its minutes overlap the tests before."""
    child = request.config.stash.get(TPU_CHILD, None) or start_child(child_args())
    records = child_records(child)
    assert len(records) == len(STEP_CELLS) + len(ATTENTION_CELLS)
    for r in records:  # the report: what each compile used (pytest -s shows it)
        print({k: v for k, v in r.items() if k != "error"} | ({"error": r["error"][:200]} if "error" in r else {}))
    return records


@pytest.mark.parametrize("i", range(len(STEP_CELLS)), ids=[f"{c[0].split('/')[-1].removesuffix('-trainer.yaml')}-{c[1]}-{c[2]}{c[3]}-{c[4]}"
                                                            for c in STEP_CELLS])
def test_the_train_step_compiles_for_tpu(compiled, i):
    r = compiled[i]
    assert "error" not in r, r["error"]
    assert r["kernels"] == 3, "the forward, dq and dk/dv kernels are in the compiled step"
    assert r["vmem_bytes"] < 4 * 2**20, "tiled kernels: a few blocks of VMEM, whatever the row length"


def test_the_step_compiles_for_a_slice_of_several_hosts(compiled):
    """v5e:4x4 is 16 chips on 4 hosts: the program each of 4 trainer processes runs over the global mesh."""
    (r,) = [r for c, r in zip(STEP_CELLS, compiled) if c[1] == "v5e:4x4"]
    assert "error" not in r and r["hosts"] == 4 and r["kernels"] == 3, r
    assert all(r["hosts"] == 1 for c, r in zip(STEP_CELLS, compiled) if c[2] == 1)


@pytest.mark.parametrize("j", range(len(ATTENTION_CELLS)), ids=[
    "N{0}-{5}-{6}-{7}".format(*c.split(",")) for c, _ in ATTENTION_CELLS])
def test_long_rows_fit_vmem_only_tiled(compiled, j):
    r, fits = compiled[len(STEP_CELLS) + j], ATTENTION_CELLS[j][1]
    if fits:
        assert "error" not in r, r["error"]
    else:
        assert "vmem" in r.get("error", "").lower(), r


def test_the_train_step_lowers_for_cuda_with_the_triton_kernels():
    """The whole step at the Llama-3.1-8B config's shapes, lowered for CUDA from this CPU host: the
    module holds the Triton kernel calls (one per kernel per TTT step), not the interpreter."""
    from aurora_jax.batching import batch_shapes
    from aurora_jax.config import TrainerConfig
    from aurora_jax.train import MeshConfig, lower_step, make_mesh
    from bridge.config import load_config

    cfg = load_config(TrainerConfig, "configs/llama3.1-8b-trainer.yaml", [])
    D = cfg.objective.ttt_length
    text = lower_step(cfg.model, cfg.objective, cfg.optim, make_mesh(MeshConfig(data=1)), False,
                      batch_shapes(cfg.batch, D, 3 * cfg.model.ht), platform="gpu").as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3 * D
    assert "tpu_custom_call" not in text
