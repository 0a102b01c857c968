"""WeightSync over real loopback gRPC: versions arrive intact; corruption is refused, the old version stays."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from flax import nnx

from aurora_jax.config import WeightSyncConfig
from aurora_jax.model import Eagle3Draft
from aurora_jax.weight_sync import WeightPublisher, WeightSyncServer
from bridge.eagle3 import DraftConfig
from bridge.proto import aurora_pb2 as pb
from bridge.weights import SERVICE, VersionAssembler, WeightError, pack_version
from serving.eagle3 import Eagle3Draft as TorchDraft
from serving.weight_sync import WeightSubscriber, WeightSubscriberConfig
from tests.conftest import wait_for
from tests.test_bridge import BF16_ATOL, assert_serves_like_flax

CFG = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  vocab_size=60, target_hidden_size=16, param_dtype="bfloat16")


class _Engine:
    """What the serving engine does with a version: load it into its torch draft, atomically."""

    def __init__(self):
        self.draft = TorchDraft(CFG).to(torch.bfloat16)
        self.versions = []

    def swap(self, version, sd):
        missing, unexpected = self.draft.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"embed_tokens.weight", "d2t", "t2d"}, (missing, unexpected)
        self.versions.append(version)


def test_published_versions_arrive_intact_and_load_into_the_torch_draft():
    server = WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0", max_chunk_bytes=4096)).start()
    engine = _Engine()
    sub = WeightSubscriber(WeightSubscriberConfig(address=server.address), engine.swap).start()
    try:
        publish = WeightPublisher(server)
        models = [Eagle3Draft(CFG, rngs=nnx.Rngs(i)) for i in range(2)]
        for v, m in enumerate(models, start=1):
            publish(v, nnx.state(m))
            assert wait_for(lambda: sub.version == v), sub.last_error
            assert_serves_like_flax(m, engine.draft.state_dict(), atol=BF16_ATOL)  # the received weights compute it
        assert engine.versions == [1, 2] and sub.rejected == 0
        # a late subscriber gets the latest version at once
        late = []
        sub2 = WeightSubscriber(WeightSubscriberConfig(address=server.address, name="late"),
                                lambda v, sd: late.append(v)).start()
        assert wait_for(lambda: late == [2])
        sub2.close()
    finally:
        sub.close()
        server.stop(grace=0)


def _edit(chunk: bytes, fn) -> bytes:
    """A serialized chunk changed in transit: parse it, let `fn` change it, serialize it again."""
    c = pb.WeightChunk.FromString(chunk)
    fn(c)
    return c.SerializeToString()


def test_corrupted_chunk_is_rejected_and_the_previous_version_stays_active():
    good = {"w": np.arange(5000, dtype=np.float32)}
    v1 = pack_version(1, good, max_chunk=4096)
    v2 = pack_version(2, {"w": good["w"] + 1}, max_chunk=4096)
    v2[1] = _edit(v2[1], lambda c: setattr(c, "data", bytes([c.data[0] ^ 0xFF]) + c.data[1:]))  # digest as sent
    v3 = pack_version(3, {"w": good["w"] + 2}, max_chunk=4096)
    v3[-1] = _edit(v3[-1], lambda c: setattr(c, "digest", b"\x00" * 16))  # consistent chunks, wrong version digest

    def subscribe(request, context):
        yield from v1
        yield from v2
        yield from v3

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe, pb.SubscribeRequest.FromString, None)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    got = {}
    sub = WeightSubscriber(WeightSubscriberConfig(address=f"127.0.0.1:{port}"), lambda v, sd: got.update({v: sd})).start()
    try:
        assert wait_for(lambda: sub.rejected >= 2)
        assert list(got) == [1] and sub.version == 1
        assert torch.equal(got[1]["w"], torch.arange(5000, dtype=torch.float32))
        assert "weight version 3: the version digest over its 5 chunks does not match" in sub.last_error
    finally:
        sub.close()
        server.stop(0)
    asm = VersionAssembler()
    with pytest.raises(WeightError, match=r"weight version 2 chunk 1/\d+: xxh3-64 mismatch"):
        for c in v2:
            asm.add(c)
    a, b = pack_version(4, good, max_chunk=4096), pack_version(4, {"w": good["w"] * 2}, max_chunk=4096)
    mixed = [a[0], b[1], *a[2:]]  # a chunk replaced by one that is sound by itself
    with pytest.raises(WeightError, match="weight version 4: the version digest over its 5 chunks does not match"):
        asm = VersionAssembler()
        for c in mixed:
            asm.add(c)
    with pytest.raises(WeightError, match="out of sequence"):
        VersionAssembler().add(v1[1])


def test_weight_sync_requires_the_bearer_token(monkeypatch):
    monkeypatch.setenv("AURORA_W_TOKEN", "s3cret")
    server = WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0", auth_token="env:AURORA_W_TOKEN")).start()
    server.publish(1, {"w": np.ones(3, np.float32)})
    ok, bad = [], []
    s_ok = WeightSubscriber(WeightSubscriberConfig(address=server.address, auth_token="s3cret"),
                            lambda v, sd: ok.append(v)).start()
    s_bad = WeightSubscriber(WeightSubscriberConfig(address=server.address, auth_token="wrong"),
                             lambda v, sd: bad.append(v)).start()
    try:
        assert wait_for(lambda: ok == [1])
        assert wait_for(lambda: "UNAUTHENTICATED" in s_bad.last_error) and bad == []
    finally:
        s_ok.close()
        s_bad.close()
        server.stop(0)


def test_a_version_trained_for_another_draft_is_refused_and_the_served_one_stays():
    """The trainer sends its config.json with every version; a server running a draft that computes
    differently (here: another RoPE theta, then llama3 scaling) refuses it and says which field."""
    import dataclasses
    server = WeightSyncServer(WeightSyncConfig(address="127.0.0.1:0")).start()
    engine = _Engine()
    sub = WeightSubscriber(WeightSubscriberConfig(address=server.address), engine.swap, draft_config=CFG).start()
    try:
        m = Eagle3Draft(CFG, rngs=nnx.Rngs(0))
        WeightPublisher(server, CFG)(1, nnx.state(m))
        assert wait_for(lambda: sub.version == 1), sub.last_error
        WeightPublisher(server, dataclasses.replace(CFG, rope_theta=500000.0))(2, nnx.state(m))
        assert wait_for(lambda: sub.rejected == 1)
        assert "rope_theta" in sub.last_error and "(10000.0, 500000.0)" in sub.last_error
        scaled = dataclasses.replace(CFG, rope_scaling={"rope_type": "linear", "factor": 2.0})
        WeightPublisher(server, scaled)(3, nnx.state(m))
        assert wait_for(lambda: sub.rejected == 2) and "rope_scaling" in sub.last_error
        assert engine.versions == [1] and sub.version == 1
        WeightPublisher(server, CFG)(4, nnx.state(m))
        assert wait_for(lambda: sub.version == 4) and engine.versions == [1, 4]
    finally:
        sub.close()
        server.stop(0)


def test_serving_side_secrets_read_the_environment_as_the_trainer_does(monkeypatch):
    from serving.trace_client import TraceClient, TraceClientConfig

    monkeypatch.setenv("AURORA_TEST_TOKEN", "s3cret")
    assert WeightSubscriberConfig(auth_token="env:AURORA_TEST_TOKEN").metadata() == [("authorization", "Bearer s3cret")]
    monkeypatch.delenv("AURORA_TEST_TOKEN")
    with pytest.raises(ValueError, match=r"\$AURORA_TEST_TOKEN, which is not set"):
        TraceClient(TraceClientConfig(auth_token="env:AURORA_TEST_TOKEN"))
    with pytest.raises(ValueError, match=r"\$AURORA_TEST_TOKEN, which is not set"):
        WeightSubscriber(WeightSubscriberConfig(auth_token="env:AURORA_TEST_TOKEN"), lambda v, sd: None)


def test_a_version_whose_chunks_or_manifest_do_not_add_up_is_refused():
    """A chunk written past the announced size, a manifest naming more bytes than arrived, and data
    the manifest does not name: each refused by name, never a silent partial version."""
    good = {"w": np.arange(6000, dtype=np.float32)}
    v = pack_version(1, good, max_chunk=4096)
    past = pack_version(2, good, max_chunk=4096)
    past[1] = _edit(past[1], lambda c: setattr(c, "offset", c.total_bytes - 10))  # in range, past the end with its data
    with pytest.raises(WeightError, match=r"chunk 1/.*: data \[23990, 28086\) outside 24000 bytes"):
        asm = VersionAssembler()
        for c in past:
            asm.add(c)

    def with_manifest(shape):
        chunks = pack_version(3, good, max_chunk=1 << 20)
        assert len(chunks) == 1
        return _edit(chunks[0], lambda c: c.tensors[0].shape.__setitem__(slice(None), shape))
    with pytest.raises(WeightError, match="manifest exceeds the data at tensor 'w'"):
        VersionAssembler().add(with_manifest([6001]))
    with pytest.raises(WeightError, match="weight version 3: 4 bytes beyond the manifest"):
        VersionAssembler().add(with_manifest([5999]))
    asm = VersionAssembler()
    got = [asm.add(c) for c in v][-1]
    assert got[0] == 1 and np.array_equal(got[1]["w"], good["w"])


def test_a_long_running_trainers_version_numbers_assemble_and_the_manifest_rides_once():
    """Version numbers past 256 (CPython caches smaller ints, so an identity check passes below it)
    assemble across chunks; the manifest and the draft config travel in chunk 0 only."""
    good = {"w": np.arange(6000, dtype=np.float32), "b": np.ones((3, 4), np.float32)}
    for version in (257, 100_000):
        chunks = pack_version(version, good, max_chunk=4096, draft_config={"hidden_size": 32})
        heads = [pb.WeightChunk.FromString(c) for c in chunks]
        assert len(heads[0].tensors) == 2 and heads[0].draft_config
        assert all(not h.tensors and not h.draft_config for h in heads[1:]), "manifest repeated in later chunks"
        asm = VersionAssembler()
        got = [asm.add(c) for c in chunks][-1]
        assert got[0] == version and np.array_equal(got[1]["w"], good["w"]) and got[2] == {"hidden_size": 32}


def test_a_kernel_travels_in_the_trainers_layout_and_arrives_as_a_transposed_view():
    """A [in, out] kernel in torch layout is a transposed view: it is sent as its transpose's bytes (no
    contiguous copy on the trainer) and arrives as a transposed view of the received buffer."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((48, 80)).astype(np.float32)  # [in, out], as the trainer holds it
    sd = {"proj.weight": kernel.T, "norm.weight": np.ones(80, np.float32), "d2t": np.arange(3, dtype=np.int64)}
    chunks = pack_version(1, sd, max_chunk=1000)
    head = pb.WeightChunk.FromString(chunks[0])
    assert [(t.name, list(t.shape), t.transposed) for t in head.tensors] == [
        ("proj.weight", [80, 48], True), ("norm.weight", [80], False), ("d2t", [3], False)]
    asm = VersionAssembler()
    _, out, _ = [asm.add(c) for c in chunks][-1]
    assert out["proj.weight"].shape == (80, 48) and np.array_equal(out["proj.weight"], kernel.T)
    assert out["proj.weight"].base is not None and not out["proj.weight"].flags.c_contiguous  # a view
    assert np.array_equal(out["d2t"], sd["d2t"]) and np.array_equal(out["norm.weight"], sd["norm.weight"])
    bad = _edit(pack_version(2, {"t": np.zeros((2, 3, 4), np.float32)})[0],
                lambda c: setattr(c.tensors[0], "transposed", True))
    with pytest.raises(WeightError, match="'t' is marked transposed but has shape \\[2, 3, 4\\]"):
        VersionAssembler().add(bad)


def test_a_version_still_viewed_keeps_its_buffer_and_a_released_one_is_reused():
    import tracemalloc
    versions = {v: pack_version(v, {"w": np.full((512, 512), v, np.float32)}, max_chunk=1 << 16) for v in range(1, 5)}

    def assemble(asm, version):
        """The version's array, and the bytes allocated while assembling it."""
        tracemalloc.start()
        try:
            for chunk in versions[version]:
                out = asm.add(chunk)
            return out[1]["w"], tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    asm = VersionAssembler()
    held, _ = assemble(asm, 1)
    second, fresh = assemble(asm, 2)  # version 1 is still viewed: a new buffer
    assert fresh >= 1 << 20 and not np.shares_memory(held, second)
    np.testing.assert_array_equal(held, 1.0)
    del held, second  # the engine copied them into its draft
    third, reused = assemble(asm, 3)  # version 2's buffer, no new pages
    assert reused < 1 << 18, reused
    np.testing.assert_array_equal(third, 3.0)
    fourth, fresh = assemble(asm, 4)  # `third` still viewed: a new buffer again
    assert fresh >= 1 << 20
    np.testing.assert_array_equal(third, 3.0)
    np.testing.assert_array_equal(fourth, 4.0)
