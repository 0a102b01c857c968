"""The workload driver's stream shapes."""

from __future__ import annotations

import json

import pytest

from apps.load import LoadConfig, schedule


@pytest.fixture
def prompts(tmp_path):
    for d in ("code", "prose"):
        (tmp_path / f"{d}.jsonl").write_text("".join(json.dumps(dict(domain=d, prompt=f"{d} {i}")) + "\n"
                                                      for i in range(5)))
    return tmp_path


def test_stream_shapes(prompts):
    doms = lambda **kw: [r["domain"] for r in schedule(LoadConfig(prompts=str(prompts), requests=12, **kw))]
    assert doms(shape="ordered") == ["code"] * 6 + ["prose"] * 6
    assert doms(shape="shift", shift_at=9) == ["code"] * 9 + ["prose"] * 3
    mixed = doms(shape="mixed", seed=1)
    assert set(mixed) == {"code", "prose"} and mixed != sorted(mixed)
    rs = schedule(LoadConfig(prompts=str(prompts), requests=12, shape="ordered"))
    assert len({r["prompt"] for r in rs if r["domain"] == "code"}) == 5  # prompts cycle when the pool is short
    with pytest.raises(FileNotFoundError, match="no prompts for domain 'math'"):
        schedule(LoadConfig(prompts=str(prompts), domains=["math"]))
    with pytest.raises(ValueError, match="shape must be"):
        LoadConfig(shape="zigzag")
