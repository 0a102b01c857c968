"""Typed configuration of the trainer process (loaded with `bridge.config.load_config`)."""

from __future__ import annotations

import dataclasses

from aurora_jax.batching import BatchConfig
from aurora_jax.buffer import BufferConfig
from aurora_jax.checkpoint import CheckpointConfig
from aurora_jax.guard import GuardConfig
from aurora_jax.model import DraftConfig
from aurora_jax.objective import ObjectiveConfig
from aurora_jax.train import MeshConfig, OptimConfig
from aurora_jax.validate import TraceLimits
from bridge.eagle3 import draft_fields_from_target, read_target_config, weights_file


@dataclasses.dataclass
class ServerConfig:
    """What both trainer gRPC servers (TraceIngest, WeightSync) take: where, and how clients prove
    who they are. Loopback by default: expose them deliberately."""

    address: str = ""  # host:port; port 0 picks a free one
    auth_token: str = ""  # bearer token required from clients; "env:NAME" reads $NAME; "" = no auth
    tls_cert: str = ""  # PEM paths; both set = TLS on
    tls_key: str = ""

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")


@dataclasses.dataclass
class IngestConfig(ServerConfig):
    """The TraceIngest endpoint."""

    address: str = "127.0.0.1:50051"
    max_streams: int = 16  # Push streams open at once (one per serving host); past it RESOURCE_EXHAUSTED

    def __post_init__(self):
        super().__post_init__()
        if self.max_streams <= 0:
            raise ValueError("max_streams must be positive")


@dataclasses.dataclass
class WeightSyncConfig(ServerConfig):
    """The WeightSync endpoint ("" address = off)."""

    max_chunk_bytes: int = 2 << 20
    max_subscribers: int = 16  # serving hosts subscribed at once; past it RESOURCE_EXHAUSTED

    def __post_init__(self):
        super().__post_init__()
        if self.max_chunk_bytes <= 0 or self.max_subscribers <= 0:
            raise ValueError("max_chunk_bytes and max_subscribers must be positive")


@dataclasses.dataclass
class LoopConfig:
    """The asynchronous train loop around the buffer."""

    max_steps: int = 0  # stop after this many optimizer steps (0 = until SIGINT/SIGTERM)
    traces_per_step: int = 0  # traces sampled per step (0 = batch.rows); packing fits short ones together
    min_traces: int = 1  # wait until the buffer holds this many
    sync_every: int = 50  # publish a new draft_version every N steps (0 = never); adaptive: check every N
    # fixed: publish every sync_every steps. adaptive: every sync_every steps compare the candidate with the
    # served version on the held-out slice; publish when the proxy gained sync_gain, or after sync_max_steps
    # steps anyway; while nothing gains, wait twice as long before the next check (up to sync_max_steps).
    sync_policy: str = "fixed"
    sync_gain: float = 0.02
    sync_max_steps: int = 0  # 0 = 8 x sync_every
    log_every: int = 10  # steps between log lines (every step goes to the JSONL file)
    metrics_path: str = "runs/train/metrics.jsonl"
    metrics_address: str = ""  # host:port of a Prometheus /metrics endpoint ("" = none; port 0 = any free one)
    tensorboard_dir: str = ""  # also write TensorBoard scalars here (needs the `tb` extra: tensorboardX)
    progress: bool = True  # tqdm bar on stderr
    seed: int = 0
    embedding: str = ""  # target embedding [V, H]: .npy, or .safetensors (key `embedding_key`)
    embedding_key: str = "model.embed_tokens.weight"
    init_from: str = ""  # start from an EAGLE3 HF dir (e.g. trained by SpecForge) instead of random
    vocab_counts: str = ""  # draft_vocab_size < V: token counts [V] (.npy); "" = count the first traces
    head_init: str = "random"  # random | target: lm_head/norm from the target, fc passes its top aux layer through
    publish_initial: bool = False  # publish version 1 as soon as the draft vocabulary is fixed, before training
    # several trainer processes: how long the hosts wait for one short of traces before it steps with masked rows
    host_deadline_s: float = 10.0

    def __post_init__(self):
        if min(self.max_steps, self.traces_per_step, self.sync_every) < 0 or self.min_traces < 1 or self.log_every < 1:
            raise ValueError("max_steps, traces_per_step, sync_every must be >= 0; min_traces, log_every >= 1")
        if self.head_init not in ("random", "target"):
            raise ValueError("head_init must be random or target")
        if self.sync_policy not in ("fixed", "adaptive"):
            raise ValueError("sync_policy must be fixed or adaptive")
        if self.sync_max_steps < 0 or self.sync_gain < 0:
            raise ValueError("sync_max_steps and sync_gain must be >= 0")


