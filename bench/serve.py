"""`aurora-jax bench serve`: target-only vs speculative decoding with a given draft, side by side.

One engine, one target, the same prompts, greedy. Every request of the target-only arm is sent with
`speculative=False` (decoded one token per forward on the same engine), every request of the other
arm drafts with the given draft; the two arms alternate in rounds (A B, B A, A B, ...), so load on the
machine or drift hits both alike, and the table reports the median ratio and its spread over rounds
and flags a run whose rounds disagree on the winner. Each arm runs once with requests one at a time
and once with `--concurrency` clients in a closed loop (each sends its next prompt as soon as its
request finished, as the demo's load driver does; target forwards fused; `batch` = mean requests per
fused forward, below `--concurrency` only while the last requests finish).
Also reported: where a round's time goes (the draft phase per draft step, the target forward over a
tree vs over one token), target forwards per token (1 / acceptance length), and whether the greedy
outputs of the two arms are identical. The target is a local HF dir (`--target`, `--dtype`); `--tiny`
builds a small random Llama (a smoke run). The draft is `untrained` or an EAGLE3 HF dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.report import write_json


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


def _prompts(a, tok) -> list[list[int]]:
    if not a.prompts:
        return [tok(f"line {i}: the quick brown fox")["input_ids"] for i in range(a.requests)]
    recs = []
    for d in a.domains.split(","):
        lines = (Path(a.prompts) / f"{d}.jsonl").read_text().splitlines()
        recs += [json.loads(x) for x in lines if x.strip() and json.loads(x).get("split", "train") == a.split]
    recs = [recs[i] for i in range(0, len(recs), max(1, len(recs) // a.requests))][:a.requests]  # spread over domains
    return [tok(tok.apply_chat_template([dict(role="user", content=r["prompt"])], tokenize=False,
                                        add_generation_prompt=True) if r.get("chat") else r["prompt"])["input_ids"]
            for r in recs]


def _arm(eng, ids, conc, max_tokens, speculative) -> dict:
    d = eng.decoder
    before = dict(d.timing, fwd=d.fused_forwards, req=d.fused_requests)
    evs: list = [None] * len(ids)
    todo = iter(enumerate(ids))
    lock = threading.Lock()

    def client():  # a closed loop: the next prompt as soon as this client's request finished
        while True:
            with lock:
                i, x = next(todo, (None, None))
            if x is None:
                return
            h = eng.submit(x, max_new_tokens=max_tokens, speculative=speculative)
            while not isinstance(ev := h.events.get(), dict):
                pass
            evs[i] = ev

    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(conc)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    delta = {k: v - before[k] for k, v in dict(d.timing, fwd=d.fused_forwards, req=d.fused_requests).items()}
    ntok = sum(len(ev["output"]) for ev in evs)
    return dict(outputs=[ev["output"] for ev in evs], tokens_per_s=ntok / wall, output_tokens=ntok,
                target_forwards_per_token=sum(ev["target_forwards"] for ev in evs) / ntok,
                request_throughput=statistics.mean((len(x) + len(ev["output"])) / ev["seconds"] for x, ev in zip(ids, evs)),
                batch=delta["req"] / max(delta["fwd"], 1), **delta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurora-jax bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="", help="local HF causal LM directory")
    p.add_argument("--tiny", action="store_true", help="build a small random Llama as the target (smoke run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="target (and draft) dtype")
    p.add_argument("--draft", default="untrained", help="'untrained' or an EAGLE3 HF directory")
    p.add_argument("--draft-vocab-size", type=int, default=0, help="untrained draft: Vd (0 = the target's V)")
    p.add_argument("--prompts", default="", help="a prompts dir (<domain>.jsonl, e.g. data/prompts); default: synthetic")
    p.add_argument("--domains", default="code,prose")
    p.add_argument("--split", default="heldout", help="which records of the prompt files")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per arm")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=5)
    p.add_argument("--num-draft-tokens", type=int, default=8)
    p.add_argument("--min-prob", type=float, default=0.0, help="spec.min_prob: smallest draft path probability in a tree")
    p.add_argument("--batched-num-steps", type=int, default=0, help="spec.batched_num_steps: tree depth of a round of "
                   "several requests (0 = --num-steps)")
    p.add_argument("--batched-num-draft-tokens", type=int, default=0, help="spec.batched_num_draft_tokens (0 = "
                   "--num-draft-tokens)")
    p.add_argument("--threads", type=int, default=0, help="engine decode threads (0 = torch's default)")
    p.add_argument("--cpus", default="", help="pin the engine to these CPUs, e.g. 0 or 0,1")
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
    tcfg = TargetConfig(path=a.target, dtype=a.dtype)
    target = Target(tcfg)
    spec = SpecConfig(topk=a.topk, num_steps=a.num_steps, num_draft_tokens=a.num_draft_tokens, min_prob=a.min_prob,
                      batched_num_steps=a.batched_num_steps, batched_num_draft_tokens=a.batched_num_draft_tokens)
    draft = DraftSource(mode="untrained", draft_vocab_size=a.draft_vocab_size) if a.draft == "untrained" \
        else DraftSource(mode="hf", path=a.draft)
    rows, identical, margins, ms = [], True, [], lambda s, n: 1e3 * s / max(n, 1)
    for conc in sorted({1, a.concurrency}):
        eng = Engine(EngineConfig(target=tcfg, draft=draft, spec=spec, export_traces=False, max_running=conc,
                                  max_new_tokens=a.max_tokens, threads=a.threads,
                                  cpus=[int(c) for c in a.cpus.split(",") if c]), target=target)
        ids = _prompts(a, eng.tokenizer)
        eng.complete(ids[0], max_new_tokens=4)  # warm-up, both paths
        eng.complete(ids[0], max_new_tokens=4, speculative=False)
        arms = {False: [], True: []}
        for k in range(a.rounds):
            for spec_arm in ((False, True) if k % 2 == 0 else (True, False)):
                arms[spec_arm].append(_arm(eng, ids, conc, a.max_tokens, spec_arm))
        eng.close()
        ratios = [b["tokens_per_s"] / x["tokens_per_s"] for x, b in zip(arms[False], arms[True])]
        for x, b in zip(arms[False], arms[True]):
            for prompt, ox, ob in zip(ids, x["outputs"], b["outputs"]):
                if ox != ob:
                    identical = False
                    margins.append(_margin(target, prompt, ox, ob))
        for spec_arm, rs in arms.items():
            tot = {k: sum(r[k] for r in rs) for k in rs[0] if k not in ("outputs",)}
            rows.append(dict(path=f"speculative ({a.draft})" if spec_arm else "target only", concurrency=conc,
                             rounds=len(rs), batch=tot["batch"] / len(rs),
                             target_forwards_per_token=tot["target_forwards_per_token"] / len(rs),
                             tokens_per_s=statistics.median(r["tokens_per_s"] for r in rs),
                             request_throughput=statistics.median(r["request_throughput"] for r in rs),
                             draft_ms_per_step=ms(tot["draft_s"], tot["draft_forwards"]),
                             draft_steps_per_round=tot["draft_forwards"] / max(tot["tree_forwards"], 1),
                             tree_forward_ms=ms(tot["tree_s"], tot["tree_forwards"]),
                             one_token_forward_ms=ms(tot["plain_s"], tot["plain_forwards"]),
                             speedup=statistics.median(ratios) if spec_arm else 1.0,
                             speedup_min=min(ratios) if spec_arm else 1.0, speedup_max=max(ratios) if spec_arm else 1.0,
                             rounds_agree=(all(r > 1 for r in ratios) or all(r <= 1 for r in ratios))))
    one_tok = statistics.median(r["one_token_forward_ms"] for r in rows if r["path"] == "target only"
                                and r["concurrency"] == 1)
    print(f"\ntarget {a.target if not a.tiny else '(tiny random Llama)'} ({a.dtype}); {len(ids)} prompts x "
          f"{a.max_tokens} tokens, greedy, {a.rounds} interleaved rounds per arm; tree topk={a.topk} "
          f"steps={a.num_steps} tokens={a.num_draft_tokens} min_prob={a.min_prob}"
          + (f"; batched rounds steps={a.batched_num_steps or a.num_steps} tokens={a.batched_num_draft_tokens or a.num_draft_tokens}"
             if a.batched_num_steps or a.batched_num_draft_tokens else "") + "\n")
    head = (f"{'path':28} {'conc':>4} {'batch':>5} {'fwd/tok':>7} {'tok/s':>7} {'speedup':>8} {'min..max':>10} "
            f"{'draft ms/step':>13} {'tree fwd ms':>11} {'1-tok fwd ms':>12}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['path'][:28]:28} {r['concurrency']:4d} {r['batch']:5.2f} {r['target_forwards_per_token']:7.3f} "
              f"{r['tokens_per_s']:7.1f} {r['speedup']:7.2f}x {r['speedup_min']:4.2f}..{r['speedup_max']:<4.2f} "
              f"{r['draft_ms_per_step']:13.2f} {r['tree_forward_ms']:11.1f} {r['one_token_forward_ms']:12.1f}"
              + ("" if r["rounds_agree"] or r["path"] == "target only" else "  ROUNDS DISAGREE"))
    spec1 = next(r for r in rows if r["path"] != "target only" and r["concurrency"] == 1)
    print(f"\nspeedup: tokens/s over target only on the same engine, median of rounds (min..max)")
    print(f"draft step (whole draft phase / draft forwards, conc 1): {spec1['draft_ms_per_step']:.2f} ms = "
          f"{100 * spec1['draft_ms_per_step'] / max(one_tok, 1e-9):.1f}% of a one-token target forward ({one_tok:.1f} ms)")
    print(f"greedy outputs identical: {identical}")
    if margins:  # where a tree pass and a one-token pass round differently (bf16), it must be at a near-tie
        print(f"outputs differ in {len(margins)} request(s); the target's top-2 logit margin where they part: "
              f"max {max(margins):.3f} (median {statistics.median(margins):.3f})")
    write_json(a.out, "serve", dict(rows=rows, identical=identical, divergence_margins=margins, args=vars(a)))
    return 0 if identical or (a.dtype != "float32" and max(margins) < NEAR_TIE) else 1


NEAR_TIE = 0.5  # logits: a bf16 forward over a tree and over one token may swap two candidates this close


def _margin(target, prompt: list[int], a: list[int], b: list[int]) -> float:
    """Top-1 minus top-2 logit of the target (one-token path, a fresh cache) where outputs a and b part."""
    import torch

    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if a[:min(len(a), len(b))] != b[:min(len(a), len(b))] \
        else min(len(a), len(b))
    logits, _ = target.forward(prompt + a[:k], target.new_cache())
    top = torch.topk(logits[-1].float(), 2).values
    return float(top[0] - top[1])
