"""Random but valid RequestTraces, for tests, benchmarks and the smoke demo.

Trees are well formed: parents precede children and the accepted path reproduces the trunk
tokens that follow the step's trunk position, exactly as a real engine would report them.
"""

from __future__ import annotations

import numpy as np

from bridge.tensors import BF16
from bridge.traces import Trace, TreeStep


def random_trace(rng: np.random.Generator, *, request_id: str, num_tokens: int = 64, prompt_len: int = 16,
                 hidden: int = 32, topk: int = 4, vocab: int = 1000, num_steps: int = 4, tree_nodes: int = 8,
                 hidden_dtype=BF16, draft_version: int = 0, domain: str = "synthetic",
                 tokens: np.ndarray | None = None) -> Trace:
    T = num_tokens
    toks = rng.integers(0, vocab, T, dtype=np.int32) if tokens is None else np.asarray(tokens, np.int32)
    aux = rng.standard_normal((T, 3 * hidden), dtype=np.float32).astype(hidden_dtype)
    ids = np.stack([rng.choice(vocab, topk, replace=False) for _ in range(T)]).astype(np.int32)
    logits = rng.standard_normal((T, topk)).astype(np.float32) * 2
    logprobs = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), axis=-1)[:, ::-1].copy()
    steps = []
    positions = np.linspace(prompt_len - 1, T - 2, num_steps).astype(int) if num_steps and T > prompt_len else []
    for p in positions:
        n = tree_nodes
        depth = int(rng.integers(0, min(n, T - 1 - p) + 1))  # accepted path length
        parents = np.empty(n, np.int32)
        node_tokens = rng.integers(0, vocab, n, dtype=np.int32)
        parents[:depth] = np.arange(-1, depth - 1)
        node_tokens[:depth] = toks[p + 1:p + 1 + depth]
        for j in range(depth, n):
            parents[j] = rng.integers(-1, j)
        accepted = np.zeros(n, bool)
        accepted[:depth] = True
        rejected = np.nonzero(~accepted)[0].astype(np.int32)
        k_ids = np.stack([rng.choice(vocab, topk, replace=False) for _ in rejected]).astype(np.int32) \
            if rejected.size else np.zeros((0, topk), np.int32)
        k_lp = np.full(k_ids.shape, -np.log(topk), np.float32)
        steps.append(TreeStep(int(p), node_tokens, parents, accepted, rejected, k_ids, k_lp))
    return Trace(request_id=request_id, tokens=toks, prompt_len=prompt_len, aux_hidden=aux, target_ids=ids,
                 target_logprobs=logprobs, steps=steps, draft_version=draft_version, domain=domain,
                 start_unix_s=1.0, end_unix_s=2.0, target_forwards=len(steps))


def toy_target_trace(rng: np.random.Generator, *, request_id: str, succ: np.ndarray, features: np.ndarray,
                     num_tokens: int = 48, prompt_len: int = 8, topk: int = 2, num_steps: int = 4,
                     tree_nodes: int = 6, noise: float = 0.1, draft_version: int = 0,
                     domain: str = "toy") -> Trace:
    """A trace served by a toy target whose greedy next token is `succ[token]`.

    The target puts 1 - noise on succ[x_t] (the rest on other tokens), and the text follows it
    except for `noise` random jumps, so a draft can learn the mapping; aux hidden states are
    `features[x_t]` (plus noise). Trees accept the target's choice and reject random siblings.
    """
    V = succ.size
    T = num_tokens
    toks = np.empty(T, np.int32)
    toks[0] = rng.integers(V)
    for t in range(1, T):
        toks[t] = succ[toks[t - 1]] if rng.random() >= noise else rng.integers(V)
    ids = np.empty((T, topk), np.int32)
    ids[:, 0] = succ[toks]
    for j in range(1, topk):
        ids[:, j] = (succ[toks] + j) % V
    lp = np.full((T, topk), np.log(noise / max(topk - 1, 1)) if topk > 1 else 0.0, np.float32)
    lp[:, 0] = np.log(1 - noise) if topk > 1 else 0.0
    aux = (features[toks] + 0.01 * rng.standard_normal((T, features.shape[1]))).astype(BF16)
    steps = []
    for p in np.linspace(prompt_len - 1, T - 2, num_steps).astype(int) if num_steps else []:
        depth = 0
        while p + depth + 1 < T and depth < 3 and toks[p + depth + 1] == succ[toks[p + depth]]:
            depth += 1
        parents = np.concatenate([np.arange(-1, depth - 1), rng.integers(-1, max(depth, 1), tree_nodes - depth)])
        parents = np.minimum(parents, np.arange(tree_nodes) - 1).astype(np.int32)
        node_tokens = np.concatenate([toks[p + 1:p + 1 + depth], rng.integers(0, V, tree_nodes - depth)]).astype(np.int32)
        for j in range(depth, tree_nodes):  # a rejected node never equals the target's choice
            ctx = toks[p] if parents[j] < 0 else node_tokens[parents[j]]
            if node_tokens[j] == succ[ctx]:
                node_tokens[j] = (node_tokens[j] + 1) % V
        accepted = np.arange(tree_nodes) < depth
        steps.append(TreeStep(int(p), node_tokens, parents, accepted))
    return Trace(request_id=request_id, tokens=toks, prompt_len=prompt_len, aux_hidden=aux, target_ids=ids,
                 target_logprobs=lp, steps=steps, draft_version=draft_version, domain=domain,
                 start_unix_s=1.0, end_unix_s=2.0, target_forwards=len(steps))
