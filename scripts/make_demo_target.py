"""Make the demo target: a small Llama-style causal LM + BPE tokenizer, trained on text every
Python installation has, and the demo's prompt sets. The output is shipped in the repo so that
nothing is downloaded at run time; this script is how it was made.

Domains (held-out files / topics feed the prompts, the rest trains the model):
  code   the standard library's top-level modules (Lib/*.py)
  prose  the pydoc topic texts (pydoc_data.topics): the language reference in English

Exact command (CPU, ~6 minutes on 2 cores; the result depends on the Python version's stdlib):
  .venv/bin/python scripts/make_demo_target.py --out models/demo-target --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

EOS = "<|endoftext|>"


def corpus():
    import pydoc_data.topics as topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in sorted(lib.glob("*.py"))]
    prose = sorted(topics.topics.items())
    split = lambda docs: ([d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0])
    return dict(code=split(code), prose=split(prose))


def prompts(domain: str, docs, n: int, rng: random.Random) -> list[dict]:
    out = []
    for name, text in docs:
        if domain == "code":
            lines = text.splitlines()
            starts = [i for i, l in enumerate(lines) if re.match(r"\s*(def|class) \w+", l)]
            picks = [("\n".join(lines[i:i + 3]) + "\n") for i in starts]
        else:
            paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
            picks = [" ".join(p.split()[:24]) for p in paras]
        for p in picks:
            if 20 <= len(p) <= 300:
                out.append(dict(domain=domain, source=name, prompt=p))
    rng.shuffle(out)
    return out[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/demo-target")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)  # what made the shipped target (MADE_BY.json)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = corpus()
    train_docs = [t for dom in ("code", "prose") for _, t in data[dom][0]]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_docs, trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=[EOS],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out)
    eos = fast.eos_token_id

    # the two domains interleaved document by document, prose upsampled to ~1/4 of the tokens
    ids = {dom: [fast(t)["input_ids"] + [eos] for _, t in data[dom][0]] for dom in ("code", "prose")}
    n_code, n_prose = (sum(map(len, ids[d])) for d in ("code", "prose"))
    reps = max(1, round(n_code / 3 / max(n_prose, 1)))
    docs = ids["code"] + ids["prose"] * reps
    rng.shuffle(docs)
    stream = np.fromiter((t for d in docs for t in d), np.int64)
    print(f"tokens: code {n_code}, prose {n_prose} (x{reps}); stream {stream.size}", flush=True)

    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64 + 64,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = LlamaForCausalLM(cfg)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    for step in range(a.steps):
        starts = np.random.default_rng(a.seed + step).integers(0, stream.size - a.seq - 1, a.batch)
        x = torch.from_numpy(np.stack([stream[s:s + a.seq + 1] for s in starts]))
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)

    held = {dom: prompts(dom, data[dom][1], 200, rng) for dom in ("code", "prose")}
    (out / "prompts").mkdir(exist_ok=True)
    for dom, rows in held.items():
        (out / "prompts" / f"{dom}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "MADE_BY.json").write_text(json.dumps(dict(
        command="python scripts/make_demo_target.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        python=sys.version.split()[0], final_loss=round(loss.item(), 4), seconds=round(time.time() - t0),
        prompts={d: len(r) for d, r in held.items()}), indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
