"""Tree speculative decoding on a tiny random Llama: greedy output == target-only, traces are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aurora_jax.validate import TraceLimits, validate
from bridge.eagle3 import DraftConfig
from serving.eagle3 import Eagle3Draft
from serving.spec_decode import EagleDrafter, Node, SpecConfig, SpecDecoder
from serving.target import Target, TargetConfig
from tests.conftest import push_trace

V, H = 96, 32


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper distributions than the default init, so greedy paths are stable
        model.lm_head.weight.mul_(20.0)
    return Target(TargetConfig(topk=4), model=model)


def _draft(target, seed=1):
    torch.manual_seed(seed)
    d = Eagle3Draft(DraftConfig(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                vocab_size=V, target_hidden_size=H))
    d.embed_tokens.weight.data.copy_(target.model.model.embed_tokens.weight)
    return d.eval()


def _greedy_reference(target, prompt, n):
    with torch.no_grad():
        out = target.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class OracleDrafter(EagleDrafter):
    """A test double that knows the target's greedy continuation: proposes it as a chain of
    `depth` nodes plus random siblings, so long accepted paths and cache surgery get exercised."""

    def __init__(self, target, depth, siblings, seed=0):
        self.target, self.depth, self.siblings = target, depth, siblings
        self.rng = np.random.default_rng(seed)
        self.forwards = 0  # (EagleDrafter counts its draft forwards; this double runs none)

    def new_state(self):
        return None

    def propose_many(self, items):
        return [self.propose(*it) for it in items]

    def propose(self, tokens, aux, st):
        truth = _greedy_reference(self.target, tokens, self.depth)
        nodes, parent = [], -1
        for d, t in enumerate(truth, start=1):
            for _ in range(self.siblings):
                nodes.append(Node(int((t + 1 + self.rng.integers(V - 1)) % V), parent, d, -1.0))
            nodes.append(Node(t, parent, d, 0.0))
            parent = len(nodes) - 1
        if self.rng.random() < 0.3:  # sometimes a wrong token on the path: acceptance stops there
            k = self.rng.integers(len(nodes))
            nodes[k] = Node((nodes[k].token + 1) % V, nodes[k].parent, nodes[k].depth, nodes[k].score)
        return nodes


PROMPTS = [[5, 17, 33, 2, 71], [9, 9, 9, 40, 41, 42, 1, 0, 88]]


@pytest.mark.parametrize("topk,steps,ndt", [(1, 3, 3), (4, 5, 8), (2, 4, 6)])
def test_eagle_tree_greedy_output_equals_target_only(target, topk, steps, ndt):
    spec = SpecConfig(topk=topk, num_steps=steps, num_draft_tokens=ndt)
    dec = SpecDecoder(target, EagleDrafter(_draft(target), spec), spec, topk=4)
    for prompt in PROMPTS:
        r = dec.generate(prompt, 24)
        assert r.output == _greedy_reference(target, prompt, 24)
        validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))
        assert all(len(s.tokens) <= max(ndt, steps) for s in r.trace.steps)
        assert 1 + sum(r.accept_lengths) >= 24 and r.target_forwards == len(r.accept_lengths) + 1  # + prefill


class CraftedDrafter(OracleDrafter):
    """Every round the same crafted tree around the target's next two greedy tokens t0, t1:
        root ─ x  ─ t1     (x wrong: t1 sits under a rejected sibling, at the depth it is wanted)
             └ t0 ─ y      (y wrong)
    Greedy verification must accept t0 only (then emit t1 as the bonus), never x's child."""

    def propose(self, tokens, aux, st):
        t0, t1 = _greedy_reference(self.target, tokens, 2)
        x, y = (t0 + 1) % V, (t1 + 1) % V
        return [Node(x, -1, 1, -0.5), Node(t0, -1, 1, -1.0), Node(t1, 0, 2, -1.0), Node(y, 1, 2, -2.0)]


def test_greedy_acceptance_follows_parents_not_depths(target):
    dec = SpecDecoder(target, CraftedDrafter(target, 0, 0), SpecConfig(topk=2, num_steps=2, num_draft_tokens=4),
                      topk=4)
    for prompt in PROMPTS:
        r = dec.generate(prompt, 17)
        assert r.output == _greedy_reference(target, prompt, 17)
        assert r.accept_lengths == [2] * 8  # t0 accepted, y rejected, t1 the bonus: every round
        validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))
        for s in r.trace.steps:
            assert s.accepted.tolist() == [False, True, False, False]


