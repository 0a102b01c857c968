"""`aurora-jax count-tokens`: target-token frequencies [V] of a local prompt corpus (.npy).

A day-0 draft served by SGLang needs its pruned vocabulary (d2t/t2d) before any trace exists,
because SGLang fixes it at load. Counting the workload's own prompts with the target's tokenizer
is the nearest local stand-in for traffic; `aurora-jax init-draft loop.vocab_counts=OUT` uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def count_prompt_tokens(tokenizer_path: str, files: list[Path], vocab_size: int = 0, split: str = "all") -> np.ndarray:
    """Token counts [V] over the `prompt`s of the given .jsonl files (V: the target's vocab_size);
    `split`: only records of that split (a record without one is "train"), or "all"."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    if not vocab_size:
        try:
            vocab_size = AutoConfig.from_pretrained(tokenizer_path, local_files_only=True).vocab_size
        except (OSError, ValueError):
            vocab_size = len(tok)
    counts = np.zeros(vocab_size, np.int64)
    for f in files:
        for n, line in enumerate(Path(f).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt = record["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{f}:{n}: expected a JSON object with a 'prompt' string") from None
            if split != "all" and record.get("split", "train") != split:
                continue
            ids = np.asarray(tok(prompt, add_special_tokens=False)["input_ids"], np.int64)
            if ids.size and ids.max() >= vocab_size:
                raise ValueError(f"{f}:{n}: token id {ids.max()} >= vocab_size {vocab_size}")
            counts += np.bincount(ids, minlength=vocab_size)
    return counts
