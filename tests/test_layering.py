"""The layers stay apart: the trainer never imports torch, the serving tier or the apps; serving never
imports JAX; the bridge neither (except its one torch adapter); benchmarks import no app code. Only
`apps` (CLI, demo, load driver, token counting, the flywheel benchmark) drives both tiers. Checked
in fresh interpreters."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import aurora_jax
import bench
import bridge
import serving


def _modules(pkg) -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if ".proto" not in m.name)


def _imports(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


@pytest.mark.parametrize("pkg,forbidden", [
    (aurora_jax, {"torch", "serving", "bench", "apps"}),
    (serving, {"jax", "flax", "aurora_jax", "bench", "apps"}),
    (bridge, {"jax", "flax", "torch", "aurora_jax", "serving", "bench", "apps"}),
    (bench, {"apps"}),
])
def test_a_tier_imports_nothing_of_the_others(pkg, forbidden):
    mods = [m for m in _modules(pkg) if m != "bridge.torch_io"]  # bridge's one torch adapter
    leaked = forbidden & _imports(mods)
    assert not leaked, f"importing {pkg.__name__} pulls in {sorted(leaked)}"
    if pkg is bridge:
        assert "jax" not in _imports(["bridge.torch_io"])


def test_configs_read_by_apps_import_no_torch():
    """The demo and the CLI read serving configs typed; reading one must not pull torch in."""
    assert "torch" not in _imports(["serving.sglang.config", "serving.weight_sync", "serving.trace_client"])


def test_the_check_sees_what_a_module_imports():
    assert {"torch", "bridge"} <= _imports(["serving.engine"]) and "jax" in _imports(["aurora_jax.model"])