@pytest.mark.parametrize("depth,siblings", [(4, 2), (6, 0)])
def test_long_accepted_paths_keep_the_cache_right(target, depth, siblings):
    spec = SpecConfig()
    dec = SpecDecoder(target, OracleDrafter(target, depth, siblings), spec, topk=4)
    prompt = PROMPTS[0]
    r = dec.generate(prompt, 30)
    assert r.output == _greedy_reference(target, prompt, 30)
    assert max(r.accept_lengths) == depth + 1 and np.mean(r.accept_lengths) > 2
    tr = r.trace
    validate(tr, TraceLimits(vocab_size=V, target_hidden_size=H))
    # aux hidden states and target distributions equal one plain forward over the final sequence
    with torch.no_grad():
        full = target.model(torch.tensor([tr.tokens.tolist()]), output_hidden_states=True)
    aux = torch.cat([full.hidden_states[i][0] for i in target.aux_layers], -1).numpy()
    np.testing.assert_allclose(tr.aux_hidden, aux, rtol=1e-4, atol=1e-4)
    assert (tr.target_ids[:, 0] == full.logits[0].argmax(-1).numpy()).all()
    for s in tr.steps:  # rejected nodes carry the target's distribution at that node
        assert len(s.target_nodes) == (~s.accepted).sum()


def test_eos_and_limit_cut_the_trace_consistently(target):
    prompt = PROMPTS[1]
    ref = _greedy_reference(target, prompt, 20)
    eos = ref[7]
    dec = SpecDecoder(target, OracleDrafter(target, 6, 1), SpecConfig(), topk=4)
    r = dec.generate(prompt, 20, eos=eos)
    assert r.output == ref[:ref.index(eos) + 1]
    validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))
    assert r.trace.num_tokens == len(prompt) + len(r.output)
    r = dec.generate(prompt, 5)
    assert r.output == ref[:5]
    validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))


def test_target_only_mode_exports_traces_without_steps(target, server_factory):
    dec = SpecDecoder(target, None, SpecConfig(), topk=4)
    r = dec.generate(PROMPTS[0], 12, request_id="no-draft-1")
    assert r.output == _greedy_reference(target, PROMPTS[0], 12)
    assert r.trace.steps == [] and r.accept_lengths == [1] * 11  # the prefill emits the first token
    # traces from both modes go through a real ingest server
    server = server_factory(limits=dict(vocab_size=V), model=dict(vocab_size=V, target_hidden_size=H))
    assert push_trace(server.address, r.trace).code == 0
    spec = SpecConfig()
    r2 = SpecDecoder(target, OracleDrafter(target, 3, 1), spec, topk=4).generate(PROMPTS[1], 12, request_id="tree-1")
    assert push_trace(server.address, r2.trace).code == 0
    stored = {e.trace.request_id: e.trace for e in server.buffer.entries()}
    assert stored["tree-1"].tokens.tolist() == r2.trace.tokens.tolist()
    assert [s.accepted.tolist() for s in stored["tree-1"].steps] == [s.accepted.tolist() for s in r2.trace.steps]


def test_hot_swap_mid_generation_keeps_greedy_output_and_labels_the_trace_with_the_oldest_version(target):
    spec = SpecConfig(topk=2, num_steps=3, num_draft_tokens=4)
    new = _draft(target, seed=7)
    new_sd = {k: v.clone() for k, v in new.state_dict().items() if k not in ("d2t", "t2d", "embed_tokens.weight")}

    class SwapAfter3(EagleDrafter):
        rounds = 0

        def propose_many(self, items):
            SwapAfter3.rounds += 1
            if SwapAfter3.rounds == 3:  # a new version arrives while the request is in flight
                dec.offer_swap(2, new_sd)
            return super().propose_many(items)

    drafter = SwapAfter3(_draft(target), spec)
    dec = SpecDecoder(target, drafter, spec, topk=4, draft_version=1)
    r = dec.generate(PROMPTS[0], 30)
    assert r.output == _greedy_reference(target, PROMPTS[0], 30)
    assert dec.draft_version == 2 and dec.swaps == 1 and 0 <= dec.last_swap_ms < 10_000
    assert r.trace.draft_version == 1  # labelled with the oldest version that drafted it, as on SGLang
    assert dec.generate(PROMPTS[1], 8).trace.draft_version == 2
    for k, v in new_sd.items():
        assert torch.equal(drafter.draft.state_dict()[k], v), k
    validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))


