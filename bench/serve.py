"""`aurora-jax bench serve`: target-only vs speculative decoding with a given draft, side by side.

For the same prompts, greedy, in one run: target forwards per generated token (the inverse of the
acceptance length), decode tokens/s, and per-request throughput ((input + output tokens) / latency),
each path once with requests one at a time and once with `--concurrency` requests batched (their
target forwards fused; `batch` is the mean number of requests per fused forward).
Greedy outputs are checked to be identical (speculative decoding is lossless). The target is a local
HF directory (`--target`); `--tiny` builds a small random Llama instead (a smoke run: random weights
make any draft's acceptance meaningless). The draft is `untrained` (day 0) or an EAGLE3 HF directory
(e.g. from `aurora-jax export-hf`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _tiny_target(path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"line {i}: the quick brown fox {i % 7} jumps over {i % 5} lazy dogs" for i in range(200)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                 tie_word_embeddings=False)).save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="", help="local HF causal LM directory")
    p.add_argument("--tiny", action="store_true", help="build a small random Llama as the target (smoke run)")
    p.add_argument("--draft", default="untrained", help="'untrained' or an EAGLE3 HF directory")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=5)
    p.add_argument("--num-draft-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight for the batched rows")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args(argv)
    if not a.target and not a.tiny:
        p.error("give --target DIR or --tiny")

    from serving.engine import DraftSource, Engine, EngineConfig
    from serving.spec_decode import SpecConfig
    from serving.target import Target, TargetConfig

    tmp = None
    if a.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="aurora-tiny-")
        _tiny_target(Path(tmp.name))
        a.target = tmp.name
    target = Target(TargetConfig(path=a.target))
    spec = SpecConfig(topk=a.topk, num_steps=a.num_steps, num_draft_tokens=a.num_draft_tokens)
    draft = DraftSource(mode="untrained") if a.draft == "untrained" else DraftSource(mode="hf", path=a.draft)
    prompts = [f"line {i}: the quick brown fox" for i in range(a.requests)]
    rows, outputs = [], {}
    for name, src in [("target only", DraftSource(mode="none")), (f"speculative ({a.draft})", draft)]:
        for conc in sorted({1, a.concurrency}):
            eng = Engine(EngineConfig(target=TargetConfig(path=a.target), draft=src, spec=spec, export_traces=False,
                                      max_running=conc, max_new_tokens=a.max_tokens), target=target)
            ids = [eng.tokenizer(pr)["input_ids"] for pr in prompts]
            eng.complete(ids[0], max_new_tokens=4)  # warm-up
            f0, r0 = eng.decoder.fused_forwards, eng.decoder.fused_requests
            t0 = time.perf_counter()
            evs = []
            for i in range(0, len(ids), conc):  # waves of `conc` requests submitted together
                handles = [eng.submit(x, max_new_tokens=a.max_tokens) for x in ids[i:i + conc]]
                for h in handles:
                    while not isinstance(ev := h.events.get(), dict):
                        pass
                    evs.append(ev)
            wall = time.perf_counter() - t0
            batch = (eng.decoder.fused_requests - r0) / max(eng.decoder.fused_forwards - f0, 1)
            eng.close()
            outs = [ev["output"] for ev in evs]
            outputs[(name, conc)] = outs
            ntok = sum(len(o) for o in outs)
            rows.append(dict(path=name, concurrency=conc, batch=batch,
                             target_forwards_per_token=sum(ev["target_forwards"] for ev in evs) / ntok,
                             tokens_per_s=ntok / wall,
                             request_throughput=statistics.mean((len(x) + len(ev["output"])) / ev["seconds"]
                                                                for x, ev in zip(ids, evs)),
                             output_tokens=ntok))
    same = len(set(json.dumps(v) for v in outputs.values())) == 1
    base = rows[0]
    print(f"\ntarget {a.target if not a.tiny else '(tiny random Llama)'}; {a.requests} requests x {a.max_tokens} "
          f"tokens, greedy; tree topk={a.topk} steps={a.num_steps} tokens={a.num_draft_tokens}\n")
    head = f"{'path':34} {'conc':>4} {'batch':>6} {'fwd/token':>10} {'tok/s':>8} {'req tok/s':>10} {'vs base':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['path']:34} {r['concurrency']:4d} {r['batch']:6.2f} {r['target_forwards_per_token']:10.3f} "
              f"{r['tokens_per_s']:8.1f} {r['request_throughput']:10.1f} {r['tokens_per_s'] / base['tokens_per_s']:7.2f}x")
    print("\nvs base: aggregate tokens/s relative to target only, one request at a time")
    print(f"\ngreedy outputs identical: {same}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(dict(rows=rows, identical=same, args=vars(a)), indent=2))
    print(f"wrote {out / 'serve.json'}")
    return 0 if same else 1
