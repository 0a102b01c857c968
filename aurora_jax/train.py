"""The optimizer step: one pure jitted function over (params, opt_state, frozen, batch), sharded
over a device mesh so the same code runs on 1 CPU, 8 GPUs or a TPU slice.

Why split the model: `nnx.split` separates trainable `Param`s (optimized, checkpointed with the
optimizer state) from the frozen target embedding and vocabulary maps, which are inputs to the
step (never closed over, or XLA would bake them into the executable as constants).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import xxhash
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aurora_jax.batching import Batch
from aurora_jax.model import DraftConfig, Eagle3Draft, flat_state, target_to_draft
from aurora_jax.objective import ObjectiveConfig, loss_fn
from aurora_jax.pallas_attention import select_attention
from aurora_jax.tree_attention import TreeMeta
from bridge.eagle3 import VOCAB_KEYS


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    schedule: Literal["constant", "cosine"] = "constant"  # online training never "ends": constant by default
    warmup_steps: int = 20
    total_steps: int = 10000  # cosine horizon
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global-norm clipping; 0 = off
    # > 0: publish, gate and export an exponential moving average of the weights (Polyak averaging,
    # debiased) instead of the last step's; training itself is unchanged. 0 = off.
    ema_decay: float = 0.0

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError("lr and total_steps must be positive, warmup_steps >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass
class MeshConfig:
    data: int = 0  # devices on the data axis; 0 = all visible devices (divided by `model`)
    model: int = 1  # devices on the model axis: lm_head's vocabulary dim is split over them
    fsdp: bool = False  # shard every parameter's hidden ("embed") dim over the data axis
    coordinator: str = ""  # multi-host: "host:port" of process 0 -> jax.distributed.initialize
    num_processes: int = 1
    process_id: int = 0
    heartbeat_timeout_s: int = 100  # several processes: a process silent this long is declared dead, the job stops


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1), cfg.total_steps,
                                                cfg.lr * cfg.min_lr_ratio)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
                                   optax.constant_schedule(cfg.lr)], [max(cfg.warmup_steps, 1)])
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on norms
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    parts = [tx]
    if cfg.clip_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.ema_decay > 0:
        parts.append(average_params(cfg.ema_decay))
    return optax.chain(*parts) if len(parts) > 1 else tx


class AverageParamsState(NamedTuple):
    count: jax.Array  # steps averaged since the optimizer state was made
    ema: Any  # sum over steps s of (1 - decay) * decay^(count - s) * params_s: debiased by `averaged`


def average_params(decay: float) -> optax.GradientTransformation:
    """Last in a chain: leaves the updates alone and keeps an exponential moving average of the
    parameters they lead to. Being optimizer state, the average is sharded like the parameters,
    checkpointed with the moments, and restarted with them (a rollback, `Learner.reset_params`)."""
    def init(params):
        return AverageParamsState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        return updates, AverageParamsState(optax.safe_increment(state.count),
                                           optax.incremental_update(new, state.ema, 1.0 - decay))
    return optax.GradientTransformation(init, update)


def averaged(opt_state, params, decay: float):
    """The debiased average held by `average_params` in `opt_state` (the parameters themselves
    before any step has been averaged)."""
    avg = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AverageParamsState))
               if isinstance(s, AverageParamsState))
    scale = 1.0 / (1.0 - decay ** avg.count.astype(jnp.float32))
    return jax.tree.map(lambda e, p: jnp.where(avg.count > 0, e * scale, p).astype(p.dtype), avg.ema, params)


def make_mesh(cfg: MeshConfig) -> Mesh:
    """The mesh over every process's devices. Several processes (mesh.coordinator): JAX's distributed
    runtime, before anything touches a device; CPU devices then reduce across processes with gloo."""
    if cfg.coordinator and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                                   shutdown_timeout_seconds=cfg.heartbeat_timeout_s)
    return mesh_of(jax.devices(), cfg.data, cfg.model)


def mesh_of(devices, data: int = 0, model: int = 1) -> Mesh:
    """A ("data", "model") mesh over the first data * model devices (data 0 = as many as fit)."""
    data = data or len(devices) // max(model, 1)
    if model < 1 or data < 1 or data * model > len(devices):
        raise ValueError(f"mesh.data={data} x mesh.model={model} but {len(devices)} devices are visible")
    return Mesh(np.asarray(devices[:data * model]).reshape(data, model), ("data", "model"))


def axis_rules(fsdp: bool) -> dict[str, str]:
    """Logical parameter axes (the model's partition metadata, `model._linear`) -> mesh axes."""
    return {"vocab": "model", **({"embed": "data"} if fsdp else {})}


def _param_spec(logical: P, shape: tuple, mesh: Mesh, rules: dict[str, str]) -> P:
    """A parameter's mesh axes: each logical axis by the rules, where the mesh axis has more than one
    device and divides that dim (otherwise that dim stays whole)."""
    axes = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axis = rules.get(name) if name is not None else None
        ok = axis is not None and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
        axes.append(axis if ok else None)
    while axes and axes[-1] is None:  # P("data") rather than P("data", None): one spelling per sharding
        axes.pop()
    return P(*axes)


def _batch_spec(name: str) -> P:
    return P(*[None] * Batch.row_axis(name), "data")


def _assign(tree, values: dict, what: str) -> None:
    """Set variables of an NNX state by flat path, each keeping its dtype, shape and sharding."""
    values = dict(values)
    for name, v in flat_state(tree).items():
        if name in values:
            old = v.get_value()
            new = np.asarray(values.pop(name))
            if new.shape != old.shape:
                raise ValueError(f"{name}: shape {new.shape} != {old.shape}")
            v.set_value(jax.device_put(jnp.asarray(new, old.dtype), old.sharding))
    if values:
        raise KeyError(f"no such {what}: {sorted(values)}")


class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # nnx.State of Params
    opt_state: Any


def sharded_attention(attention: Callable, mesh: Mesh) -> Callable:
    """Tree attention run per data shard. Rows never attend across rows, so each device can run the
    kernel on its own rows; XLA cannot partition a Pallas call by itself (Mosaic refuses to, and the
    Triton call would be all-gathered and computed whole on every GPU), so the step says it here."""
    if mesh.devices.size == 1:
        return attention
    rows = P("data")
    meta = TreeMeta(rows, rows, rows, rows)
    return jax.shard_map(lambda q, k, v, qm, km: attention(q, k, v, qm, km), mesh=mesh,
                         in_specs=(rows, rows, rows, meta, meta), out_specs=rows, check_vma=False)


def _make_step(graphdef, tx, objective: ObjectiveConfig, attention: Callable):
    def step(state: TrainState, rest, batch: Batch):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, objective, attention)
        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics
    return step


