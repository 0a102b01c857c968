"""Several trainer processes (JAX's distributed runtime, gloo collectives on CPU, loopback): two
processes x 2 devices, each with its own ingest and spool, against one process x 4 devices fed
every trace; then a SIGKILL of one process and `--resume` of both."""

from __future__ import annotations

import re
import signal
import time

import numpy as np
import pytest
import yaml

from apps.fleet import TrainerProcesses
from aurora_jax.batching import BatchConfig, pack
from aurora_jax.buffer import BufferConfig
from aurora_jax.config import LoopConfig, TrainerConfig
from aurora_jax.guard import GuardConfig
from aurora_jax.hosts import STEP, STOP, WAIT, agree
from aurora_jax.train import MeshConfig
from tests.conftest import wait_for
from tests.test_train_loop import HT, V, _push, _traces

pytestmark = pytest.mark.timeout(400)

CONFIG = dict(
    target="", ingest=dict(address="127.0.0.1:0"), weight_sync=dict(address="127.0.0.1:0"),
    buffer=dict(max_reuse=100000, max_staleness=100000, staleness_tau=1e9),
    model=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V,
               target_hidden_size=HT, draft_vocab_size=32),  # day 0 vocabulary: counted over both hosts' traces
    objective=dict(ttt_length=2), batch=dict(rows=4, lengths=[64], branch_slots=[0, 32], topk=2, pack=False),
    optim=dict(lr=1e-2, warmup_steps=1), checkpoint=dict(every=3, keep=1000),  # step 6 is read back later
    loop=dict(min_traces=4, sync_every=2, log_every=1, progress=False))


class Job(TrainerProcesses):
    """The trainer of CONFIG (or `config`) in `n` processes under tmp_path/name."""

    def __init__(self, tmp_path, name: str, n: int, devices: int, *overrides: str, resume: bool = False,
                 config: str = ""):
        if not config:
            (tmp_path / name).mkdir(exist_ok=True)
            config = tmp_path / name / "trainer.yaml"
            config.write_text(yaml.safe_dump(CONFIG))
        super().__init__(tmp_path / name, config, n, devices, overrides, resume=resume, heartbeat_timeout_s=5)


def _state(ckpt_dir, step: int) -> dict[str, np.ndarray]:
    """The trained parameters of a checkpoint, read back in this process as numpy."""
    import orbax.checkpoint as ocp
    from jax.tree_util import tree_flatten_with_path, keystr

    import jax

    path, one = ckpt_dir / str(step) / "state", jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = ocp.StandardCheckpointer().metadata(path)
    saved = getattr(saved, "item_metadata", saved)
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    tree = ocp.StandardCheckpointer().restore(path, like)
    params = tree["params"] if isinstance(tree, dict) else tree.params
    return {keystr(path): np.asarray(x) for path, x in tree_flatten_with_path(params)[0]}


def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path):
    traces = _traces(4)
    jobs = []  # stopped whatever happens, even if the second fails to start
    try:
        one = Job(tmp_path, "one", 1, 4, "loop.max_steps=6")  # the reference: every trace in one process
        jobs.append(one)
        two = Job(tmp_path, "two", 2, 2)  # until killed
        jobs.append(two)
        _push(one.addresses[0], traces)
        _push(two.addresses[0], traces[:2])  # the same traces, split between the two hosts' ingests;
        time.sleep(1.5)  # host 1's a little later: both wait for it (agreed), neither steps nor stops alone
        _push(two.addresses[1], traces[2:])
        (ref,) = one.finish()
        assert wait_for(lambda: len(two.metrics(0)) >= 7 and len(two.metrics(1)) >= 7, timeout=120), two.log(0)[-2000:]
        assert wait_for(lambda: (two.dir / "ckpt" / "6").is_dir(), timeout=60)  # orbax renames it in when complete

        # Equivalence: the same loss trajectory and parameters as one process on all the traces.
        a, b0, b1 = one.metrics(0)[:6], two.metrics(0)[:6], two.metrics(1)[:6]
        assert [r["step"] for r in a] == [r["step"] for r in b0] == list(range(1, 7))
        la, lb = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b0])
        assert la[-1] < 0.8 * la[0]  # it trains
        np.testing.assert_allclose(lb, la, rtol=1e-4)
        assert [r["loss"] for r in b1] == list(lb)  # both processes read the same global loss
        pa, pb = _state(one.dir / "ckpt", 6), _state(two.dir / "ckpt", 6)
        assert pa.keys() == pb.keys()
        diff = max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)
        assert diff < 1e-4, diff
        print(f"2x2 vs 1x4 devices: loss max relative difference {float(np.max(np.abs(lb / la - 1))):.2e}, "
              f"parameters max abs difference {diff:.2e} after 6 steps")
        # One publisher: process 0 (versions 1..3 over 6 steps), none from process 1.
        assert ref["draft_version"] == 3 and len(re.findall(r"published draft_version 3\b", two.log(0))) == 1
        assert "published draft_version" not in two.log(1) and "WeightSync listening" not in two.log(1)

        # A SIGKILL of one process stops the other (a failed collective, or JAX's runtime at the heartbeat
        # timeout), non-zero and without a hang.
        two.procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        two.procs[0].wait(timeout=60)
        assert two.procs[0].returncode != 0 and time.monotonic() - t0 < 20
        print(f"process 0 stopped {time.monotonic() - t0:.1f}s after process 1 was killed")
    finally:
        for job in jobs:
            job.kill()

    last = max(int(p.name) for p in (two.dir / "ckpt").iterdir() if p.name.isdigit())
    again = Job(tmp_path, "two", 2, 2, f"loop.max_steps={last + 2}", resume=True)
    try:
        digests = again.finish()
    finally:
        again.kill()
    assert [d["step"] for d in digests] == [last + 2] * 2
    assert digests[0]["params_digest"] == digests[1]["params_digest"]  # identical replicas on both hosts
    for i in range(2):  # each host's acknowledged traces came back from its own spool
        assert re.search(rf"resumed at step {last}, draft_version \d+; 2 traces in the buffer", again.log(i))


