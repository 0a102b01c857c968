"""Everything the SGLang adapter relies on exists in the pinned SGLang wheel (checked with ast, no import).

The wheel is fetched once with `pip download --no-deps` into ~/.cache/aurora-jax (SGLang's own code
needs CUDA, so nothing from it is imported). Offline, the test skips, except in CI, where it fails.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from serving.sglang import pinned

CACHE = Path(os.environ.get("AURORA_CACHE", Path.home() / ".cache" / "aurora-jax")) / f"sglang-{pinned.VERSION}"


def _wheel() -> zipfile.ZipFile:
    found = sorted(CACHE.glob(f"sglang-{pinned.VERSION}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(CACHE),
                            "--only-binary=:all:", "--python-version", "3.11", pinned.WHEEL], capture_output=True, text=True, timeout=600)
        found = sorted(CACHE.glob(f"sglang-{pinned.VERSION}-*.whl"))
        if not found:
            msg = f"could not download {pinned.WHEEL}: {r.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
    return zipfile.ZipFile(found[0])


@pytest.fixture(scope="module")
def source():
    wheel = _wheel()
    cache: dict[str, ast.Module] = {}

    def parse(rel: str) -> ast.Module:
        if rel not in cache:
            try:
                cache[rel] = ast.parse(wheel.read(f"sglang/{rel}").decode(), filename=rel)
            except KeyError:
                pytest.fail(f"sglang {pinned.VERSION} has no file sglang/{rel}")
        return cache[rel]
    return parse


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _find(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    cls, _, fn = qualname.rpartition(".")
    scope = _classes(tree).get(cls) if cls else tree
    assert scope is not None, f"class {cls} not found"
    for n in scope.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn:
            return n
    raise AssertionError(f"{qualname} not found")


def _fields(classes: dict[str, ast.ClassDef], name: str) -> dict[str, ast.AnnAssign]:
    """Annotated fields of a class and of its bases defined in the same file."""
    out: dict[str, ast.AnnAssign] = {}
    cls = classes[name]
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out.update(_fields(classes, base.id))
    out.update({n.target.id: n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)})
    return out


def test_http_routes_exist_with_their_request_models(source):
    tree = source("srt/entrypoints/http_server.py")
    routes = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in fn.decorator_list:
            if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.args
                    and isinstance(dec.args[0], ast.Constant) and dec.func.attr in ("get", "post", "api_route")):
                routes.setdefault(dec.args[0].value, []).append((dec.func.attr.upper(), ast.unparse(fn.args)))
    for path, (method, model) in pinned.ROUTES.items():
        assert path in routes, f"route {path} missing from sglang {pinned.VERSION}"
        methods = [m for m, _ in routes[path]]
        assert method in methods or "API_ROUTE" in methods, (path, methods)
        if model:
            assert any(model in args for _, args in routes[path]), f"{path} no longer takes {model}"


def test_request_and_object_fields_exist(source):
    for cls, (rel, fields) in pinned.FIELDS.items():
        classes = _classes(source(rel))
        assert cls in classes, f"{cls} missing from {rel}"
        have = _fields(classes, cls)
        for f in fields:
            assert f in have, f"{cls}.{f} missing from sglang {pinned.VERSION} ({rel})"
    io = _classes(source("srt/managers/io_struct.py"))
    for cls in ("BeginWeightUpdateReqInput", "UpdateWeightsFromTensorReqInput"):
        literal = ast.unparse(_fields(io, cls)["selector"].annotation)
        for v in pinned.SELECTOR_VALUES:
            assert repr(v) in literal, (cls, literal)
    assert repr(pinned.PAUSE_MODE) in ast.unparse(_fields(io, "PauseGenerationReqInput")["mode"].annotation)


def test_payload_globals_are_in_the_unpickling_allow_list(source):
    """Every global the test fake admits (our payloads' and torch's reductions') is one SGLang's
    SafeUnpickler admits: the fake cannot accept a payload SGLang would block."""
    cls = _classes(source("srt/utils/common.py"))["SafeUnpickler"]
    allowed = next(ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", "") == "ALLOWED_GLOBALS" for t in n.targets))
    assert len(allowed) > 50
    missing = [g for g in pinned.UNPICKLE_ALLOWED if g not in allowed]
    assert not missing, f"not in sglang {pinned.VERSION}'s SafeUnpickler.ALLOWED_GLOBALS: {missing}"


def test_launch_flags_exist(source):
    source(pinned.LAUNCH_MODULE)
    for field, rel in pinned.SERVER_ARGS.items():
        declared = {n.target.id for c in _classes(source(rel)).values() for n in c.body
                    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        assert field in declared, f"server arg {field} (--{field.replace('_', '-')}) not in {rel}"


def test_symbols_and_signatures_exist(source):
    for rel, qualname, params in pinned.SYMBOLS:
        fn = _find(source(rel), qualname)
        names = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
        for p in params:
            assert p in names, f"{rel}:{qualname} lost parameter {p} (has {names})"


def test_source_facts_still_hold(source):
    for rel, qualname, needle in pinned.SOURCE_FACTS:
        body = ast.unparse(_find(source(rel), qualname) if qualname else source(rel))
        assert needle in body, f"{rel}:{qualname} no longer mentions {needle!r}: recheck the adapter"


def test_checker_rejects_what_is_not_there(source):
    """The checks above can fail: a made-up field, symbol and route are reported missing."""
    classes = _classes(source("srt/managers/io_struct.py"))
    assert "no_such_field" not in _fields(classes, "UpdateWeightsFromTensorReqInput")
    with pytest.raises(AssertionError):
        _find(source("srt/models/llama_eagle3.py"), "LlamaForCausalLMEagle3.no_such_method")