class _Plan(NamedTuple):
    """Everything about a step that follows from (model, objective, optimizer, mesh), whether the
    parameters exist yet or are only shapes (ahead-of-time compiles for another platform)."""
    graphdef: Any
    params: Any
    rest: Any
    tx: Any
    param_sharding: Any
    opt_sharding: Any
    replicated: NamedSharding
    batch_sharding: Batch
    step: Callable
    attention: Callable


def _plan(model: Eagle3Draft, objective: ObjectiveConfig, optim: OptimConfig, mesh: Mesh, fsdp: bool,
          attention: Callable | None, platform: str | None = None) -> _Plan:
    platform = platform or mesh.devices.flat[0].platform  # the kernel is chosen for the mesh's devices, not this host's
    attention = sharded_attention(attention or select_attention(objective.attention, platform), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rules = axis_rules(fsdp)
    param_sharding = jax.tree.map(lambda spec, x: NamedSharding(mesh, _param_spec(spec, x.shape, mesh, rules)),
                                  nnx.get_partition_spec(params), params)
    replicated = NamedSharding(mesh, P())
    tx = make_optimizer(optim)
    # Optimizer-state shardings: moments like their parameter, counters replicated (optax knows which
    # leaves of its state mirror the parameters). Explicit, so that the state fed to the first step
    # matches what the step returns (no second compile).
    opt_sharding = optax.tree_utils.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                                    param_sharding, transform_non_params=lambda _: replicated)
    batch_sharding = Batch(**{k: NamedSharding(mesh, _batch_spec(k)) for k in Batch._fields})
    return _Plan(graphdef, params, rest, tx, param_sharding, opt_sharding, replicated, batch_sharding,
                 _make_step(graphdef, tx, objective, attention), attention)