@dataclasses.dataclass
class TrainerConfig:
    target: str = ""  # the target's HF directory: model.*, limits.* and loop.embedding are derived from it
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    limits: TraceLimits = dataclasses.field(default_factory=TraceLimits)
    buffer: BufferConfig = dataclasses.field(default_factory=BufferConfig)
    model: DraftConfig = dataclasses.field(default_factory=DraftConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    weight_sync: WeightSyncConfig = dataclasses.field(default_factory=WeightSyncConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)

    DERIVED_FROM = "target"

    @staticmethod
    def derived_keys(get) -> tuple[dict, dict, dict]:
        """Facts and defaults `bridge.config` fills in (a conflicting key is refused by name):
        - with `target:` set, the draft's shape, RoPE and norm eps come from the target's config.json,
          and the frozen embedding from its weights (a default: any loop.embedding given wins);
        - always, the ingest's `limits.vocab_size` and `limits.target_hidden_size` are the draft's
          `model.vocab_size` and target width (a trace the draft cannot train on is refused at the door)."""
        path = get("target")
        facts, defaults, sources = {}, {}, {}
        if path:
            hf = read_target_config(path)
            facts = {f"model.{k}": v for k, v in draft_fields_from_target(hf).items()}
            defaults = {"loop.embedding": weights_file(path, "model.embed_tokens.weight")}
            sources = {k: f"the target's config.json ({path})" for k in facts}
            sources["loop.embedding"] = f"the target's weights ({path})"
        model = {f.name: f.default for f in dataclasses.fields(DraftConfig)}
        for name in ("vocab_size", "hidden_size", "target_hidden_size"):
            given = facts.get(f"model.{name}", get(f"model.{name}"))
            model[name] = int(given) if given not in (None, "") else model[name]
        facts["limits.vocab_size"] = model["vocab_size"]
        facts["limits.target_hidden_size"] = model["target_hidden_size"] or model["hidden_size"]
        sources["limits.vocab_size"] = "model.vocab_size"
        sources["limits.target_hidden_size"] = "the draft's target width (model.target_hidden_size or hidden_size)"
        return facts, defaults, sources

    @property
    def trace_limits(self) -> TraceLimits:
        """What the trainer's ingest enforces: `limits` with the draft's vocabulary and target width."""
        return dataclasses.replace(self.limits, vocab_size=self.model.vocab_size, target_hidden_size=self.model.ht)

    def __post_init__(self):
        if self.limits.vocab_size != self.model.vocab_size or self.limits.target_hidden_size not in (0, self.model.ht):
            raise ValueError(f"limits.vocab_size={self.limits.vocab_size} and limits.target_hidden_size="
                             f"{self.limits.target_hidden_size} must be the draft's model.vocab_size="
                             f"{self.model.vocab_size} and target width {self.model.ht} (leave them out: derived)")
        if self.loop.head_init == "target" and not self.target:
            raise ValueError("loop.head_init=target needs `target` (the target's HF directory)")
        judged = [k for k, on in (("guard.gate", self.guard.gate),
                                  ("loop.sync_policy=adaptive", self.loop.sync_policy == "adaptive")) if on]
        if judged and self.buffer.holdout_fraction <= 0:
            raise ValueError(f"{' and '.join(judged)} judge candidates on held-out traffic: set buffer.holdout_fraction "
                             f"(e.g. 0.1)")
        if self.batch.rows % max(self.mesh.data, 1):
            raise ValueError(f"batch.rows={self.batch.rows} must be a multiple of mesh.data={self.mesh.data}")
        if self.mesh.num_processes > 1:
            if self.mesh.data % self.mesh.num_processes:
                raise ValueError(f"mesh.data={self.mesh.data} must be 0 (every device) or a multiple of mesh.num_processes="
                                 f"{self.mesh.num_processes} (every process holds part of the data axis)")
            if self.batch.rows % self.mesh.num_processes:
                raise ValueError(f"batch.rows={self.batch.rows} must be a multiple of mesh.num_processes="
                                 f"{self.mesh.num_processes} (each process packs its share of the rows)")
            # Held-out and served statistics are per host (each sees its share of traffic); judging on
            # them needs them agreed first, which is not built: one trainer process for these.
            local = [k for k, on in (("guard.gate", self.guard.gate), ("guard.rollback", self.guard.rollback),
                                     ("loop.sync_policy=adaptive", self.loop.sync_policy == "adaptive")) if on]
            if local:
                raise ValueError(f"{', '.join(local)}: not supported with mesh.num_processes="
                                 f"{self.mesh.num_processes} (decided from host-local traffic); use one trainer process")