def test_speculative_sampling_matches_the_target_distribution():
    """Temperature 1 on a tiny vocabulary: the joint law of three sampled tokens (one from the
    prefill, two through a verified tree) matches the target's exact law (chi-square)."""
    from scipy.stats import chisquare

    torch.manual_seed(3)
    Vs = 6
    cfg = LlamaConfig(vocab_size=Vs, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # uneven but not degenerate distributions
    tgt = Target(TargetConfig(topk=2), model=model)
    torch.manual_seed(4)
    draft = Eagle3Draft(DraftConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                    vocab_size=Vs, target_hidden_size=16)).eval()
    spec = SpecConfig(topk=2, num_steps=2, num_draft_tokens=4)
    dec = SpecDecoder(tgt, EagleDrafter(draft, spec), spec, topk=2)
    prompt = [1, 4, 2]

    with torch.no_grad():  # exact P(x1, x2, x3) by enumeration
        def probs(seq):
            return torch.softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
        exact = {}
        p1 = probs(prompt)
        for a in range(Vs):
            p2 = probs(prompt + [a])
            for b in range(Vs):
                p3 = probs(prompt + [a, b])
                for c in range(Vs):
                    exact[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    n = 3000
    counts: dict = {}
    accepted = 0
    for first in range(0, n, 500):  # decoded as the engine batches them: rounds of 500 requests fused
        reqs = [dec.start(prompt, 3, temperature=1.0, seed=i) for i in range(first, first + 500)]
        while running := [r for r in reqs if not r.done]:
            dec.step_many(running)
        for r in map(dec.finish, reqs):
            counts[tuple(r.output)] = counts.get(tuple(r.output), 0) + 1
            accepted += sum(s.accepted.sum() for s in r.trace.steps)
    assert accepted > n * 0.2  # the tree really was used, not just the bonus token
    # cells with expected count < 5 are pooled into one
    keys = sorted(exact, key=lambda k: -exact[k])
    big = [k for k in keys if exact[k] * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [exact[k] * n for k in big] + [n - sum(exact[k] * n for k in big)]
    assert chisquare(obs, exp).pvalue > 1e-3, (obs, exp)


@pytest.mark.parametrize("drafted", [True, False])
def test_batched_requests_decode_as_if_alone(target, drafted):
    """Requests of different lengths and tree shapes share fused target forwards (padded caches and
    rounds); each one's output, trace and cache are what it gets alone."""
    spec = SpecConfig(topk=2, num_steps=3, num_draft_tokens=5)
    dec = SpecDecoder(target, EagleDrafter(_draft(target), spec) if drafted else None, spec, topk=4)
    prompts = PROMPTS + [[3] * 14, [60, 61]]
    reqs = [dec.start(p, 16 + 4 * i) for i, p in enumerate(prompts)]
    batches = []
    while not all(r.done for r in reqs):
        live = [r for r in reqs if not r.done]
        batches.append(len(live))
        dec.step_many(live)
    assert max(batches) == len(prompts) and dec.fused_requests == sum(batches)
    for i, (p, r) in enumerate(zip(prompts, reqs)):
        alone = dec.start(p, 16 + 4 * i)  # the oracle: the same request decoded by itself
        while not alone.done:
            dec.step(alone)
        for (k1, v1), (k2, v2) in zip(r.cache.entries(), alone.cache.entries(), strict=True):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)  # its own KV entries, no padding
            torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
        res, solo = dec.finish(r), dec.finish(alone)
        assert res.output == solo.output == _greedy_reference(target, p, 16 + 4 * i)
        validate(res.trace, TraceLimits(vocab_size=V, target_hidden_size=H))
        assert len(res.trace.steps) == (len(res.accept_lengths) if drafted else 0)
        a, b = res.trace, solo.trace
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.aux_hidden, b.aux_hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a.target_ids, b.target_ids)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, rtol=1e-5, atol=1e-5)
        assert len(a.steps) == len(b.steps)
        for x, y in zip(a.steps, b.steps):
            assert x.trunk_pos == y.trunk_pos
            for f in ("tokens", "parents", "accepted", "target_nodes", "target_ids"):
                np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


