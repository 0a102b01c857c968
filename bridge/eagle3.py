"""The EAGLE3 draft's config and parameter layout, shared by trainer (Flax) and serving (torch).

One table maps the Flax NNX variable paths to SGLang's `LlamaForCausalLMEagle3` state_dict keys
(docs/design.md section 2): Flax Dense kernels are [in, out], torch Linear weights [out, in], so every
`*.kernel` is transposed on the way; everything else keeps its name and layout. Arrays here are
numpy (bf16 via ml_dtypes); `bridge.torch_io` does the zero-copy torch side. No JAX, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

# (flax path, torch key, transpose)
TABLE: tuple[tuple[str, str, bool], ...] = (
    ("fc.kernel", "fc.weight", True),
    ("midlayer.input_layernorm.weight", "midlayer.input_layernorm.weight", False),
    ("midlayer.hidden_norm.weight", "midlayer.hidden_norm.weight", False),
    *((f"midlayer.self_attn.{p}_proj.kernel", f"midlayer.self_attn.{p}_proj.weight", True) for p in "qkvo"),
    ("midlayer.post_attention_layernorm.weight", "midlayer.post_attention_layernorm.weight", False),
    *((f"midlayer.mlp.{p}_proj.kernel", f"midlayer.mlp.{p}_proj.weight", True) for p in ("gate", "up", "down")),
    ("norm.weight", "norm.weight", False),
    ("lm_head.kernel", "lm_head.weight", True),
    ("embed_tokens", "embed_tokens.weight", False),
    ("d2t", "d2t", False),
    ("t2d", "t2d", False),
)
TORCH_KEYS = {f: t for f, t, _ in TABLE}
FLAX_PATHS = {t: f for f, t, _ in TABLE}
TRANSPOSED = {t for _, t, tr in TABLE if tr}
OPTIONAL = {"embed_tokens.weight"}  # drafts may ship without it: the target's embedding is used
VOCAB_KEYS = {"d2t", "t2d"}  # never changed by a hot-swap (SGLang caches d2t + arange at load)


class LayoutError(ValueError):
    """A state_dict that does not fit the EAGLE3 layout: names the key and what was wrong."""


ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass
class RopeScaling:
    """HF `rope_scaling`: how rotary frequencies are stretched for long context. Llama-3.x drafts
    (e.g. SpecForge's) ship `llama3`; trainer and server must apply the same one, so it travels in
    config.json. Other types (yarn, dynamic, ...) are refused rather than silently ignored."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported (one of {', '.join(ROPE_TYPES)})")
        if self.factor <= 0 or (self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError(f"rope_scaling {dataclasses.asdict(self)}: need factor > 0 and, for llama3, "
                             "0 < low_freq_factor < high_freq_factor")

    @classmethod
    def from_hf(cls, hf: dict) -> "RopeScaling":
        """Parse a config.json `rope_scaling` (either spelling of the type key); unknown keys are refused."""
        d = dict(hf)
        kind = d.pop("rope_type", None) or d.get("type")
        if d.get("type", kind) != kind:
            raise ValueError(f"rope_scaling {hf}: 'type' and 'rope_type' disagree")
        d.pop("type", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported (one of {', '.join(ROPE_TYPES)})")
        if set(d) - known:
            raise ValueError(f"rope_scaling {hf}: unknown keys {sorted(set(d) - known)}")
        return cls(rope_type=kind, **d)

    def to_hf(self) -> dict | None:
        if self.rope_type == "default":
            return None
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return dataclasses.asdict(self)

    def inv_freq(self, hd: int, theta: float) -> np.ndarray:
        """Rotary inverse frequencies [hd/2] (float32), the same numbers in Flax and torch."""
        inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        if self.rope_type == "linear":
            inv = inv / self.factor
        elif self.rope_type == "llama3":  # long wavelengths stretched, short kept, a smooth ramp between
            wavelen = 2 * np.pi / inv
            ctx = self.original_max_position_embeddings
            ramp = np.clip((ctx / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor),
                           0.0, 1.0)
            inv = (1 - ramp) * inv / self.factor + ramp * inv
        return inv.astype(np.float32)


def _rope_params(hf: dict) -> dict:
    # transformers 5 keeps theta and scaling together in `rope_parameters`; older configs split them
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


def rope_theta_from_hf(hf: dict) -> float | None:
    """`rope_theta` of a config.json, in either spelling (None if absent)."""
    theta = _rope_params(hf).get("rope_theta") or hf.get("rope_theta")
    return float(theta) if theta else None


def rope_from_hf(hf: dict) -> tuple[float | None, RopeScaling | None]:
    """(rope_theta, rope_scaling) of a config.json, from the classic `rope_theta`/`rope_scaling`
    keys or from transformers 5's `rope_parameters` (which holds both); raises ValueError on a
    scaling we do not implement."""
    params = _rope_params(hf)
    params.pop("rope_theta", None)
    kind = params.get("rope_type", params.get("type"))
    scaling = RopeScaling.from_hf(params) if params and kind != "default" else None
    return rope_theta_from_hf(hf), scaling


@dataclasses.dataclass
class DraftConfig:
    """The fields of an EAGLE3 `config.json` that shape the draft (HF names where they exist)."""

    hidden_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    intermediate_size: int = 688
    vocab_size: int = 32000  # target vocabulary V
    draft_vocab_size: int = 0  # Vd; 0 = V (no pruning)
    target_hidden_size: int = 0  # Ht; 0 = hidden_size
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_scaling: RopeScaling | None = None  # None = plain RoPE
    param_dtype: str = "float32"  # trainer: master weights
    dtype: str = "float32"  # trainer: activations / matmul inputs (bfloat16 on accelerators)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # an HF dict, or a saved config read back
            self.rope_scaling = RopeScaling.from_hf(self.rope_scaling)
        if self.hidden_size % self.num_attention_heads and not self.head_dim:
            raise ValueError("hidden_size must be divisible by num_attention_heads (or set head_dim)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError("draft_vocab_size cannot exceed vocab_size")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16")

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [hd/2], rope_scaling applied."""
        return (self.rope_scaling or RopeScaling()).inv_freq(self.hd, self.rope_theta)

    def differences(self, other: "DraftConfig") -> dict[str, tuple]:
        """{field: (self's, other's)} for every field that makes the two drafts compute differently
        (any shape, RoPE, norm eps; dtypes aside) or that their config.json must carry alike (the
        context length). Weights moved between them must find none."""
        def fields(c: DraftConfig) -> dict:
            return dict(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.hd,
                        intermediate_size=c.intermediate_size, vocab_size=c.vocab_size, draft_vocab_size=c.vd,
                        target_hidden_size=c.ht, rope_theta=float(c.rope_theta),
                        rope_scaling=c.rope_scaling.to_hf() if c.rope_scaling else None,
                        rms_norm_eps=float(c.rms_norm_eps), max_position_embeddings=c.max_position_embeddings)
        a, b = fields(self), fields(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @property
    def vd(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def ht(self) -> int:
        return self.target_hidden_size or self.hidden_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """torch key -> shape in the SGLang checkpoint."""
        H, hd, nh, nkv, I = self.hidden_size, self.hd, self.num_attention_heads, self.num_key_value_heads, \
            self.intermediate_size
        return {
            "fc.weight": (H, 3 * self.ht),
            "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
            "midlayer.self_attn.q_proj.weight": (nh * hd, 2 * H),
            "midlayer.self_attn.k_proj.weight": (nkv * hd, 2 * H),
            "midlayer.self_attn.v_proj.weight": (nkv * hd, 2 * H),
            "midlayer.self_attn.o_proj.weight": (H, nh * hd),
            "midlayer.post_attention_layernorm.weight": (H,),
            "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
            "midlayer.mlp.down_proj.weight": (H, I),
            "norm.weight": (H,), "lm_head.weight": (self.vd, H),
            "embed_tokens.weight": (self.vocab_size, H), "d2t": (self.vd,), "t2d": (self.vocab_size,),
        }

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict:
        """`config.json` for SGLang's `--speculative-draft-model-path`."""
        return dict(architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_act="silu",
                    hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                    head_dim=self.hd, num_hidden_layers=1, vocab_size=self.vocab_size,
                    draft_vocab_size=self.vd, target_hidden_size=self.ht, rope_theta=self.rope_theta,
                    rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                    rope_scaling=self.rope_scaling.to_hf() if self.rope_scaling else None,
                    tie_word_embeddings=False, torch_dtype=torch_dtype)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "DraftConfig":
        archs = hf.get("architectures") or []
        if archs and not any("Eagle3" in a for a in archs):
            raise LayoutError(f"config.json architectures {archs} is not an EAGLE3 draft")
        keys = {f.name for f in dataclasses.fields(cls)} - {"param_dtype", "dtype", "rope_theta", "rope_scaling"}
        kw = {k: hf[k] for k in keys if hf.get(k) is not None}
        try:
            theta, kw["rope_scaling"] = rope_from_hf(hf)
        except (TypeError, ValueError) as e:
            raise LayoutError(f"config.json: {e}") from None
        if theta:
            kw["rope_theta"] = theta
        kw.setdefault("draft_vocab_size", hf.get("vocab_size", 0))
        return cls(**kw, **overrides)


def read_target_config(path: str | Path) -> dict:
    """A target model directory's `config.json` (a local HF directory; nothing is downloaded)."""
    f = Path(path) / "config.json"
    if not str(path) or not f.exists():
        raise FileNotFoundError(f"no model directory at {str(path) or '(empty path)'!s} "
                                f"(expected a local Hugging Face directory with config.json)")
    return json.loads(f.read_text())


def weights_file(path: str | Path, key: str) -> str:
    """The safetensors file of a model directory that holds `key` (sharded or not)."""
    index = Path(path) / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
        if shard is None:
            raise KeyError(f"{index}: no tensor {key!r}")
        return str(Path(path) / shard)
    return str(Path(path) / "model.safetensors")


def read_tensor(file: str | Path, key: str) -> np.ndarray:
    """One tensor of a safetensors file (bf16 as ml_dtypes.bfloat16), without reading the others."""
    import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16', which safetensors asks for)
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as f:
        if key not in f.keys():
            raise KeyError(f"{file}: no tensor {key!r} (has {sorted(f.keys())[:8]}...)")
        return f.get_tensor(key)


def draft_fields_from_target(hf: dict) -> dict:
    """The DraftConfig fields an EAGLE3 draft takes from its target's `config.json`: the draft's
    layer has the target's width, heads, MLP, RoPE and norm eps (as SpecForge and SGLang build it),
    its `fc` reads the target's hidden size and its vocabulary is the target's. The one place these
    facts are derived: the trainer's `target:` key, `init-draft` and the engine's day-0 draft."""
    H, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, scaling = rope_from_hf(hf)
    return dict(hidden_size=H, num_attention_heads=nh, num_key_value_heads=int(hf.get("num_key_value_heads") or nh),
                head_dim=int(hf.get("head_dim") or H // nh), intermediate_size=int(hf["intermediate_size"]),
                vocab_size=int(hf["vocab_size"]), target_hidden_size=H, rope_theta=float(theta or 10000.0),
                rope_scaling=scaling.to_hf() if scaling else None, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 8192)))


def check_draft_fits_target(cfg: DraftConfig, hf: dict, draft_where: str, target_where: str) -> None:
    """Refuse, naming the field, a draft that cannot serve this target: its vocabulary and its `fc`
    input width are the target's (the rest of its shape is the draft's own choice). Checked where a
    draft directory meets a target: the engine's `draft.mode: hf` and `sglang-launch`."""
    for field, theirs in (("vocab_size", int(hf["vocab_size"])), ("target_hidden_size", int(hf["hidden_size"]))):
        ours = getattr(cfg, field) or (cfg.hidden_size if field == "target_hidden_size" else 0)
        if ours != theirs:
            raise ValueError(f"draft {draft_where}: {field}={ours}, but the target {target_where} has {theirs} "
                             f"(a draft trained for another target)")


def torch_keys(flat: dict, partial: bool = False) -> list[tuple[str, object]]:
    """[(torch key, value)] for Flax paths, checked: no unknown variable, none missing unless
    `partial` (e.g. only the trained weights of a hot-swap). Values are passed through untouched."""
    missing = [p for p in TORCH_KEYS if p not in flat and TORCH_KEYS[p] not in OPTIONAL]
    if missing and not partial:
        raise LayoutError(f"Flax params lack {missing}")
    unknown = [p for p in flat if p not in TORCH_KEYS]
    if unknown:
        raise LayoutError(f"Flax variable {unknown[0]!r} has no place in the EAGLE3 checkpoint")
    return [(TORCH_KEYS[p], a) for p, a in flat.items()]


def to_torch_layout(flat: dict[str, np.ndarray], partial: bool = False) -> dict[str, np.ndarray]:
    """Flax paths -> torch keys, kernels transposed (numpy views: no copy)."""
    out = {}
    for key, a in torch_keys(flat, partial):
        a = np.asarray(a)
        out[key] = a.T if key in TRANSPOSED else a
    if "d2t" in out:
        out["d2t"] = out["d2t"].astype(np.int64)  # SGLang / SpecForge checkpoints store int64
        out["t2d"] = out["t2d"].astype(bool)
    return out


def normalize_keys(sd: dict) -> dict:
    """Accept SGLang's renamed (`layers.0.`) and `model.`-prefixed spellings of the keys."""
    out = {}
    for k, v in sd.items():
        k2 = k[len("model."):] if k.startswith("model.") else k
        k2 = "midlayer." + k2[len("layers.0."):] if k2.startswith("layers.0.") else k2
        out[k2] = v
    return out


def check_layout(sd: dict, cfg: DraftConfig) -> None:
    """Raise LayoutError naming every missing, unexpected or wrongly shaped key."""
    want = cfg.shapes()
    missing = sorted(set(want) - set(sd) - OPTIONAL)
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise LayoutError(f"EAGLE3 state_dict: missing {missing}, unexpected {unexpected}")
    for k, v in sd.items():
        if tuple(v.shape) != want[k]:
            raise LayoutError(f"EAGLE3 state_dict: {k} has shape {list(v.shape)}, config says {list(want[k])}")


def from_torch_layout(sd: dict[str, np.ndarray], cfg: DraftConfig) -> dict[str, np.ndarray]:
    """torch keys (numpy arrays) -> Flax paths, kernels transposed back; layout checked first."""
    sd = normalize_keys(sd)
    check_layout(sd, cfg)
    return {FLAX_PATHS[k]: (np.asarray(v).T if k in TRANSPOSED else np.asarray(v)) for k, v in sd.items()}


def save_hf(out_dir: str | Path, cfg: DraftConfig, sd: dict[str, np.ndarray], torch_dtype: str = "bfloat16") -> Path:
    """Write `config.json` + `model.safetensors` (SGLang-loadable). Float tensors cast to torch_dtype."""
    from safetensors.numpy import save_file
    import ml_dtypes

    check_layout(sd, cfg)
    dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[torch_dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v.astype(dt) if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
                                       else v) for k, v in sd.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # the safetensors writer makes its file private (0600); a model dir is not
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg.to_hf(torch_dtype), indent=2) + "\n")
    return out


def load_hf_config(path: str | Path) -> DraftConfig:
    """The DraftConfig of an EAGLE3 HF dir's `config.json` (no weights read)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this an EAGLE3 draft directory?)")
    return DraftConfig.from_hf(json.loads(cfg_file.read_text()))


def load_hf(path: str | Path) -> tuple[DraftConfig, dict[str, np.ndarray]]:
    """Read an EAGLE3 HF dir (e.g. trained by SpecForge): (config, torch-layout numpy state_dict)."""
    from safetensors.numpy import load_file

    path = Path(path)
    cfg = load_hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    sd = normalize_keys(sd)
    check_layout(sd, cfg)
    return cfg, sd
