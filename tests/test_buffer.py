import os
import threading

import numpy as np
import pytest

from aurora_jax.buffer import _HDR, BufferConfig, BufferFull, ReplayBuffer, _aligned
from bridge.traces import encode
from tests.conftest import make_trace
from tests.test_wire import assert_traces_equal


def put(buf, trace):
    return buf.put(encode(trace), trace)


def cfg(tmp_path, **kw):
    return BufferConfig(spool_dir=str(tmp_path / "spool"), **kw)


@pytest.mark.parametrize("fsync,direct_io", [("always", True), ("group", True), ("none", True), ("group", False)])
def test_recovers_unconsumed_after_reopen(tmp_path, fsync, direct_io):
    buf = ReplayBuffer(cfg(tmp_path, fsync=fsync, direct_io=direct_io))
    traces = [make_trace(i) for i in range(10)]
    seqs = [put(buf, t) for t in traces]
    assert seqs == list(range(1, 11))
    buf.consume(seqs[:4])
    buf.close()
    buf2 = ReplayBuffer(cfg(tmp_path, fsync=fsync, direct_io=direct_io))
    got = buf2.entries()
    assert [e.seq for e in got] == seqs[4:]
    for e, t in zip(got, traces[4:]):
        assert_traces_equal(e.trace, t)
    assert put(buf2, make_trace(99)) == 11  # seqs keep increasing across restarts
    buf2.close()


def test_torn_tail_is_dropped_and_appends_continue(tmp_path):
    buf = ReplayBuffer(cfg(tmp_path))
    for i in range(3):
        put(buf, make_trace(i))
    buf.close()
    seg = sorted((tmp_path / "spool").glob("seg-*.log"))[-1]
    size = seg.stat().st_size
    with open(seg, "ab") as f:  # a crash in the middle of writing record 4
        f.write(b"AUR1" + b"\x04" * 20)
    buf2 = ReplayBuffer(cfg(tmp_path))
    assert len(buf2.entries()) == 3 and seg.stat().st_size == size
    put(buf2, make_trace(3))
    buf2.close()
    assert [e.seq for e in ReplayBuffer(cfg(tmp_path)).entries()] == [1, 2, 3, 4]


def test_consumed_segments_are_deleted(tmp_path):
    c = cfg(tmp_path, segment_bytes=20_000)  # a few traces per segment
    buf = ReplayBuffer(c)
    seqs = [put(buf, make_trace(i)) for i in range(12)]
    n_segs = len(list((tmp_path / "spool").glob("seg-*.log")))
    assert n_segs >= 3
    buf.consume(seqs[:-1])
    assert len(list((tmp_path / "spool").glob("seg-*.log"))) < n_segs
    buf.close()
    buf2 = ReplayBuffer(c)
    assert [e.seq for e in buf2.entries()] == seqs[-1:]
    buf2.consume(seqs[-1:])
    buf2.close()
    buf3 = ReplayBuffer(c)  # every record consumed: nothing comes back, seqs are not reused
    assert buf3.entries() == [] and put(buf3, make_trace(50)) == seqs[-1] + 1
    buf3.close()


def test_backpressure_when_full_and_eviction_of_used(tmp_path):
    buf = ReplayBuffer(cfg(tmp_path, capacity_traces=3, evict_after_uses=1, max_reuse=10))
    for i in range(3):
        put(buf, make_trace(i))
    with pytest.raises(BufferFull) as e:
        put(buf, make_trace(3))
    assert e.value.retry_after_ms > 0 and "replay buffer full" in str(e.value)
    assert buf.snapshot_stats()["backpressured"] == 1
    assert len(buf.entries()) == 3  # the refused trace was not written
    buf.sample(1, np.random.default_rng(0))  # one trace used once -> evictable
    put(buf, make_trace(3))
    assert len(buf.entries()) == 3
    buf.close()
    assert len(ReplayBuffer(cfg(tmp_path)).entries()) == 3  # the evicted one is marked consumed


def test_byte_capacity(tmp_path):
    t = make_trace(0)
    buf = ReplayBuffer(cfg(tmp_path, capacity_bytes=int(t.nbytes * 2.5)))
    put(buf, t)
    put(buf, make_trace(1))
    with pytest.raises(BufferFull) as e:
        put(buf, make_trace(2))
    assert e.value.retry_after_ms > 0  # room will come
    with pytest.raises(BufferFull, match="can never fit") as e:
        put(buf, make_trace(3, num_tokens=400))
    assert e.value.retry_after_ms == 0  # no point retrying
    buf.close()


