"""The guard around publication: what reaches serving, and what is taken back.

A draft version reaches serving only if its parameters are finite and, with the gate on, its
acceptance proxy on the held-out slice (traffic the trainer never trained on, scored over its trees
as the loss scores them) is not worse than the served version's on the same traces. After that,
serving itself is the judge: every trace says which version drafted it and how many tokens each
target forward gave, so a version whose served acceptance falls below that of the versions before
it (a one-sided test on per-request acceptance lengths) is rolled back: the previous weights are
published again under a new, higher version number (versions only go up; weights may go back).

Why both: the proxy is early but can be fooled (poisoned or shifted traffic, a step that diverged);
serving's measurement is the truth but arrives only after requests were served with the version.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class GuardConfig:
    gate: bool = False  # evaluate each candidate on the held-out slice first (needs buffer.holdout_fraction > 0)
    gate_margin: float = 0.05  # refuse a candidate whose proxy is below the served version's by more than this
    gate_min_traces: int = 4  # a smaller held-out slice cannot judge: the candidate is published (and logged)
    rollback: bool = False  # take back a version that serves worse than the versions before it
    rollback_requests: int = 16  # K: requests of the new version, and of those before it, before a verdict
    rollback_margin: float = 0.1  # acceptance-length drop that counts as worse ...
    rollback_z: float = 2.0  # ... if the one-sided z score of the drop also exceeds this
    reset_on_rollback: bool = True  # the trainer continues from the weights it rolled back to

    def __post_init__(self):
        if self.gate_margin < 0 or self.rollback_margin < 0 or self.rollback_z < 0:
            raise ValueError("gate_margin, rollback_margin and rollback_z must be >= 0")
        if self.gate_min_traces < 1 or self.rollback_requests < 2:
            raise ValueError("gate_min_traces must be >= 1 and rollback_requests >= 2")


def finite(params) -> bool:
    """Every parameter finite (a NaN or Inf anywhere means this version is never published)."""
    leaves = jax.tree.leaves(params)
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))) if leaves else True


def copy_params(params):
    """A copy that outlives the train step (which donates the live state's buffers)."""
    return jax.tree.map(jnp.copy, params)


@dataclasses.dataclass
class Verdict:
    worse: bool
    current: float  # mean acceptance length per request of the version judged
    reference: float  # ... of the versions served before it
    z: float
    n_current: int
    n_reference: int


def served_worse(current: list[float], reference: list[float], cfg: GuardConfig) -> Verdict | None:
    """The rollback test. `current`: per-request acceptance lengths of the version judged; `reference`:
    those of the versions before it, newest first. None while either has fewer than K requests.
    Worse = the mean dropped by more than `rollback_margin` and the drop's z score (Welch: the two
    means' standard errors combined) exceeds `rollback_z`."""
    k = cfg.rollback_requests
    if len(current) < k or len(reference) < k:
        return None
    cur, ref = np.asarray(current, np.float64), np.asarray(reference[:4 * k], np.float64)
    drop = float(ref.mean() - cur.mean())
    se = math.sqrt(ref.var(ddof=1) / ref.size + cur.var(ddof=1) / cur.size)
    z = drop / se if se > 0 else (math.inf if drop > 0 else 0.0)
    return Verdict(drop > cfg.rollback_margin and z > cfg.rollback_z, float(cur.mean()), float(ref.mean()), z,
                   int(cur.size), int(ref.size))
