"""The SGLang tier's configuration (`aurora-jax sglang-launch`), importable without torch: the demo and
other apps read it typed, as `bridge.config` checks it, on hosts where the serving extras are absent."""

from __future__ import annotations

import dataclasses
import sys

from serving.sglang.sidecar import SidecarConfig
from serving.weight_sync import WeightSubscriberConfig


@dataclasses.dataclass
class SGLangWeightsConfig:
    url: str = "http://127.0.0.1:30000"
    api_key: str = ""           # SGLang --admin-api-key (or --api-key): sent as a Bearer token; "env:NAME" reads $NAME
    tp_size: int = 1            # one serialized payload per TP rank (tp_worker.py:194)
    device: str = "cuda"        # cuda: CUDA-IPC handles (updater on the SGLang host); cpu: by value
    pause: bool = True          # swap inside /pause_generation in_place (see module doc)
    timeout_s: float = 120.0



@dataclasses.dataclass
class SGLangServerConfig:
    model_path: str = ""  # target model (local dir or a name SGLang resolves on that host)
    draft_path: str = ""  # EAGLE3 draft dir (mode=draft), e.g. from `aurora-jax export-hf`
    mode: str = "draft"  # draft (EAGLE3 + our plugin) | no-draft (stock SGLang, aux hidden states only)
    python: str = sys.executable  # interpreter that has sglang installed ('.[sglang]')
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    topk: int = 4  # SGLang's EAGLE defaults
    num_steps: int = 5
    num_draft_tokens: int = 8
    mem_fraction_static: float = 0.0  # 0 = SGLang's default
    disable_radix_cache: bool = False  # cached prompt rows carry no hidden states (traces start later)
    chunked_prefill_size: int = 0  # 0 = SGLang's; only a prompt's last chunk returns hidden-state rows, so
    #                                a prompt longer than this loses its early rows (traces start later)
    api_key: str = ""
    admin_api_key: str = ""  # optional: when unset, the weight-update and pause routes take api_key (utils/auth.py)
    extra_args: list[str] = dataclasses.field(default_factory=list)
    startup_timeout_s: float = 1800.0

    def __post_init__(self):
        if self.mode not in ("draft", "no-draft"):
            raise ValueError("sglang.mode must be draft or no-draft")
        if self.mode == "draft" and not self.draft_path:
            raise ValueError("sglang.mode=draft needs sglang.draft_path (an EAGLE3 directory; `aurora-jax export-hf` "
                             "writes one, also from a fresh checkpoint for day 0)")


@dataclasses.dataclass
class SGLangLaunchConfig:
    sglang: SGLangServerConfig = dataclasses.field(default_factory=SGLangServerConfig)
    sidecar: SidecarConfig = dataclasses.field(default_factory=SidecarConfig)
    tree_topk: int = 8  # target top-k recorded at rejected tree nodes by the plugin (0 = none)
    weights: WeightSubscriberConfig = dataclasses.field(default_factory=WeightSubscriberConfig)
    subscribe_weights: bool = True
    updater: SGLangWeightsConfig = dataclasses.field(default_factory=SGLangWeightsConfig)