def test_sampling_prefers_fresh_and_drops_stale(tmp_path):
    buf = ReplayBuffer(cfg(tmp_path, staleness_tau=1.0, max_staleness=5, max_reuse=1000))
    for i in range(20):
        put(buf, make_trace(i, draft_version=0 if i < 10 else 4))
    rng = np.random.default_rng(0)
    versions = [e.trace.draft_version for _ in range(200) for e in buf.sample(1, rng, current_version=4)]
    assert versions.count(4) > 0.9 * len(versions)  # weight ratio e^-4 for the old ones
    buf.sample(1, rng, current_version=6)  # lag 6 > max_staleness for version 0
    assert all(e.trace.draft_version == 4 for e in buf.entries())
    assert buf.snapshot_stats()["evicted_stale"] == 10
    buf.close()


def test_staleness_off_keeps_old_traces_and_weighs_them_alike(tmp_path):
    """staleness_tau 0 and max_staleness 0: a trace 40 versions old is drawn as often as a fresh one
    and never dropped (where traffic is scarce, old traces are still good data)."""
    buf = ReplayBuffer(cfg(tmp_path, staleness_tau=0.0, max_staleness=0, max_reuse=10**6))
    for i in range(20):
        put(buf, make_trace(i, draft_version=0 if i < 10 else 40))
    rng = np.random.default_rng(0)
    versions = [e.trace.draft_version for _ in range(400) for e in buf.sample(1, rng, current_version=40)]
    assert 0.4 < versions.count(0) / len(versions) < 0.6
    assert len(buf.entries()) == 20 and buf.snapshot_stats()["evicted_stale"] == 0
    buf.close()


def test_max_reuse_consumes(tmp_path):
    buf = ReplayBuffer(cfg(tmp_path, max_reuse=2))
    put(buf, make_trace(0))
    rng = np.random.default_rng(0)
    assert len(buf.sample(4, rng)) == 1 and len(buf.sample(4, rng)) == 1
    assert buf.sample(4, rng) == [] and buf.snapshot_stats()["consumed"] == 1
    buf.close()