def test_fused_drafting_matches_per_request_drafting(target):
    """Requests at different points (fresh, several rounds in, different trunk lengths) drafted
    together: the same trees, scores and draft caches as drafting each alone."""
    import copy
    spec = SpecConfig(topk=3, num_steps=4, num_draft_tokens=7)
    drafter = EagleDrafter(_draft(target), spec)
    dec = SpecDecoder(target, drafter, spec, topk=4)
    reqs = [dec.start(p, 40) for p in PROMPTS + [[3] * 14, [60, 61]]]
    for _ in range(2):  # the first two advance a few rounds, so their caches and trunks differ
        dec.step_many(reqs[:2])
    solo_states = [copy.deepcopy(r.draft) for r in reqs]
    solo = [drafter.propose(r.tokens, r.aux, st) for r, st in zip(reqs, solo_states)]
    fused = drafter.propose_many([(r.tokens, r.aux, r.draft) for r in reqs])
    for a, b, sa, sb in zip(solo, fused, solo_states, (r.draft for r in reqs)):
        assert [(n.token, n.parent, n.depth) for n in a] == [(n.token, n.parent, n.depth) for n in b]
        np.testing.assert_allclose([n.score for n in a], [n.score for n in b], rtol=1e-4, atol=1e-4)
        assert sa.next_slot == sb.next_slot
        for x, y in zip(sa.cache, sb.cache):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_a_batched_round_drafts_the_batched_shape_and_stays_lossless(target):
    """spec.batched_num_steps / batched_num_draft_tokens: in a round of several requests each tree is
    the one the smaller shape gives alone (at most that deep and that many nodes); a request alone
    keeps the full shape; greedy outputs stay the target's own."""
    import copy
    spec = SpecConfig(topk=3, num_steps=4, num_draft_tokens=7, batched_num_steps=2, batched_num_draft_tokens=3)
    small = SpecConfig(topk=3, num_steps=2, num_draft_tokens=3)
    draft = _draft(target)
    drafter, alone_small = EagleDrafter(draft, spec), EagleDrafter(draft, small)
    dec = SpecDecoder(target, drafter, spec, topk=4)
    reqs = [dec.start(p, 24) for p in PROMPTS]
    dec.step_many(reqs)
    state = lambda r: copy.deepcopy(r.draft)  # noqa: E731  (proposing advances a request's draft cache)
    fused = drafter.propose_many([(r.tokens, r.aux, state(r)) for r in reqs])
    for r, tree in zip(reqs, fused):
        assert len(tree) == 3 and max(n.depth for n in tree) <= 2
        oracle = alone_small.propose(r.tokens, r.aux, state(r))
        assert [(n.token, n.parent, n.depth) for n in tree] == [(n.token, n.parent, n.depth) for n in oracle]
    assert len(drafter.propose(reqs[0].tokens, reqs[0].aux, state(reqs[0]))) == 7  # alone: the full shape
    while not all(r.done for r in reqs):
        dec.step_many([r for r in reqs if not r.done])
    for p, r in zip(PROMPTS, reqs):
        assert dec.finish(r).output == _greedy_reference(target, p, 24)
    with pytest.raises(ValueError, match="batched_num_steps and batched_num_draft_tokens must be >= 0"):
        SpecConfig(batched_num_steps=-1)


def _paths(nodes):
    """Each node as the token path from the root to it (a tree's content, whatever its node order)."""
    def path(i):
        return path(nodes[i].parent) + (nodes[i].token,) if i >= 0 else ()
    return {path(i): nodes[i].score for i in range(len(nodes))}


