"""Where every benchmark's JSON goes: `<out>/<name>.json`, and a line saying so."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(out: str | Path, name: str, data) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path
