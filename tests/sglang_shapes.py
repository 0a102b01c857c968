"""Objects shaped exactly as SGLang 0.5.23 produces them, built from a ground-truth trace of our engine.

Used by the adapter tests: SGLang itself needs a GPU, so these stand in for its `/generate`
response and for the arguments/result of `eagle_sample` the scheduler plugin sees. Every shape
names its source (files under sglang/srt/ unless said otherwise).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from bridge.traces import Trace, TreeStep


def _rows(ids: np.ndarray, lps: np.ndarray) -> list:
    # (logprob, token_id, text) tuples, text None without return_text_in_logprobs (managers/tokenizer_manager.py:3106)
    return [[(float(l), int(i), None) for l, i in zip(lr, ir)] for ir, lr in zip(ids, lps)]


def generate_response(trace: Trace, rid: str, weight_version: str = "0", cached: int = 0,
                      spec_verify_ct: int | None = None) -> dict:
    """The non-streaming /generate reply for `trace`'s request (managers/tokenizer_manager.py:2664-2668)."""
    P, T = trace.prompt_len, trace.num_tokens
    out = trace.tokens[P:].tolist()
    G = len(out)
    aux = trace.aux_hidden.astype(np.float32)
    # prefill: one 2-D chunk of the uncached prompt rows (scheduler_components/batch_result_processor.py:659);
    # decode: one 1-D row per token fed back, the last output token never is (:699)
    hidden = [aux[cached:P].tolist()] + [aux[t].tolist() for t in range(P, T - 1)]
    meta = {
        "id": rid, "finish_reason": {"type": "length", "length": G}, "prompt_tokens": P,
        "weight_version": weight_version, "completion_tokens": G,
        # input_top_logprobs: None at position 0 (tokenizer_manager.py:3135), then the distribution of token t
        "input_top_logprobs": [None] + _rows(trace.target_ids[:P - 1], trace.target_logprobs[:P - 1]),
        "output_top_logprobs": _rows(trace.target_ids[P - 1:T - 1], trace.target_logprobs[P - 1:T - 1]),
        "hidden_states": hidden,  # tokenizer_manager.py:2601
    }
    if spec_verify_ct is not None:
        meta["spec_verify_ct"] = spec_verify_ct  # tokenizer_manager.py:3172
    return {"text": "", "output_ids": out, "meta_info": meta}


def sglang_block(step: TreeStep, root_token: int, rng: np.random.Generator):
    """One request's verify block in SGLang's layout: root at local 0, draft tokens at shuffled local
    indices (SGLang orders them by draft score, not breadth first), first-child / next-sibling links
    (speculative/eagle_info.py:18-25), accepted local indices root first (eagle_utils.py:633)."""
    n = len(step.tokens)
    local = 1 + rng.permutation(n)  # our node k -> SGLang local index
    tokens = [root_token] + [0] * n
    nxt, sib = [-1] * (n + 1), [-1] * (n + 1)
    last_child = {}
    for k in range(n):
        u, p = int(local[k]), (0 if step.parents[k] < 0 else int(local[step.parents[k]]))
        tokens[u] = int(step.tokens[k])
        if p in last_child:
            sib[last_child[p]] = u
        else:
            nxt[p] = u
        last_child[p] = u
    path = [k for k in range(n) if step.accepted[k]]  # parents precede children: in path order
    return tokens, nxt, sib, [0] + [int(local[k]) for k in path], local


def eagle_sample_call(blocks: list, rids: list[str], trunk_pos: list[int], vocab: int, rng: np.random.Generator):
    """(verify_input, batch, logits_output, result) as run_eagle_verify passes them to eagle_sample and
    gets them back (speculative/eagle_worker_common.py; result: eagle_utils.py:854). All blocks must
    have the same size, as SGLang's draft_token_num is per batch."""
    bs, n = len(blocks), len(blocks[0][0])
    depth = max(len(b[3]) for b in blocks) + 1
    accept_index = torch.full((bs, depth), -1, dtype=torch.int32)
    for i, b in enumerate(blocks):
        accept_index[i, :len(b[3])] = torch.tensor([i * n + u for u in b[3]], dtype=torch.int32)
    verify_input = types.SimpleNamespace(
        draft_token=torch.tensor([t for b in blocks for t in b[0]], dtype=torch.int64),
        retrieve_next_token=torch.tensor([b[1] for b in blocks], dtype=torch.int64),
        retrieve_next_sibling=torch.tensor([b[2] for b in blocks], dtype=torch.int64),
        draft_token_num=n)
    seq_lens = torch.tensor(trunk_pos, dtype=torch.int64)  # managers/schedule_batch.py:2546
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(rid=r) for r in rids], seq_lens=seq_lens,
                                  seq_lens_cpu=seq_lens.clone(),
                                  forward_mode=types.SimpleNamespace(is_idle=lambda: False))
    logits = types.SimpleNamespace(next_token_logits=torch.tensor(rng.standard_normal((bs * n, vocab)),
                                                                  dtype=torch.float32))
    accept_lens = torch.tensor([len(b[3]) for b in blocks], dtype=torch.int32)
    return verify_input, batch, logits, (torch.zeros(bs * n, dtype=torch.int32), accept_lens, accept_index)


def tree_paths(step: TreeStep) -> dict:
    """Node -> (tokens on its path from the root, accepted): a canonical form independent of node order."""
    out = {}
    for k in range(len(step.tokens)):
        path, j = [], k
        while j >= 0:
            path.append(int(step.tokens[j]))
            j = int(step.parents[j])
        out[tuple(reversed(path))] = bool(step.accepted[k])
    return out
