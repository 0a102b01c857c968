"""Flax <-> torch (SGLang EAGLE3 layout), the torch reference forward, HF export/import, vocab pruning."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from aurora_jax.model import Eagle3Draft, flat_variables, load_flat
from aurora_jax.tree_attention import TreeMeta, tree_mask
from bridge.eagle3 import DraftConfig, LayoutError, from_torch_layout, load_hf, save_hf, to_torch_layout
from bridge.torch_io import from_torch, to_torch
from bridge.vocab import build_vocab, token_frequencies
from serving.eagle3 import Eagle3Draft as TorchDraft

CFG = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  vocab_size=60, draft_vocab_size=40, target_hidden_size=16)


def _flax(cfg=CFG, seed=0):
    m = Eagle3Draft(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    m.set_vocab(build_vocab(rng.integers(0, 100, cfg.vocab_size), cfg.vd)[0])
    for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):  # norms away from 1 so mistakes show
        if path[-1] == "weight":
            v.set_value(v.get_value() + 0.1 * jnp.asarray(rng.standard_normal(v.get_value().shape), v.get_value().dtype))
    return m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flax_torch_flax_round_trip_is_bit_exact(dtype):
    cfg = DraftConfig(**{**CFG.__dict__, "param_dtype": dtype})
    m = _flax(cfg)
    flat = {k: np.asarray(v) for k, v in flat_variables(m).items()}
    sd, _ = to_torch(flat_variables(m))
    assert sd["fc.weight"].shape == (32, 48) and sd["lm_head.weight"].shape == (40, 32)
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    if dtype == "bfloat16":
        assert sd["midlayer.self_attn.q_proj.weight"].dtype == torch.bfloat16
    back = from_torch(sd, cfg)
    assert back.keys() == flat.keys()
    for k in flat:
        assert np.array_equal(np.asarray(back[k]).astype(flat[k].dtype), flat[k]), k
    m2 = Eagle3Draft(cfg, rngs=nnx.Rngs(9))
    load_flat(m2, back)
    for k, v in flat_variables(m2).items():
        assert np.array_equal(np.asarray(v), flat[k]), k


def test_export_is_zero_copy_for_host_arrays_and_never_writes_back():
    m = _flax()
    flat = flat_variables(m)
    sd, copied = to_torch(flat)
    assert copied <= sd["d2t"].numel() * 8  # only the int32 -> int64 d2t cast
    src = flat["midlayer.mlp.up_proj.kernel"]
    assert sd["midlayer.mlp.up_proj.weight"].data_ptr() == src.unsafe_buffer_pointer()
    assert not sd["midlayer.mlp.up_proj.weight"].is_contiguous()  # a transposed view, not a copy
    before = np.asarray(src).copy()
    tm = TorchDraft(CFG)
    tm.load_state_dict(sd)  # copies into the module's own storage
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(1.0)
    assert np.array_equal(np.asarray(flat_variables(m)["midlayer.mlp.up_proj.kernel"]), before)
    sd_copy, copied = to_torch(flat, copy=True)
    assert copied > 0 and sd_copy["midlayer.mlp.up_proj.weight"].data_ptr() != src.unsafe_buffer_pointer()
    assert all(t.is_contiguous() for t in to_torch(flat, contiguous=True)[0].values())


def _meta_from_parents(parents, attach):
    """A single-request tree: trunk slots are those with parent -2, others hang from `attach`."""
    N = len(parents)
    tpos = np.where(np.asarray(parents) == -2, np.arange(N), -1)
    anc = np.full((N, N), -1)
    for i, p in enumerate(parents):
        if p == -2:
            continue
        chain, j = [i], p
        while j >= 0 and parents[j] != -2:
            chain.append(j)
            j = parents[j]
        anc[i, :len(chain)] = chain
    att = np.where(tpos >= 0, tpos, attach)
    arr = lambda a: jnp.asarray(np.asarray(a, np.int32)[None])
    return TreeMeta(arr(np.zeros(N)), arr(tpos), arr(att), arr(anc))


def _tree_inputs(cfg: DraftConfig, hidden_kind: str = "target"):
    """6 trunk slots, then a tree hanging from trunk slot 4: nodes 6,7 children of the trunk, 8 <- 6, 9 <- 8."""
    parents = [-2] * 6 + [-1, -1, 6, 8]
    meta = _meta_from_parents(parents, attach=4)
    N = len(parents)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (1, N)).astype(np.int32)
    width = 3 * cfg.ht if hidden_kind == "target" else cfg.hidden_size
    hidden = rng.standard_normal((1, N, width)).astype(np.float32)
    positions = np.asarray([[0, 1, 2, 3, 4, 5, 5, 5, 6, 7]], np.int32)
    return tokens, hidden, positions, meta


def _torch_forward(tm, tokens, hidden, positions, meta):
    mask = torch.from_numpy(np.array(tree_mask(meta, meta)))
    with torch.no_grad():
        logits, h, _ = tm(torch.from_numpy(tokens).long(), torch.from_numpy(hidden), torch.from_numpy(positions).long(),
                          mask)
    return logits.float().numpy(), h.float().numpy()


BF16_ATOL = 3e-2  # a bf16 Flax forward against the torch forward (in f32) of the same bf16 weights


def assert_serves_like_flax(m: Eagle3Draft, served: dict, atol: float = 1e-4) -> None:
    """What serving received (a torch state_dict in SGLang's layout), loaded into the torch draft,
    computes the Flax model's forward on a tree: an oracle independent of the Flax->torch mapping
    under test (comparing with `to_torch_layout`'s output would repeat its mistakes). The embedding,
    which is never sent, is taken from the Flax model."""
    cfg = m.cfg
    tm = TorchDraft(dataclasses.replace(cfg, param_dtype="float32"))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in served.items()}
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"embed_tokens.weight", "d2t", "t2d"}, (missing, unexpected)
    embed = np.asarray(flat_variables(m)["embed_tokens"]).astype(np.float32)
    tm.embed_tokens.weight.data.copy_(torch.from_numpy(embed))
    inputs = _tree_inputs(cfg)
    logits, h = m(*(jnp.asarray(a) for a in inputs[:3]), inputs[3])
    tl, th = _torch_forward(tm, *inputs)
    np.testing.assert_allclose(th, np.asarray(h, np.float32), rtol=atol, atol=atol)
    np.testing.assert_allclose(tl, np.asarray(logits, np.float32), rtol=atol, atol=atol)


@pytest.mark.parametrize("hidden_kind", ["target", "draft"])
def test_torch_reference_forward_matches_flax(hidden_kind):
    m = _flax(seed=1)
    tm = TorchDraft(CFG)
    tm.load_state_dict(to_torch(flat_variables(m))[0])
    tokens, hidden, positions, meta = _tree_inputs(CFG, hidden_kind)
    logits, h = m(jnp.asarray(tokens), jnp.asarray(hidden), jnp.asarray(positions), meta)
    mask = torch.from_numpy(np.array(tree_mask(meta, meta)))
    assert mask[0, 8].tolist() == [True] * 5 + [False] * 1 + [True, False, True, False]
    tl, th = _torch_forward(tm, tokens, hidden, positions, meta)
    np.testing.assert_allclose(th, np.asarray(h), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tl, np.asarray(logits), rtol=1e-4, atol=1e-4)


def test_torch_forward_with_kv_cache_equals_one_pass():
    tm = TorchDraft(CFG)
    torch.manual_seed(0)
    for p in tm.parameters():
        torch.nn.init.normal_(p, std=0.1)
    N = 7
    tokens = torch.randint(0, CFG.vocab_size, (1, N))
    hidden = torch.randn(1, N, 3 * CFG.ht)
    pos = torch.arange(N)[None]
    causal = torch.ones(N, N).tril().bool()[None]
    with torch.no_grad():
        full, _, _ = tm(tokens, hidden, pos, causal)
        a, _, cache = tm(tokens[:, :4], hidden[:, :4], pos[:, :4], causal[:, :4, :4])
        b, _, _ = tm(tokens[:, 4:], hidden[:, 4:], pos[:, 4:], causal[:, 4:, :], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)


def test_hf_export_then_import_is_identical(tmp_path):
    m = _flax(seed=3)
    sd = to_torch_layout({k: np.asarray(v) for k, v in flat_variables(m).items()})
    for dtype in ("float32", "bfloat16"):
        out = save_hf(tmp_path / dtype, CFG, sd, torch_dtype=dtype)
        hf = json.loads((out / "config.json").read_text())
        assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["draft_vocab_size"] == 40
        assert hf["target_hidden_size"] == 16 and hf["torch_dtype"] == dtype
        cfg2, sd2 = load_hf(out)
        assert cfg2.shapes() == CFG.shapes() and sd2.keys() == sd.keys()
        for k in sd:
            want = sd[k] if sd[k].dtype.kind in "ib" else sd[k].astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
            assert sd2[k].dtype == want.dtype and np.array_equal(sd2[k], want), k
    # torch's own safetensors reader sees the SGLang layout too, and what it reads computes the Flax forward
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "bfloat16" / "model.safetensors"))
    assert t["midlayer.self_attn.q_proj.weight"].dtype == torch.bfloat16 and t["d2t"].dtype == torch.int64
    assert_serves_like_flax(m, load_file(str(tmp_path / "float32" / "model.safetensors")))


def test_llama31_8b_shaped_sglang_state_dict_imports_without_missing_or_unexpected_keys():
    cfg = DraftConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                      vocab_size=128256, draft_vocab_size=32000, rope_theta=500000.0)
    rng = np.random.default_rng(0)
    row = rng.standard_normal(1 << 17).astype(ml_dtypes.bfloat16)

    def random_like(shape):  # full-size, random-valued views without allocating an 8B draft's memory
        return np.broadcast_to(row[:shape[-1]], shape)

    sd = {}
    for k, shape in cfg.shapes().items():
        key = k.replace("midlayer.", "layers.0.")  # SGLang's in-memory spelling
        sd[key] = random_like(shape)
    d2t, t2d = build_vocab(rng.integers(0, 1000, cfg.vocab_size), cfg.vd)
    sd["d2t"], sd["t2d"] = d2t, t2d
    flat = from_torch_layout(sd, cfg)
    abstract = nnx.eval_shape(lambda: Eagle3Draft(cfg, rngs=nnx.Rngs(0)))
    want = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    assert {k: tuple(v.shape) for k, v in flat.items()} == want
    del sd["layers.0.mlp.up_proj.weight"]
    sd["layers.0.mlp.extra.weight"] = row[:3]
    with pytest.raises(LayoutError, match=r"missing \['midlayer.mlp.up_proj.weight'\], unexpected \['midlayer.mlp.extra.weight'\]"):
        from_torch_layout(sd, cfg)


def test_vocab_pruning_keeps_the_most_frequent_tokens():
    class T:  # trunk tokens; the target's top-2 at each position: the next token, p = 0.99
        def __init__(self, toks, also=11, p_also=0.01):
            self.tokens = np.asarray(toks)
            self.target_ids = np.stack([np.r_[toks[1:], 0], np.full(len(toks), also)], 1)
            self.target_logprobs = np.log(np.tile([1.0 - p_also, p_also], (len(toks), 1)))
    counts = token_frequencies([T([5, 5, 5, 7, 7, 1, 9, 9, 9, 9]), T([3, 3, 7])], 12)
    d2t, t2d = build_vocab(counts, 4)
    kept = np.arange(4) + d2t
    assert kept.tolist() == [3, 5, 7, 9]  # the four most frequent, in target-id order
    assert t2d.sum() == 4 and t2d[kept].all() and not t2d[1]
    # a token the traces never hold but the target keeps offering (0.4 a position) is kept over a rare one
    counts = token_frequencies([T([5, 5, 5, 7, 7, 1, 9, 9, 9, 9], p_also=0.4), T([3, 3, 7], p_also=0.4)], 12)
    assert counts[11] == 13 * round(0.4 * 1024) and 11 in (np.arange(4) + build_vocab(counts, 4)[0])
    with pytest.raises(ValueError, match="draft_vocab_size 13 outside"):
        build_vocab(counts, 13)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_frequencies_match_transformers(scaling):
    """Our one table of rotary frequencies (used by both forwards) against transformers' own."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=1024, rope_theta=500000.0,
                     rope_scaling=dict(scaling))
    want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    cfg = DraftConfig.from_hf({**hf.to_dict(), "architectures": ["LlamaForCausalLMEagle3"]})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.rope_type == scaling["rope_type"]
    np.testing.assert_allclose(cfg.inv_freq(), want.numpy(), rtol=1e-6)
    assert not np.allclose(cfg.inv_freq(), DraftConfig(hidden_size=256, num_attention_heads=2,
                                                       rope_theta=500000.0).inv_freq())


def test_llama3_rope_scaling_forward_export_import_and_refusals(tmp_path):
    """A Llama-3-style draft (SpecForge configs carry rope_scaling llama3): both forwards agree with the
    scaling on (and differ from plain RoPE), it survives export/import, and unknown types are refused."""
    import dataclasses
    cfg = dataclasses.replace(CFG, rope_scaling=dict(LLAMA3_SCALING))
    m, plain = _flax(cfg, seed=1), _flax(CFG, seed=1)
    for model in (m, plain):  # sharp attention, so where keys sit in rotary space shows in the output
        for proj in (model.midlayer.self_attn.q_proj, model.midlayer.self_attn.k_proj):
            proj.kernel.set_value(proj.kernel.get_value() * 20)
    tm = TorchDraft(cfg)
    tm.load_state_dict(to_torch(flat_variables(m))[0])
    N, rng = 6, np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, N)).astype(np.int32)
    hidden = rng.standard_normal((1, N, 3 * cfg.ht)).astype(np.float32)
    positions = np.asarray([[0, 100, 200, 300, 400, 500]], np.int32)
    meta = _meta_from_parents([-2] * N, attach=0)
    logits, _ = m(jnp.asarray(tokens), jnp.asarray(hidden), jnp.asarray(positions), meta)
    plain_logits, _ = plain(jnp.asarray(tokens), jnp.asarray(hidden), jnp.asarray(positions), meta)
    assert np.abs(np.asarray(logits) - np.asarray(plain_logits)).max() > 1e-2
    with torch.no_grad():
        tl, _, _ = tm(torch.from_numpy(tokens).long(), torch.from_numpy(hidden), torch.from_numpy(positions).long(),
                      torch.from_numpy(np.array(tree_mask(meta, meta))))
    np.testing.assert_allclose(tl.numpy(), np.asarray(logits), rtol=1e-4, atol=1e-4)

    sd = to_torch_layout({k: np.asarray(v) for k, v in flat_variables(m).items()})
    out = save_hf(tmp_path / "llama3", cfg, sd, torch_dtype="float32")
    hf = json.loads((out / "config.json").read_text())
    assert hf["rope_scaling"] == LLAMA3_SCALING
    cfg2, _ = load_hf(out)
    assert cfg2.differences(cfg) == {} and cfg2.differences(CFG) == {"rope_scaling": (LLAMA3_SCALING, None)}
    for bad, msg in [({"rope_type": "yarn", "factor": 4.0}, "type 'yarn' is not supported"),
                     ({**LLAMA3_SCALING, "beta_fast": 32}, r"unknown keys \['beta_fast'\]"),
                     ({**LLAMA3_SCALING, "low_freq_factor": 8.0}, "low_freq_factor < high_freq_factor")]:
        (out / "config.json").write_text(json.dumps({**hf, "rope_scaling": bad}))
        with pytest.raises(LayoutError, match=msg):
            load_hf(out)