def test_concurrent_writers_group_commit(tmp_path):
    buf = ReplayBuffer(cfg(tmp_path, fsync="group", segment_bytes=200_000))
    calls = []
    real_fsync = os.fsync
    os.fsync = lambda fd: (calls.append(fd), real_fsync(fd))[1]
    try:
        threads = [threading.Thread(target=lambda k=k: [put(buf, make_trace(i, seed=k)) for i in range(10)])
                   for k in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        os.fsync = real_fsync
    assert len(buf.entries()) == 80
    assert sorted(e.seq for e in buf.entries()) == list(range(1, 81))
    assert 0 < len(calls) <= 80  # never more than one fsync per record
    buf.close()
    assert len(ReplayBuffer(cfg(tmp_path)).entries()) == 80


def test_deferred_consumption_commits_with_each_checkpoint_and_replays_the_rest(tmp_path):
    """The trainer's mode: marks reach consumed.log only when committed (with a checkpoint). Several
    commits over small segments, then a crash: committed traces are gone, uncommitted ones replay."""
    c = cfg(tmp_path, segment_bytes=20_000)
    buf = ReplayBuffer(c, defer_consume=True)
    seqs = [put(buf, make_trace(i)) for i in range(12)]
    segments = lambda: len(list((tmp_path / "spool").glob("seg-*.log")))  # noqa: E731
    n_segs = segments()
    assert n_segs >= 3
    for ckpt in (seqs[:4], seqs[4:8]):  # two checkpoints, each covering what was consumed before it
        buf.consume(ckpt)
        marks = buf.take_consumed()
        assert sorted(m.seq for m in marks) == ckpt and buf.take_consumed() == []
        buf.commit_consumed(marks)
    assert segments() < n_segs  # fully committed segments are collected
    buf.consume(seqs[8:10])  # consumed after the last checkpoint: not committed
    assert [e.seq for e in buf.entries()] == seqs[10:]
    buf.close()  # (a crash: the marks of seqs[8:10] were never committed)
    buf2 = ReplayBuffer(c, defer_consume=True)
    assert [e.seq for e in buf2.entries()] == seqs[8:]
    buf2.consume(seqs[8:])
    buf2.commit_consumed(buf2.take_consumed())
    buf2.close()
    buf3 = ReplayBuffer(c)
    assert buf3.entries() == [] and put(buf3, make_trace(50)) == seqs[-1] + 1
    buf3.close()


def test_every_acknowledged_put_is_covered_by_an_fsync(tmp_path, monkeypatch):
    """fsync=group: when put returns, an fsync issued after its write has completed (one writer: one
    fsync per put)."""
    import aurora_jax.buffer as buffer_mod

    synced = []
    real = os.fsync
    monkeypatch.setattr(buffer_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    buf = ReplayBuffer(cfg(tmp_path, fsync="group"))
    for i in range(5):
        before = len(synced)
        put(buf, make_trace(i))
        assert len(synced) == before + 1, i
    buf.close()


def test_recovery_collects_segments_whose_marks_were_written_before_a_crash(tmp_path):
    """A crash between writing consumption marks and deleting the segments they empty: the next
    start deletes them (and keeps the newest, whose name holds the sequence numbers)."""
    import struct

    c = cfg(tmp_path, segment_bytes=20_000)
    buf = ReplayBuffer(c)
    seqs = [put(buf, make_trace(i)) for i in range(12)]
    buf.close()
    spool = tmp_path / "spool"
    n_segs = len(list(spool.glob("seg-*.log")))
    with open(spool / "consumed.log", "ab") as f:  # the marks reached disk; the unlinks did not happen
        f.write(b"".join(struct.pack("<Q", s) for s in seqs[:-1]))
    buf2 = ReplayBuffer(c)
    assert [e.seq for e in buf2.entries()] == seqs[-1:]
    assert len(list(spool.glob("seg-*.log"))) < n_segs
    buf2.close()


@pytest.mark.parametrize("offset,flip", [(10, 0xFF), (200, 0x80), (147, 0x01), (490, 0x80)])
def test_any_corrupted_byte_is_detected(tmp_path, offset, flip):
    """Whichever way a flip moves the checksum (the first two up, the last two down for this
    record), the record is refused."""
    buf = ReplayBuffer(cfg(tmp_path))
    put(buf, make_trace(0))
    put(buf, make_trace(1))
    buf.close()
    seg = sorted((tmp_path / "spool").glob("seg-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    data[_aligned(_HDR.size + len(encode(make_trace(0)))) + _HDR.size + offset] ^= flip
    seg.write_bytes(bytes(data))
    assert [e.seq for e in ReplayBuffer(cfg(tmp_path)).entries()] == [1]


def test_staleness_weight_is_exp_of_minus_lag_over_tau(tmp_path):
    """tau = 2, lag 4: an old trace weighs e^-2 of a fresh one (about 12% of 20 draws' worth),
    not e^-8 or e^-4."""
    buf = ReplayBuffer(cfg(tmp_path, staleness_tau=2.0, max_staleness=10, max_reuse=10**6))
    for i in range(20):
        put(buf, make_trace(i, draft_version=0 if i < 10 else 4))
    rng = np.random.default_rng(1)
    versions = [e.trace.draft_version for _ in range(400) for e in buf.sample(1, rng, current_version=4)]
    old = versions.count(0) / len(versions)
    assert 0.06 < old < 0.35, old
    buf.close()


def test_a_segment_reserves_disk_ahead_of_its_writes_not_a_whole_segment(tmp_path):
    """Blocks are reserved as a segment fills (so appends skip block allocation), not a whole
    256 MiB segment per buffer up front: with that, the suite's buffers took 15.6 GB a run and ran
    CI's disk out."""
    buf = ReplayBuffer(cfg(tmp_path))  # the default segment_bytes, 256 MiB
    for i in range(3):
        put(buf, make_trace(i))
    st = next((tmp_path / "spool").glob("seg-*.log")).stat()
    reserved = st.st_blocks * 512
    assert max(st.st_size, 1 << 20) < reserved <= 2 * st.st_size + (2 << 20)
    buf.close()
