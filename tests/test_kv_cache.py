"""The target's in-place KV cache and packed grouped-query attention against plain references:
attention written out in float64, and whole-sequence forwards of the model with no cache at all."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from serving.kv_cache import KVCache
from serving.target import Target, TargetConfig, packed_gqa_attention


def _reference_attention(q, k, v, allowed, scale):
    """softmax(q k^T * scale, masked) v in float64, each query head reading kv head h // group."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 4), n=st.integers(1, 6),
       past=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_packed_gqa_matches_reference_attention(batch, kv_heads, group, n, past, seed):
    g = torch.Generator().manual_seed(seed)
    d, L = 8, past + n
    q = torch.randn(batch, kv_heads * group, n, d, generator=g)
    k, v = (torch.randn(batch, kv_heads, L, d, generator=g) for _ in range(2))
    allowed = torch.rand(batch, n, L, generator=g) < 0.6
    allowed[:, torch.arange(n), past + torch.arange(n)] = True  # every query sees itself
    mask = torch.where(allowed[:, None], 0.0, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(num_key_value_groups=group, is_causal=True, training=False)
    out, _ = packed_gqa_attention(module, q, k, v, mask, scaling=d ** -0.5)
    want = _reference_attention(q, k, v, allowed, d ** -0.5)
    assert out.shape == (batch, n, kv_heads * group, d)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=512)
    return Target(TargetConfig(), model=LlamaForCausalLM(cfg))


def _uncached(target, ids):
    """Logits of a whole sequence in one forward: no cache, the model's own causal mask."""
    with torch.no_grad():
        return target.model(torch.tensor([ids])).logits[0].float()


def test_cache_grows_and_trims_in_place_as_a_whole_sequence_forward_would(target):
    """Prefill, one-token steps past the first capacity, tree passes trimmed to a path (`keep`): each
    forward's logits equal those of the kept sequence run whole, and the cache holds only kept entries."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 64, (5,), generator=g).tolist()
    cache = target.new_cache()
    logits, _ = target.forward(seq, cache)
    torch.testing.assert_close(logits, _uncached(target, seq), rtol=1e-4, atol=1e-4)
    paths = [[0, 2, 3], [0, 1], [0], [0, 2]]  # rows kept: node 2 then 3, node 1, none, node 2
    for step in range(80):  # ~110 tokens: past the first buffers' 64 entries
        if step % 3:
            x = int(torch.randint(0, 64, (1,), generator=g))
            logits, _ = target.forward([x], cache)
            seq.append(x)
            torch.testing.assert_close(logits[-1], _uncached(target, seq)[-1], rtol=1e-4, atol=1e-4)
            continue
        # a tree under the root x_q: nodes 1, 2 children of the root, node 3 a child of node 2
        q, nodes = len(seq) - 1, torch.randint(0, 64, (3,), generator=g).tolist()
        cache.keep(q, [])  # x_q is pending again: the tree pass runs it as row 0
        allowed = torch.zeros(4, q + 4, dtype=torch.bool)
        allowed[:, :q + 1] = True  # the cache and the root
        allowed[1, q + 1] = allowed[2, q + 2] = allowed[3, q + 2] = allowed[3, q + 3] = True
        target.forward([seq[q]] + nodes, cache, [q, q + 1, q + 1, q + 2], allowed)
        rows = paths[(step // 3) % len(paths)]  # some kept rows are already in place, some move
        cache.keep(q, rows)
        seq.extend(nodes[r - 1] for r in rows[1:])
        assert cache.get_seq_length() == len(seq)
    for keys, values in cache.entries():
        assert keys.shape[2] == values.shape[2] == len(seq)
    want = target.new_cache()
    target.forward(seq, want)
    for (k1, v1), (k2, v2) in zip(cache.entries(), want.entries(), strict=True):
        torch.testing.assert_close(k1, k2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-4)


def test_stack_pads_with_zeros_and_unstack_returns_only_new_entries():
    caches = [KVCache(), KVCache()]
    for c, n in zip(caches, (3, 5)):
        for li in range(2):
            c.update(torch.full((1, 2, n, 4), float(li + 1)), torch.full((1, 2, n, 4), -float(li + 1)), li)
    batched = KVCache.stack(caches, width=2)
    assert batched.get_seq_length() == 5 and batched.keys[0].shape == (2, 2, 7, 4)
    assert batched.keys[1][0, :, 3:].abs().sum() == 0  # the shorter request's pad entries are zeros
    for li in range(2):
        batched.update(torch.full((2, 2, 2, 4), 9.0), torch.full((2, 2, 2, 4), -9.0), li)
    batched.unstack(caches, [1, 2], past=5)
    assert [c.get_seq_length() for c in caches] == [4, 7]
    assert caches[0].entries()[1][0][0, 0, :, 0].tolist() == [2.0, 2.0, 2.0, 9.0]
    assert caches[1].entries()[0][1][0, 0, :, 0].tolist() == [-1.0] * 5 + [-9.0] * 2