def lower_step(model_cfg: DraftConfig, objective: ObjectiveConfig, optim: OptimConfig, mesh: Mesh, fsdp: bool,
               batch: Batch, platform: str | None = None) -> jax.stages.Lowered:
    """The train step lowered ahead of time for `mesh` (which may be a compile-only topology, e.g.
    `jax.experimental.topologies.get_topology_desc("v5e:2x4", "tpu")`) at `batch`'s shapes
    (`batching.batch_shapes`); nothing is allocated. The Learner runs this same step. `platform`
    ("gpu") lowers for CUDA from a host mesh instead (no GPU needed; not compilable here)."""
    plan = _plan(nnx.eval_shape(lambda: Eagle3Draft(model_cfg, rngs=nnx.Rngs(0))), objective, optim, mesh, fsdp,
                 None, platform)
    shaped = lambda tree, shard: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=plan.replicated),
                       shaped(plan.params, plan.param_sharding),
                       shaped(jax.eval_shape(plan.tx.init, plan.params), plan.opt_sharding))
    rest = shaped(plan.rest, jax.tree.map(lambda _: plan.replicated, plan.rest))
    traced = jax.jit(plan.step, donate_argnums=(0,)).trace(state, rest, shaped(batch, plan.batch_sharding))
    return traced.lower(lowering_platforms=("cuda",)) if platform == "gpu" else traced.lower()