def test_the_hosts_agree_to_step_wait_or_stop_by_one_rule():
    rows = lambda *r: np.asarray(r, np.int64)  # noqa: E731  (traces held, ms waited, stop) per host
    assert agree(rows([2, 0, 0], [2, 0, 0]), 4, 10) == STEP  # each holds its share
    assert agree(rows([4, 9000, 0], [0, 9000, 0]), 4, 10) == WAIT  # one host short: wait for it ...
    assert agree(rows([4, 10000, 0], [0, 10, 0]), 4, 10) == STEP  # ... until the deadline, then pad it
    assert agree(rows([3, 60000, 0], [0, 60000, 0]), 4, 10) == WAIT  # never with fewer than min_traces in all
    assert agree(rows([9, 0, 0], [9, 0, 1]), 4, 10) == STOP  # one host stopping stops all


def test_a_host_with_nothing_packs_masked_rows_of_the_agreed_shape():
    cfg = BatchConfig(rows=2, lengths=[32, 64], branch_slots=[0, 32], topk=2)
    full, st, _ = pack(_traces(2), cfg, 2, np.arange(V, dtype=np.int32))
    empty, st0, _ = pack([], cfg, 2, np.arange(V, dtype=np.int32), at_least=st.shape, ht3=3 * HT)
    assert st0.shape == st.shape and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(full, empty))
    assert empty.loss_mask.sum() == 0 and empty.neg_mask.sum() == 0 and full.loss_mask.sum() > 0


def test_several_processes_refuse_what_is_decided_from_host_local_traffic():
    with pytest.raises(ValueError, match=r"guard.gate, loop.sync_policy=adaptive: not supported with mesh.num_processes=2"):
        TrainerConfig(mesh=MeshConfig(num_processes=2), guard=GuardConfig(gate=True),
                      loop=LoopConfig(sync_policy="adaptive"), buffer=BufferConfig(holdout_fraction=0.1))
    with pytest.raises(ValueError, match=r"mesh.data=1 must be 0 \(every device\) or a multiple of mesh.num_processes=2"):
        TrainerConfig(mesh=MeshConfig(num_processes=2, data=1))
    with pytest.raises(ValueError, match=r"batch.rows=3 must be a multiple of mesh.num_processes=2"):
        TrainerConfig(mesh=MeshConfig(num_processes=2), batch=BatchConfig(rows=3))


def test_three_engine_replicas_and_two_trainer_processes(tmp_path):
    """The serving fleet against a two-process trainer: each replica's traces spread over both
    ingests, every replica ends on the version process 0 published last, and a replica restarted
    mid-run has that version at once."""
    from serving.engine import DraftSource, Engine, EngineConfig
    from serving.spec_decode import SpecConfig
    from serving.target import TargetConfig
    from serving.trace_client import TraceClientConfig
    from serving.weight_sync import WeightSubscriberConfig

    job = Job(tmp_path, "fleet", 2, 1, "target=models/demo-target", "model.draft_vocab_size=512", "batch.rows=2",
              "batch.lengths=[128]", "batch.branch_slots=[0,64]", "objective.ttt_length=1", "loop.traces_per_step=0",
              "loop.sync_every=1", "buffer.max_reuse=1", "mesh.data=0", "weight_sync.address=127.0.0.1:0",
              config="configs/demo-trainer.yaml")

    def engine():
        return Engine(EngineConfig(
            target=TargetConfig(path="models/demo-target"), draft=DraftSource(mode="untrained", draft_vocab_size=512),
            spec=SpecConfig(topk=2, num_steps=2, num_draft_tokens=3), max_new_tokens=24, subscribe_weights=True,
            traces=TraceClientConfig(address=",".join(job.addresses), batch_size=1, backoff_initial_s=0.05),
            weights=WeightSubscriberConfig(address=job.weights)))

    engines, retired = [], []
    try:
        engines = [engine() for _ in range(3)]
        prompts = [engines[0].tokenizer(f"def f{i}(x):\n    return")["input_ids"] for i in range(4)]
        for e in engines:
            for p in prompts:
                e.complete(p)
        version = job.published
        assert wait_for(lambda: version() >= 2, timeout=120), job.log(0)[-2000:]
        retired.append(engines.pop(1))  # a replica restarted mid-run: the latest version at once
        retired[0].close()
        engines.insert(1, engine())
        v = version()
        assert wait_for(lambda: engines[1].subscriber.version >= v, timeout=5)
        for p in prompts[:2]:
            engines[1].complete(p)
        # the buffers drain (each trace used once): the last version is final; every replica serves it
        assert wait_for(lambda: all(not e.client.stats()["queued"] for e in engines), timeout=30)
        time.sleep(3)
        final = version()
        assert wait_for(lambda: [e.subscriber.version for e in engines] == [final] * 3, timeout=10), \
            ([e.subscriber.version for e in engines], final)
        acked = {a: sum(e.client.stats()["endpoints"][a]["acked"] for e in engines + retired) for a in job.addresses}
        assert all(e.client.stats()["acked"] > 0 for e in engines + retired) and min(acked.values()) > 0, acked
        assert sum(acked.values()) == 3 * 4 + 2
    finally:
        for e in engines:
            e.close()
        job.stop()
    summary = job.finish()
    assert summary[0]["params_digest"] == summary[1]["params_digest"]