@pytest.mark.parametrize("min_prob", [0.02, 0.2])
def test_min_prob_keeps_exactly_the_likely_part_of_the_tree(target, min_prob):
    """spec.min_prob: the tree is the full-shape tree without its nodes below the floor (nothing likely
    is lost by not expanding unlikely nodes), fewer or equal draft forwards, same greedy output."""
    import copy
    full, gated = SpecConfig(topk=3, num_steps=4, num_draft_tokens=7), \
        SpecConfig(topk=3, num_steps=4, num_draft_tokens=7, min_prob=min_prob)
    draft = _draft(target, seed=3)
    with torch.no_grad():  # a confident draft, so both sides of the floor occur
        draft.lm_head.weight.mul_(8.0)
    dec = SpecDecoder(target, EagleDrafter(draft, full), full, topk=4)
    seen = set()
    for prompt in PROMPTS:
        r = dec.start(prompt, 40)
        for _ in range(6):
            a, b = EagleDrafter(draft, full), EagleDrafter(draft, gated)
            tree_full = a.propose(r.tokens, r.aux, copy.deepcopy(r.draft))
            tree_gated = b.propose(r.tokens, r.aux, copy.deepcopy(r.draft))
            want = {p: sc for p, sc in _paths(tree_full).items() if sc >= np.log(min_prob)}
            got = _paths(tree_gated)
            assert got.keys() == want.keys()
            assert b.forwards <= a.forwards
            seen.add(len(got) == len(tree_full)), seen.add(len(got) == 0)
            dec.step(r)
    assert True in seen and False in seen  # trees cut and left whole both occurred
    gated_dec = SpecDecoder(target, EagleDrafter(draft, gated), gated, topk=4)
    for prompt in PROMPTS:
        r = gated_dec.generate(prompt, 24)
        assert r.output == _greedy_reference(target, prompt, 24)
        validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))


def test_a_draft_below_min_prob_everywhere_decodes_one_token_per_forward(target):
    """Day 0: an untrained draft is never confident; with min_prob every round is a plain forward
    (one draft forward each, for its trunk cache) and the trace has no trees."""
    spec = SpecConfig(topk=4, num_steps=5, num_draft_tokens=8, min_prob=0.5)
    drafter = EagleDrafter(_draft(target), spec)
    dec = SpecDecoder(target, drafter, spec, topk=4)
    r = dec.generate(PROMPTS[0], 20)
    assert r.output == _greedy_reference(target, PROMPTS[0], 20)
    assert r.accept_lengths == [1] * 19 and r.trace.steps == [] and drafter.forwards == 19
    validate(r.trace, TraceLimits(vocab_size=V, target_hidden_size=H))


def test_fused_forward_matches_separate_forwards(target):
    """Logits, aux features and the kept KV entries of a padded batch equal per-request forwards."""
    a, b = [target.new_cache() for _ in range(2)]
    target.forward([1, 2, 3, 4, 5, 6, 7], a)
    target.forward([9, 8], b)
    tree = torch.zeros(3, 5, dtype=torch.bool)
    tree[:, :3] = True
    tree[1, 3] = tree[2, 4] = True  # two siblings under the root x_2
    items = [([11, 12], None, None), ([13, 14, 15], [2, 3, 3], tree)]
    import copy
    solo = [target.forward(ids, copy.deepcopy(c), pos, m) for (ids, pos, m), c in zip(items, (a, b))]
    want_caches = [copy.deepcopy(c) for c in (a, b)]
    for (ids, pos, m), c in zip(items, want_caches):
        target.forward(ids, c, pos, m)
    fused = target.forward_many([(ids, c, pos, m) for (ids, pos, m), c in zip(items, (a, b))])
    for (l1, x1), (l2, x2) in zip(solo, fused):
        torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x2, x1, atol=1e-4, rtol=1e-4)
    for got, want in zip((a, b), want_caches):
        for (kg, vg), (kw, vw) in zip(got.entries(), want.entries(), strict=True):
            assert kg.shape == kw.shape
            torch.testing.assert_close(kg, kw, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vg, vw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}])
def test_day0_draft_takes_the_targets_rope(scaling):
    """transformers 5 keeps rope_theta inside `rope_parameters`: the day-0 draft must still get the
    target's theta (not a 10000 fallback) and its llama3 scaling."""
    from serving.engine import DraftSource, build_draft
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
                      rope_scaling=dict(scaling) if scaling else None)  # transformers edits it in place
    draft = build_draft(DraftSource(mode="untrained"), Target(TargetConfig(), model=LlamaForCausalLM(cfg)))
    assert draft.cfg.rope_theta == 500000.0
    assert (draft.cfg.rope_scaling.to_hf() if draft.cfg.rope_scaling else None) == scaling