class Learner:
    """Owns the sharded train state and the compiled step for one draft model."""

    def __init__(self, model: Eagle3Draft, objective: ObjectiveConfig, optim: OptimConfig, mesh: Mesh,
                 fsdp: bool = False, attention=None):
        self.objective, self.mesh = objective, mesh
        plan = _plan(model, objective, optim, mesh, fsdp, attention)
        self.graphdef, self.tx, self.param_sharding = plan.graphdef, plan.tx, plan.param_sharding
        self.rest = jax.device_put(plan.rest, jax.tree.map(lambda _: plan.replicated, plan.rest))
        params = jax.device_put(plan.params, plan.param_sharding)
        self._init_opt = jax.jit(self.tx.init, out_shardings=plan.opt_sharding)
        opt_state = self._init_opt(params)
        self.state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), plan.replicated), params, opt_state)
        self._host_step = 0
        self.batch_sharding = plan.batch_sharding
        self._step = jax.jit(plan.step, donate_argnums=(0,))
        graphdef = self.graphdef
        self._published = (jax.jit(lambda opt_state, params: averaged(opt_state, params, optim.ema_decay))
                           if optim.ema_decay > 0 else None)
        self._proxy = jax.jit(lambda params, rest, batch: loss_fn(nnx.merge(graphdef, params, rest), batch, objective,
                                                                  plan.attention)[1]["accept_len"])
        self.rows_multiple = max(mesh.shape["data"] // jax.process_count(), 1)  # this process's rows
        self._index_vocab()

    def device_batch(self, batch: Batch) -> Batch:
        """Host numpy batch -> global arrays sharded over the data axis (multi-host aware)."""
        if batch.aux.shape[0] % self.rows_multiple:
            raise ValueError(f"batch rows {batch.aux.shape[0]} not divisible by this process's {self.rows_multiple} "
                             f"devices on the data axis")
        return Batch(*(jax.make_array_from_process_local_data(s, np.asarray(a))
                       for s, a in zip(self.batch_sharding, batch)))

    def train_step(self, batch: Batch) -> dict[str, jax.Array]:
        self.state, metrics = self._step(self.state, self.rest, self.device_batch(batch))
        self._host_step += 1
        return metrics

    @property
    def step(self) -> int:
        """Optimizer steps taken (a host counter: reading it never waits for the device)."""
        return self._host_step

    @property
    def compiled_shapes(self) -> int:
        """Distinct batch shapes compiled so far (bucketing keeps this small)."""
        return self._step._cache_size()

    def model(self, params=None) -> Eagle3Draft:
        """The current draft (or these `params` in it) as an NNX module (shares the arrays; do not mutate)."""
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.rest)

    def published_params(self):
        """The weights the trainer publishes, gates and exports: the moving average with
        optim.ema_decay > 0, else the last step's."""
        if self._published is None:
            return self.state.params
        return self._published(self.state.opt_state, self.state.params)

    def host_params(self) -> dict[str, np.ndarray]:
        """Flat {'midlayer.self_attn.q_proj.kernel': array, ...} of every variable as published, on the host."""
        return {k: np.asarray(jax.device_get(v.get_value()))
                for tree in (self.published_params(), self.rest) for k, v in flat_state(tree).items()}

    def params_digest(self) -> str:
        """xxh3-64 over this process's copy of every trained parameter (its first addressable shard
        of each): equal on every process when data-parallel replicas agree bit for bit."""
        h = xxhash.xxh3_64()
        for name, v in sorted(flat_state(self.state.params).items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(v.get_value().addressable_data(0)).tobytes())
        return h.hexdigest()

    def set_params(self, values: dict[str, np.ndarray]) -> None:
        """Replace trained parameters by flat path before the first step (optimizer moments are
        still zero there, so nothing else changes)."""
        if self._host_step:
            raise RuntimeError("set_params is for initialisation, before the first step")
        _assign(self.state.params, values, "parameters")

    def set_buffers(self, **values) -> None:
        """Replace non-trained variables by path (e.g. embed_tokens=...; before training starts)."""
        _assign(self.rest, values, "buffers")

    @property
    def vocab(self) -> dict[str, np.ndarray]:
        """The draft vocabulary maps as saved and exported: d2t [Vd] (draft id -> target id offset), t2d [V]."""
        return {k: np.asarray(self.rest[k].get_value()) for k in sorted(VOCAB_KEYS)}

    def set_vocab(self, d2t: np.ndarray, t2d: np.ndarray) -> None:
        """Fix the draft vocabulary (before training starts); `target_to_draft` follows it."""
        _assign(self.rest, dict(d2t=d2t, t2d=t2d), "buffers")
        self._index_vocab()

    def _index_vocab(self) -> None:
        """The packer's table from the vocabulary held: draft id of each target token, -1 outside it."""
        vocab = self.vocab
        self.target_to_draft = target_to_draft(vocab["d2t"], vocab["t2d"].shape[0])

    def proxy(self, batches: list[Batch], params=None) -> float:
        """The acceptance-length proxy of `params` (default: the published ones) over `batches`, each
        weighted by its scored trunk slots: what the loss would report, without a step."""
        params = self.published_params() if params is None else params
        total = weight = 0.0
        for b in batches:
            w = float((b.loss_mask[0][:, :b.aux.shape[1]] > 0).sum())
            if w:
                total += w * float(self._proxy(params, self.rest, self.device_batch(b)))
                weight += w
        return total / weight if weight else float("nan")

    def reset_params(self, params) -> None:
        """Continue from these parameters (e.g. rolled-back weights) with fresh optimizer moments."""
        params = jax.device_put(params, self.param_sharding)
        self.state = TrainState(self.state.step, params, self._init_opt(params))

    def restore(self, state: TrainState) -> None:
        self.state = state
        self._host_step = int(state.step)
