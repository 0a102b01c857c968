"""The draft model, tree attention, batch packing and the TTT objective against independent oracles."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from aurora_jax.batching import BatchConfig, pack
from aurora_jax.model import DraftConfig, Eagle3Draft, target_to_draft
from aurora_jax.objective import ObjectiveConfig, loss_fn, ttt_hidden
from bridge.synthetic import random_trace
from bridge.tensors import BF16
from bridge.traces import Trace, TreeStep

V, HT = 50, 16
CFG = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  vocab_size=V, target_hidden_size=HT)


def _model(seed=0, cfg=CFG):
    return Eagle3Draft(cfg, rngs=nnx.Rngs(seed))


def _pack(traces, depth, rows=1, lengths=(32,), slots=(0, 8, 32), model=None):
    to_draft = target_to_draft(np.asarray((model or _model()).d2t[...]), V)
    b, st, left = pack(traces, BatchConfig(rows=rows, lengths=list(lengths), branch_slots=list(slots), topk=4),
                       depth, to_draft)
    assert not left
    return b, st


_ttt_hidden = nnx.jit(ttt_hidden)


def _hidden(model, batch):
    return np.asarray(_ttt_hidden(model, jax.tree.map(jnp.asarray, batch)))


def reference_slots(model: Eagle3Draft, tr: Trace, D: int):
    """Draft hidden state of every slot by a per-node loop over the trace itself.

    Each slot's visible keys are listed explicitly (trunk slots 1..attach, its tree ancestors,
    itself); returns {(block, local): hidden} for a one-request row with L = len(tokens) - 1.
    """
    x, T = tr.tokens, tr.num_tokens
    L = T - 1
    aux = np.asarray(tr.aux_hidden.astype(BF16), np.float32)
    hd, g = CFG.hd, CFG.num_attention_heads // CFG.num_key_value_heads
    qkv, out = {}, {}

    def compute(key, token, pos, h_in, visible):
        q, k, v, res = model.layer_in(jnp.asarray([[token]]), jnp.asarray(h_in)[None, None], jnp.asarray([[pos]]))
        qkv[key] = (np.asarray(q[0, 0]), np.asarray(k[0, 0]), np.asarray(v[0, 0]), res)
        keys = visible + [key]
        K = np.stack([qkv[k_][1] for k_ in keys])  # [n, Hkv, hd]
        Vv = np.stack([qkv[k_][2] for k_ in keys])
        o = np.zeros((CFG.num_attention_heads, hd), np.float32)
        for h in range(CFG.num_attention_heads):
            s = K[:, h // g] @ qkv[key][0][h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            o[h] = (p / p.sum()) @ Vv[:, h // g]
        out[key] = np.asarray(model.layer_out(jnp.asarray(o)[None, None], res)[0, 0])

    trunk = lambda upto: [(0, t - 1) for t in range(1, upto + 1)]
    for t in range(1, T):  # block 0: trunk slot t reads x_t and aux_{t-1}
        compute((0, t - 1), x[t], t, np.asarray(model.project(jnp.asarray(aux[t - 1]))), trunk(t - 1))
    for j in range(1, D):  # TTT chains
        for t in range(1, T - j):
            compute((j, t - 1), x[t + j], t + j, out[(j - 1, t - 1)], trunk(t) + [(i, t - 1) for i in range(1, j)])
    counter = [0] * D
    for step in tr.steps:  # rejected nodes, in the packer's order
        p, slot, anc = step.trunk_pos, {}, {}
        for n, (tok, par, acc) in enumerate(zip(step.tokens, step.parents, step.accepted)):
            d = 1 if par < 0 else slot[par][0] + 1 if par in slot else D + 1
            if acc:
                if d <= D - 1:
                    slot[n], anc[n] = (d, p - 1), [(i, p - 1) for i in range(1, d + 1)]
                continue
            parent_slot = (0, p - 1) if par < 0 else slot.get(par)
            if parent_slot is None or d > D - 1:
                continue
            key = (d, L + counter[d])
            counter[d] += 1
            ancestors = [] if par < 0 else anc[par]
            compute(key, tok, p + d, out[parent_slot], trunk(p) + ancestors)
            slot[n], anc[n] = key, ancestors + [key]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ttt_forward_matches_per_node_loop(seed):
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, request_id="r", num_tokens=int(rng.integers(12, 24)), prompt_len=4, hidden=HT, vocab=V,
                      num_steps=3, tree_nodes=5, hidden_dtype=np.float32)
    model = _model(seed)
    D = 3
    batch, _ = _pack([tr], D, lengths=(tr.num_tokens - 1,), slots=(0, 8, 32), model=model)
    got = _hidden(model, batch)
    ref = reference_slots(model, tr, D)
    assert len(ref) > tr.num_tokens  # trunk + chains + some rejected nodes
    for (j, i), h in ref.items():
        np.testing.assert_allclose(got[j, 0, i], h, rtol=2e-4, atol=2e-5, err_msg=f"slot block {j} local {i}")
    # every non-padding slot of the batch is covered by the reference
    assert int((batch.seg >= 0).sum()) == len(ref)


def _mask_trace(tokens=None, nodes=None):
    rng = np.random.default_rng(7)
    T = 16
    x = rng.integers(0, V, T).astype(np.int32)
    x = np.asarray(tokens, np.int32) if tokens is not None else x
    # step at trunk 6: node0 accepted (= x7), node1 rejected, node2 <- node1, node3 <- node1 (sibling), node4 <- node0
    nt = np.asarray(nodes if nodes is not None else [x[7], 11, 12, 13, 14], np.int32)
    step = TreeStep(6, nt, np.asarray([-1, -1, 1, 1, 0], np.int32), np.asarray([1, 0, 0, 0, 0], bool))
    ids = rng.integers(0, V, (T, 4)).astype(np.int32)
    return Trace("m", x, 4, rng.standard_normal((T, 3 * HT)).astype(np.float32), ids,
                 np.full((T, 4), -np.log(4), np.float32), [step])


def test_tree_mask_node_sees_only_trunk_prefix_and_ancestors():
    model, D = _model(), 3
    base = _mask_trace()
    L = base.num_tokens - 1

    def node2(tr):  # node 2 (depth 2, rejected parent node 1): block 2, first rejected slot
        batch, _ = _pack([tr], D, lengths=(L,), slots=(0, 8))
        return _hidden(model, batch)[2, 0, L + 0], _hidden(model, batch)

    h0, full0 = node2(base)
    x, nodes = base.tokens.copy(), base.steps[0].tokens.copy()

    def with_nodes(**changes):
        n = nodes.copy()
        for k, v in changes.items():
            n[int(k[1:])] = v
        return _mask_trace(x, n)

    def with_trunk(pos, tok):
        t = x.copy()
        t[pos] = tok
        return _mask_trace(t, [t[7], *nodes[1:]])

    # Not ancestors: the sibling (node 3), the other branch (node 4), trunk tokens past the attach point.
    for tr in (with_nodes(n3=(nodes[3] + 1) % V), with_nodes(n4=(nodes[4] + 1) % V), with_trunk(12, (x[12] + 1) % V)):
        np.testing.assert_array_equal(node2(tr)[0], h0)
    # Ancestors and the visible trunk change it.
    for tr in (with_nodes(n1=(nodes[1] + 1) % V), with_trunk(5, (x[5] + 1) % V), with_nodes(n2=(nodes[2] + 1) % V)):
        assert np.abs(node2(tr)[0] - h0).max() > 1e-4
    # and a changed sibling does change the sibling itself (the test above is not vacuous)
    _, full3 = node2(with_nodes(n3=(nodes[3] + 1) % V))
    assert np.abs(full3[2, 0, L + 1] - full0[2, 0, L + 1]).max() > 1e-4


def test_packing_several_requests_per_row_matches_one_per_row():
    rng = np.random.default_rng(3)
    trs = [random_trace(rng, request_id=f"r{i}", num_tokens=n, prompt_len=3, hidden=HT, vocab=V, num_steps=2,
                        tree_nodes=4) for i, n in enumerate([9, 12, 7])]
    model, D = _model(), 3
    packed, _ = _pack(trs, D, rows=1, lengths=(32,), slots=(0, 16))
    assert set(np.unique(packed.seg[0, 0])) == {-1, 0, 1, 2}
    hp = _hidden(model, packed)
    # the same requests one per row: the chain slots must agree exactly (padding / neighbours invisible)
    b1 = pack(trs, BatchConfig(rows=3, lengths=[32], branch_slots=[0, 16], topk=4, pack=False), D,
              target_to_draft(np.asarray(model.d2t[...]), V))[0]
    h1 = _hidden(model, b1)
    order = sorted(range(3), key=lambda i: -(trs[i].num_tokens))  # packer places longest first
    off = 0
    for row, i in enumerate(order):
        n = trs[i].num_tokens - 1
        valid = b1.seg[:, row, :n] >= 0  # chain slots that exist (padding values are arbitrary)
        assert (packed.seg[:, 0, off:off + n] >= 0).tolist() == valid.tolist()
        np.testing.assert_allclose(hp[:, 0, off:off + n][valid], h1[:, row, :n][valid], rtol=1e-5, atol=1e-6)
        off += n


def test_batch_shapes_come_from_buckets():
    rng = np.random.default_rng(4)
    model, shapes = _model(), set()
    for n in (10, 20, 30, 40, 60):
        tr = random_trace(rng, request_id="r", num_tokens=n, prompt_len=3, hidden=HT, vocab=V, num_steps=3, tree_nodes=6)
        b, st = _pack([tr], 3, lengths=(32, 64), slots=(0, 16, 64))
        shapes.add(b.tokens.shape)
        assert b.aux.shape[1] in (32, 64) and b.tokens.shape[2] - b.aux.shape[1] in (0, 16, 64)
    assert len(shapes) <= 3
    long = random_trace(rng, request_id="r", num_tokens=100, prompt_len=3, hidden=HT, vocab=V)
    b, st = _pack([long], 3, lengths=(32, 64), slots=(0, 16, 64))
    assert st.truncated == 1 and b.aux.shape[1] == 64


def test_loss_gradients_finite_and_every_parameter_trained():
    rng = np.random.default_rng(5)
    trs = [random_trace(rng, request_id=f"r{i}", num_tokens=20, prompt_len=4, hidden=HT, vocab=V, num_steps=3,
                        tree_nodes=5) for i in range(2)]
    model = _model()
    batch = jax.tree.map(jnp.asarray, _pack(trs, 3, rows=2, lengths=(32,))[0])
    grads = nnx.jit(nnx.grad(lambda m: loss_fn(m, batch, ObjectiveConfig(ttt_length=3, reject_weight=0.5))[0]))(model)
    flat = nnx.to_flat_state(grads)
    assert flat
    for path, v in flat:
        g = np.asarray(v.get_value())
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, f"no gradient reaches {path}"
    names = {".".join(map(str, p)) for p, _ in flat}
    assert not any("embed_tokens" in n or "d2t" in n or "t2d" in n for n in names)  # frozen / buffers


def test_vocab_pruning_maps_labels_into_the_draft_vocabulary():
    cfg = DraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                      vocab_size=V, draft_vocab_size=10, target_hidden_size=HT)
    model = _model(cfg=cfg)
    kept = np.arange(0, 50, 5)  # target ids 0, 5, ..., 45
    model.set_vocab(kept - np.arange(10))
    to_draft = target_to_draft(np.asarray(model.d2t[...]), V)
    assert to_draft[45] == 9 and to_draft[44] == -1 and bool(model.t2d[...][45]) and not bool(model.t2d[...][44])
    with pytest.raises(ValueError, match="distinct target ids"):
        model.set_vocab(-np.arange(10))  # every draft id onto target 0
    rng = np.random.default_rng(6)
    tr = random_trace(rng, request_id="r", num_tokens=20, prompt_len=4, hidden=HT, vocab=V, topk=4)
    b = pack([tr], BatchConfig(rows=1, lengths=[32], branch_slots=[0], topk=4), 2, to_draft)[0]
    ids = b.label_ids[b.label_ids >= 0]
    assert ids.size and ids.max() < 10
    loss, m = loss_fn(model, jax.tree.map(jnp.asarray, b), ObjectiveConfig(ttt_length=2))
    assert np.isfinite(float(loss))


def test_unlikelihood_counts_exactly_the_rejected_tokens_not_the_padding():
    """The reject term against numpy: mean over the traces' rejected nodes of -log(1 - q(token)) at
    the slot that proposed it, on a batch whose negative lists are padded (rows with different counts)."""
    rng = np.random.default_rng(7)
    trs = [random_trace(rng, request_id=f"u{i}", num_tokens=20, prompt_len=4, hidden=HT, vocab=V, num_steps=n,
                        tree_nodes=5) for i, n in enumerate((3, 1))]
    def depth(s, k):
        return 1 if s.parents[k] < 0 else 1 + depth(s, int(s.parents[k]))
    D = 3  # TTT steps: nodes deeper than D are never proposed at a trained slot
    n_rejected = sum(1 for t in trs for s in t.steps for k in range(len(s.tokens))
                     if not s.accepted[k] and depth(s, k) <= D)
    model = _model(3)
    batch, _ = _pack(trs, 3, rows=2, lengths=(32,))
    mask = np.asarray(batch.neg_mask)
    assert mask.sum() == n_rejected and (mask == 0).any()  # every rejected node once, and padding
    hs = _hidden(model, batch)  # [D, B, N, H] (checked against a per-node loop above)
    _, B, N, _ = hs.shape
    terms = []
    for b in range(B):
        for m in np.flatnonzero(mask[b]):
            slot, tok = int(batch.neg_slot[b, m]), int(batch.neg_tok[b, m])
            z = np.asarray(model.logits(jnp.asarray(hs[slot // N, b, slot % N])[None, None]), np.float64)[0, 0]
            q = np.exp(z[tok] - z.max()) / np.exp(z - z.max()).sum()
            terms.append(-np.log1p(-q))
    w = 0.5
    _, metrics = loss_fn(model, jax.tree.map(jnp.asarray, batch), ObjectiveConfig(ttt_length=3, reject_weight=w))
    np.testing.assert_allclose(float(metrics["unlikelihood"]), np.mean(terms), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]) - float(metrics["kl"]), w * np.mean(terms), rtol=1e-3)
    assert float(metrics["negatives"]) == n_rejected


def test_loss_and_metrics_against_numpy():
    """The KL term (target top-k renormalised, depth-weighted, masked), the acceptance proxy, the KL at
    rejected nodes and the tree-token count, each recomputed in float64 numpy from the per-slot hidden
    states (themselves checked against a per-node loop above)."""
    import dataclasses

    rng = np.random.default_rng(11)
    trs = [random_trace(rng, request_id=f"k{i}", num_tokens=22, prompt_len=5, hidden=HT, vocab=V, num_steps=3,
                        tree_nodes=5) for i in range(2)]
    # a top-k that holds 40-90% of the mass, as a real one does (so renormalising it matters)
    trs = [dataclasses.replace(t, target_logprobs=t.target_logprobs + np.log(rng.uniform(0.4, 0.9, (len(t.tokens), 1))))
           for t in trs]
    model, D, decay = _model(4), 3, 0.7
    batch, _ = _pack(trs, D, rows=1, lengths=(64,))  # both requests in one row: segments 0 and 1
    assert {0, 1} <= set(np.unique(batch.seg).tolist())
    hs = _hidden(model, batch)
    _, B, N, _ = hs.shape
    L = batch.aux.shape[1]
    logits = np.asarray(model.logits(jnp.asarray(hs)), np.float64)  # [D, B, N, Vd]
    logq = logits - logits.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    kl = np.zeros((D, B, N))
    for j, b, n in np.ndindex(D, B, N):
        ids, lp = batch.label_ids[j, b, n], batch.label_lp[j, b, n].astype(np.float64)
        ok = ids >= 0
        if batch.loss_mask[j, b, n] > 0 and ok.any():
            p = np.exp(lp[ok] - np.logaddexp.reduce(lp[ok]))
            kl[j, b, n] = np.sum(p * (np.log(p) - logq[j, b, n, ids[ok]]))
    w = decay ** np.arange(D)
    m = batch.loss_mask > 0
    kl_loss = sum(w[j] * kl[j].sum() / max(m[j].sum(), 1) for j in range(D)) / w.sum()
    acc_target = batch.acc_target.copy()  # make some predictions right, so the proxy is not just 1
    acc_target[:, 0, 1:4] = logq[:, 0, 1:4].argmax(-1)
    acc_target[0, 0, 6] = logq[0, 0, 6].argmax(-1)
    batch = batch._replace(acc_target=acc_target)
    correct = (logq.argmax(-1) == batch.acc_target) & m  # [D, B, N]
    run = np.cumprod(correct[:, :, :L], axis=0)
    start = m[0][:, :L]
    accept = np.where(start, 1 + run.sum(0), 0).sum() / max(start.sum(), 1)
    assert accept != round(accept)
    rej = batch.rejected & m
    assert rej.any() and (~m).any()  # rejected nodes and masked slots both present
    got = loss_fn(model, jax.tree.map(jnp.asarray, batch),
                  ObjectiveConfig(ttt_length=D, reject_weight=0.0, depth_decay=decay))[1]
    np.testing.assert_allclose(float(got["kl"]), kl_loss, rtol=1e-4)
    np.testing.assert_allclose(float(got["loss"]), kl_loss, rtol=1e-4)  # reject_weight 0: the KL alone
    np.testing.assert_allclose(float(got["accept_len"]), accept, rtol=1e-6)
    np.testing.assert_allclose(float(got["kl_rejected"]), kl[rej].sum() / rej.sum(), rtol=1e-4)
    assert float(got["tree_tokens"]) == (batch.seg >= 0).sum()
    for j in range(D):
        chain = m[j][:, :L]
        np.testing.assert_allclose(float(got[f"acc_d{j}"]), correct[j][:, :L].sum() / max(chain.sum(), 1), rtol=1e-6)


@pytest.mark.parametrize("kw,ok", [(dict(depth_decay=1.0), True), (dict(depth_decay=1.5), False),
                                   (dict(depth_decay=0.0), False), (dict(reject_weight=-0.1), False)])
def test_objective_config_bounds(kw, ok):
    if ok:
        ObjectiveConfig(**kw)
    else:
        with pytest.raises(ValueError, match="reject_weight must be >= 0 and depth_decay in"):
            ObjectiveConfig(**kw)


def test_loss_mask_starts_at_the_first_generated_token_and_skips_slots_without_labels():
    """train_on_prompt=False: the slot that predicts the first generated token (trunk slot P-1, row P-1
    of the target's top-k) is trained, the one before it is not; a slot whose target top-k lies wholly
    outside the draft vocabulary has nothing to learn (mask 0), while draft id 0 is a label like any."""
    import dataclasses

    rng = np.random.default_rng(13)
    P = 6
    tr = random_trace(rng, request_id="m", num_tokens=20, prompt_len=P, hidden=HT, vocab=V, num_steps=0)
    ids = tr.target_ids.copy()
    ids[P + 2] = [45, 46, 47, 48]  # row P+2: no token of the draft vocabulary below
    ids[P + 3] = [0, 46, 47, 48]  # row P+3: only target id 0 (draft id 0)
    tr = dataclasses.replace(tr, target_ids=ids)
    to_draft = np.where(np.arange(V) < 40, np.arange(V), -1).astype(np.int32)  # draft vocabulary: ids 0..39
    b, _, _ = pack([tr], BatchConfig(rows=1, lengths=[32], branch_slots=[0], topk=4), 1, to_draft, train_on_prompt=False)
    mask = b.loss_mask[0, 0]  # slot t - 1 holds trunk position t (row t: the token after it)
    assert mask[P - 2] == 1 and mask[P - 3] == 0  # positions P-1 (first generated) and P-2
    assert mask[P + 1] == 0 and mask[P + 2] == 1  # positions P+2 (no labels) and P+3 (draft id 0)