def test_acceptance_compares_token_ids_by_value_and_samples_at_the_requested_temperature():
    """`accept` alone, on hand-made rows. Greedy: token ids past CPython's small-int cache (an `is`
    comparison would reject them). Sampling at temperature 0.5: a lone child is accepted with the
    target's probability of it at that temperature, softmax(logits / 0.5), and never otherwise."""
    from serving.acceptance import accept

    V = 5000
    logits = torch.zeros(3, V)
    logits[0, 4321] = logits[2, 3777] = 5.0  # root -> 4321, then after node 1 -> 3777
    nodes = [Node(token=4000, parent=-1, depth=1, score=0.0), Node(token=4321, parent=-1, depth=1, score=0.0)]
    assert accept(logits, nodes, 0.0, None) == ([1], 3777)

    row = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = float(torch.softmax(row[0] / 0.5, -1)[0])  # 0.948; at temperature 2 (a swapped division) 0.475
    n, gen = 4000, torch.Generator().manual_seed(0)
    hits = sum(accept(row, [Node(token=0, parent=-1, depth=1, score=0.0)], 0.5, gen)[0] == [0] for _ in range(n))
    assert abs(hits / n - expected) < 4 * (expected * (1 - expected) / n) ** 0.5, (hits / n, expected)


def test_tree_nodes_sit_one_level_below_their_parent(target):
    """A node's depth is its parent's + 1 (the root's children at 1): it is the node's position offset
    in the target's tree pass, so one off shifts every drafted token's rotary phase (which the greedy
    tests above do not notice on this sharp toy target)."""
    spec = SpecConfig(topk=3, num_steps=4, num_draft_tokens=7)
    dec = SpecDecoder(target, EagleDrafter(_draft(target), spec), spec, topk=4)
    r = dec.start(PROMPTS[0], 20)
    f0 = dec.drafter.forwards
    nodes = dec.drafter.propose(r.tokens, r.aux, r.draft)
    assert dec.drafter.forwards - f0 == spec.num_steps  # one draft forward per level
    assert len(nodes) == 7 and 1 < max(n.depth for n in nodes) <= spec.num_steps
    for n in nodes:
        assert n.depth == (1 if n.parent < 0 else nodes[n.parent].depth + 1)
    _, positions, _, _ = dec._plan(r, nodes)
    q = len(r.tokens) - 1
    assert positions == [q] + [q + n.depth for n in nodes]


def test_an_older_version_offered_before_the_round_boundary_is_ignored(target):
    spec = SpecConfig(topk=2, num_steps=2, num_draft_tokens=3)
    sd = lambda seed: {k: v.clone() for k, v in _draft(target, seed=seed).state_dict().items()  # noqa: E731
                       if k not in ("d2t", "t2d", "embed_tokens.weight")}
    dec = SpecDecoder(target, EagleDrafter(_draft(target), spec), spec, topk=4, draft_version=1)
    newer, older = sd(5), sd(6)
    dec.offer_swap(3, newer)
    dec.offer_swap(2, older)  # arrives late (another stream): never replaces the newer one pending
    dec.generate(PROMPTS[0], 4)
    assert dec.draft_version == 3 and dec.swaps == 1
    assert all(torch.equal(dec.drafter.draft.state_dict()[k], v) for k, v in newer.items())


def test_rejected_nodes_carry_the_targets_distribution_at_their_own_position(target):
    """A rejected node's exported top-k is the target's next-token distribution after the node's path
    (the trainer's negative signal), checked against a plain HF forward over prompt + that path."""
    spec = SpecConfig(topk=3, num_steps=3, num_draft_tokens=6)
    dec = SpecDecoder(target, EagleDrafter(_draft(target, seed=2), spec), spec, topk=4)
    r = dec.generate(PROMPTS[1], 16)
    checked = 0
    for st in r.trace.steps:
        for m, j in enumerate(st.target_nodes):
            path, i = [], int(j)
            while i >= 0:
                path.insert(0, int(st.tokens[i]))
                i = int(st.parents[i])
            context = r.trace.tokens[:st.trunk_pos + 1].tolist() + path
            with torch.no_grad():
                logits = target.model(torch.tensor([context])).logits[0, -1]
            assert int(st.target_ids[m, 0]) == int(logits.argmax()), (st.trunk_pos, j)
            checked += 1
    assert checked >= 5
