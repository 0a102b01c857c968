"""The trainer's processes agreeing with each other: one JAX process per host (the hosts of a TPU
pod slice, or GPU hosts), each with its own TraceIngest endpoint and spool, all stepping in
lockstep on one global batch assembled from their local rows.

Why agreement is explicit: every collective must be entered by every process, so each decision
that depends on host-local data (are there traces enough to step, which shape buckets, stop now)
is made from values every process has gathered, by the same rule, and so comes out the same on
every host. A host short of traces is waited for up to `loop.host_deadline_s`; past that it steps
with masked rows (zero loss weight), provided the hosts hold `loop.min_traces` between them. A
lost peer fails the next collective (JAX's runtime reports it at once on a closed connection, or at
its heartbeat timeout), and the survivors stop instead of hanging: see `loop.run_train`.
On one process every method is a no-op (nothing is gathered).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STEP, WAIT, STOP = "step", "wait", "stop"


class Hosts:
    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.count, self.index = jax.process_count(), jax.process_index()

    @property
    def primary(self) -> bool:
        """Process 0: the one that publishes weight versions."""
        return self.index == 0

    def gather(self, values) -> np.ndarray:
        """[count, ...]: every process's `values` (same shape and dtype on each), in process order."""
        values = np.asarray(values)
        return values[None] if self.count == 1 else np.asarray(multihost_utils.process_allgather(values))

    def decide(self, have: int, min_traces: int, waited_s: float, deadline_s: float, stop: bool) -> str:
        """STEP, WAIT or STOP, the same on every process. `have`: traces this host holds for training;
        `waited_s`: since this host's last step; `stop`: this host was asked to stop (SIGTERM)."""
        return agree(self.gather(np.asarray([have, round(1000 * waited_s), int(stop)], np.int64)), min_traces,
                     deadline_s)

    def shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        """The largest of every process's batch buckets: the shape all of them pack to."""
        return tuple(int(x) for x in self.gather(np.asarray(local, np.int64)).max(0))

    def token_counts(self, counts: np.ndarray) -> np.ndarray:
        """Token frequencies (int64, `token_frequencies`) summed over the hosts (the day-0 draft vocabulary
        is chosen from all traffic)."""
        if self.count == 1:
            return counts
        # gathered through JAX, whose integers are 32-bit here: send int64 counts as two 20-bit-split halves
        counts = np.asarray(counts, np.int64)
        high, low = self.gather(counts >> 20).astype(np.int64), self.gather(counts & ((1 << 20) - 1)).astype(np.int64)
        return ((high << 20) + low).sum(0)

    def replicated(self, tree):
        """`tree` with every array whole on every device, so that process 0 can read it (publishing
        FSDP-sharded parameters); a collective, entered by every process."""
        if self.count == 1:
            return tree
        rep = NamedSharding(self.mesh, P())
        return jax.jit(lambda t: t, out_shardings=jax.tree.map(lambda _: rep, tree))(tree)


def agree(gathered: np.ndarray, min_traces: int, deadline_s: float) -> str:
    """The rule every process applies to the same gathered rows [(traces held, ms waited, stop)]:
    stop if any host stops; step when every host holds its share of `min_traces`, or, once some host
    has waited `deadline_s`, when the hosts hold `min_traces` between them (the short ones pad with
    masked rows); else wait."""
    have, waited_ms, stop = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    if stop.any():
        return STOP
    if (have >= math.ceil(min_traces / len(have))).all():
        return STEP
    if have.sum() >= min_traces and waited_ms.max() >= 1000 * deadline_s:
        return STEP
    return WAIT
