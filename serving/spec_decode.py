"""Tree speculative decoding with an EAGLE3 draft, exporting every request as a RequestTrace.

One round (docs/design.md section 3 conventions): the target has processed tokens [0, q) and the
pending token x_q is known. The draft extends its own cache with trunk slots up to q (slot t reads
x_t and the target's aux features of t-1), then grows a tree EAGLE-2 style: `topk` children per
frontier node, the `topk` best paths by cumulative log-probability kept per depth, `num_steps`
draft forwards, and the `num_draft_tokens` best nodes overall form the tree hung at trunk position q.
One target forward over [x_q ; tree] with a tree mask verifies it; greedy acceptance walks from the
root while the target's argmax is a child, and the target's argmax at the last accepted node is the
bonus token. The target cache keeps the root and the accepted path; everything else is dropped.
Greedy output therefore equals target-only greedy decoding (tests check it token for token).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid

import numpy as np
import torch

from bridge.eagle3 import VOCAB_KEYS
from bridge.torch_io import tensor_to_numpy
from bridge.traces import Trace, TreeStep, cut_steps
from serving.eagle3 import Eagle3Draft
from serving.acceptance import accept
from serving.padding import Padding
from serving.target import Target


@dataclasses.dataclass
class SpecConfig:
    topk: int = 4  # children per expanded node (1 = a chain)
    num_steps: int = 5  # draft forwards per round = maximum tree depth
    num_draft_tokens: int = 8  # nodes in the verified tree
    # A node enters the tree only if the draft gives its whole path at least this probability, and a
    # node below it is not expanded (its children can only be less likely), so a draft that is unsure
    # costs fewer draft forwards and a smaller verification, down to a plain one-token forward when no
    # candidate reaches it (an untrained draft on day 0). 0 = always the full shape (SGLang's trees).
    min_prob: float = 0.0
    # A round that fuses several requests verifies all their trees in one target forward whose cost
    # grows with its rows, while one-token decoding of the same batch pays less for a second row
    # (SmolLM2 bf16, one thread: two 7-node trees 64 ms, two 4-node trees 52, two single tokens 50). Such
    # rounds may draft shallower, smaller trees (0 = the shape used alone); `bench serve --concurrency 2`.
    batched_num_steps: int = 0
    batched_num_draft_tokens: int = 0

    def __post_init__(self):
        if min(self.topk, self.num_steps, self.num_draft_tokens) < 1:
            raise ValueError("topk, num_steps and num_draft_tokens must be >= 1")
        if min(self.batched_num_steps, self.batched_num_draft_tokens) < 0:
            raise ValueError("batched_num_steps and batched_num_draft_tokens must be >= 0 (0 = as alone)")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError("min_prob must be in [0, 1)")

    def shape(self, batch: int) -> tuple[int, int]:
        """(draft forwards, tree nodes) of each tree in a round of `batch` requests."""
        if batch > 1:
            return self.batched_num_steps or self.num_steps, self.batched_num_draft_tokens or self.num_draft_tokens
        return self.num_steps, self.num_draft_tokens


@dataclasses.dataclass
class Node:
    token: int  # target vocabulary id
    parent: int  # index into the tree's nodes, -1 = the root (trunk position q)
    depth: int
    score: float  # cumulative draft log-probability


class EagleDrafter:
    """Proposes a tree from the torch EAGLE3 draft; keeps the draft's KV cache of trunk slots."""

    def __init__(self, draft: Eagle3Draft, cfg: SpecConfig):
        self.draft, self.cfg = draft, cfg
        self.weights_id = 0  # bumped by every swap: caches built by older weights are rebuilt
        self.forwards = 0  # draft forwards run (a fused step of several requests counts once)

    def new_state(self) -> "DraftState":
        return DraftState(weights_id=self.weights_id)

    def check(self, state_dict) -> None:
        """Raise ValueError if a version cannot be swapped into this draft: unknown tensors, or
        vocabulary maps (d2t/t2d) other than the ones served (they never change after day 0)."""
        unexpected = sorted(set(state_dict) - set(self.draft.state_dict()))
        if unexpected:
            raise ValueError(f"draft version has unknown tensors {unexpected}")
        for k in sorted(VOCAB_KEYS):
            if k in state_dict and not torch.equal(state_dict[k].to(getattr(self.draft, k).dtype), getattr(self.draft, k)):
                raise ValueError(f"draft version has a different vocabulary map {k} than the draft served")

    def swap(self, state_dict) -> None:
        """Between rounds: new weights, same vocabulary maps. The draft's trunk cache was computed
        by the old weights, so it is rebuilt on the next round."""
        self.draft.load_state_dict({k: v for k, v in state_dict.items() if k not in VOCAB_KEYS}, strict=False)
        self.weights_id += 1

    def replace(self, draft: Eagle3Draft) -> None:
        """Between rounds: a whole new draft (day 0 adopting the trainer's config and vocabulary)."""
        self.draft = draft
        self.weights_id += 1

    @torch.no_grad()
    def propose(self, tokens: list[int], aux: list[torch.Tensor], st: "DraftState") -> list[Node]:
        return self.propose_many([(tokens, aux, st)])[0]

    @torch.no_grad()
    def propose_many(self, items: list[tuple[list[int], list[torch.Tensor], "DraftState"]]) -> list[list[Node]]:
        """Trees for several requests, their draft forwards fused: each request's drafting is a
        coroutine that yields one draft step at a time; every round's steps run as one padded
        forward (`_forward_many`), so a batch costs num_steps draft forwards, not num_steps each."""
        steps, size = self.cfg.shape(len(items))
        gens = [self._propose(*it, steps, size) for it in items]
        out: list = [None] * len(gens)
        pending = {i: next(g) for i, g in enumerate(gens)}
        while pending:
            keys = list(pending)
            results = self._forward_many([pending[i] for i in keys])
            pending = {}
            for i, res in zip(keys, results):
                try:
                    pending[i] = gens[i].send(res)
                except StopIteration as stop:
                    out[i] = stop.value
        return out

    def _forward_many(self, steps: list[tuple]) -> list[tuple]:
        """Draft steps [(tok [1,n], hid [1,n,W], pos [1,n], mask [1,n,L+n], cache (k, v) [1,L,..] | None)]
        as one forward: caches right-padded to the longest, new tokens to the widest step (pad keys
        masked; positions explicit, so padding shifts no rotary phase); each gets back its own
        (logits [1,n,Vd], hidden [1,n,H], cache [1,L+n,..]) as if run alone."""
        d = self.draft
        if len(steps) == 1 or len({s[1].shape[-1] for s in steps}) > 1:
            self.forwards += len(steps)
            return [d(*s) for s in steps]
        self.forwards += 1
        pad = Padding([0 if s[4] is None else s[4][0].shape[1] for s in steps], [s[0].shape[1] for s in steps])
        B, N = len(steps), pad.N
        tok = torch.zeros(B, N, dtype=torch.long)
        pos = torch.zeros(B, N, dtype=torch.long)
        hid = torch.zeros(B, N, steps[0][1].shape[-1], dtype=steps[0][1].dtype)
        for b, ((t, h, p, _, _), n) in enumerate(zip(steps, pad.ns)):
            tok[b, :n], pos[b, :n], hid[b, :n] = t[0], p[0], h[0]
        cache = None
        if pad.P:  # draft caches are [1, seq, kv heads, head dim]
            kvs = [s[4] if s[4] is not None else (d.empty_cache(),) * 2 for s in steps]
            cache = (pad.cache([k for k, _ in kvs], dim=1), pad.cache([v for _, v in kvs], dim=1))
        logits, h, (k, v) = d(tok, hid, pos, pad.mask([s[3][0] for s in steps]), cache)
        return [(logits[b:b + 1, :n], h[b:b + 1, :n], (pad.own(k, b, dim=1), pad.own(v, b, dim=1)))
                for b, n in enumerate(pad.ns)]

    def _propose(self, tokens: list[int], aux: list[torch.Tensor], st: "DraftState", num_steps: int, num_nodes: int):
        """One request's drafting as a coroutine: yields each draft step's inputs, receives its
        outputs, returns the tree's nodes (at most `num_steps` deep, `num_nodes` of them)."""
        q = len(tokens) - 1
        d = self.draft
        if st.weights_id != self.weights_id:  # swapped since: rebuild this request's draft cache
            st.cache, st.next_slot, st.weights_id = None, 1, self.weights_id
        # 1. trunk slots [next_slot, q]: token x_t, target features of t-1
        slots = list(range(st.next_slot, q + 1))
        past = 0 if st.cache is None else st.cache[0].shape[1]
        n = len(slots)
        tok = torch.tensor([[tokens[t] for t in slots]])
        hid = torch.stack([aux[t - 1] for t in slots])[None].to(d.fc.weight.dtype)
        pos = torch.tensor([slots])
        mask = torch.ones(1, n, past + n, dtype=torch.bool)
        mask[0, :, past:] = torch.ones(n, n, dtype=torch.bool).tril()
        logits, h, st.cache = yield tok, hid, pos, mask, st.cache
        st.next_slot = q + 1
        trunk_len = st.cache[0].shape[1]

        # 2. grow the tree
        nodes: list[Node] = []
        frontier: list[int] = []  # node indices expanded at the current depth
        tree_kv = None
        kv_index: dict[int, int] = {}  # node -> position in tree_kv
        parent_h = {-1: h[0, -1]}
        self._children(nodes, [-1], 1, logits[0, -1:])
        floor = math.log(self.cfg.min_prob) if self.cfg.min_prob > 0 else -math.inf
        frontier = [i for i in range(len(nodes)) if nodes[i].score >= floor]
        for depth in range(1, num_steps):
            if not frontier:  # nothing here is likely enough to be worth another draft forward
                break
            m = len(frontier)
            tok = torch.tensor([[nodes[i].token for i in frontier]])
            hid = torch.stack([parent_h[nodes[i].parent] for i in frontier])[None]
            pos = torch.full((1, m), q + depth)
            done = 0 if tree_kv is None else tree_kv[0].shape[1]
            mask = torch.zeros(1, m, trunk_len + done + m, dtype=torch.bool)
            mask[0, :, :trunk_len] = True
            for r, i in enumerate(frontier):
                j = nodes[i].parent
                while j >= 0:
                    mask[0, r, trunk_len + kv_index[j]] = True
                    j = nodes[j].parent
                mask[0, r, trunk_len + done + r] = True
            cache = (torch.cat([st.cache[0]] + ([tree_kv[0]] if tree_kv else []), 1),
                     torch.cat([st.cache[1]] + ([tree_kv[1]] if tree_kv else []), 1))
            logits, h, full = yield tok, hid, pos, mask, cache
            tree_kv = (full[0][:, trunk_len:], full[1][:, trunk_len:])
            for r, i in enumerate(frontier):
                kv_index[i] = done + r
                parent_h[i] = h[0, r]
            first = len(nodes)
            self._children(nodes, frontier, depth + 1, logits[0])
            new = list(range(first, len(nodes)))
            new.sort(key=lambda i: -nodes[i].score)
            frontier = [i for i in new[:self.cfg.topk] if nodes[i].score >= floor]

        # 3. the best num_nodes nodes above min_prob (scores fall along a path, so parents come along)
        keep = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth))[:num_nodes]
        keep = {i for i in keep if nodes[i].score >= floor}
        for i in list(keep):
            j = nodes[i].parent
            while j >= 0 and j not in keep:
                keep.add(j)
                j = nodes[j].parent
        order = sorted(keep, key=lambda i: (nodes[i].depth, i))
        new_index = {old: k for k, old in enumerate(order)}
        return [Node(nodes[i].token, new_index.get(nodes[i].parent, -1), nodes[i].depth, nodes[i].score) for i in order]

    def _children(self, nodes, parents: list[int], depth: int, logits: torch.Tensor):
        """Append each parent's `topk` most likely children (logits row r: parent r's; -1 = the root)."""
        top = torch.topk(torch.log_softmax(logits, -1), min(self.cfg.topk, logits.shape[-1]), dim=-1)
        ids = self.draft.draft_to_target(top.indices)
        for parent, lps, toks in zip(parents, top.values.tolist(), ids.tolist()):
            score = nodes[parent].score if parent >= 0 else 0.0
            for lp, t in zip(lps, toks):
                nodes.append(Node(int(t), parent, depth, score + lp))



@dataclasses.dataclass
class DraftState:
    """One request's draft KV cache over its trunk slots [1, next_slot)."""

    weights_id: int
    cache: tuple | None = None
    next_slot: int = 1


@dataclasses.dataclass
class Result:
    output: list[int]
    trace: Trace
    target_forwards: int
    accept_lengths: list[int]  # tokens emitted per target forward (verification rounds)


class SpecDecoder:
    def __init__(self, target: Target, drafter: EagleDrafter | None, spec: SpecConfig, topk: int = 8,
                 draft_version: int = 0):
        self.target, self.drafter, self.spec, self.topk = target, drafter, spec, topk
        self.draft_version = draft_version
        self._pending = None  # (version, state_dict) offered by the WeightSync subscriber
        self._lock = threading.Lock()
        self.swaps = 0
        self.last_swap_ms = 0.0
        self.fused_forwards = 0  # batched target forwards of decode rounds
        self.fused_requests = 0  # request rounds they carried (mean batch = requests / forwards)
        # where a round's time goes: the draft phase (its fused forwards and the tree building around
        # them) and the fused target forward, over trees or (no request drafting) one token each
        self.timing = dict(draft_s=0.0, draft_forwards=0, tree_s=0.0, tree_forwards=0, plain_s=0.0, plain_forwards=0)

    def offer_swap(self, version: int, state_dict) -> None:
        """Thread-safe: install this draft version at the next round boundary (never mid-round).
        Raises ValueError (in the caller's thread: the subscriber counts it refused) if it does not fit."""
        with self._lock:
            if self._pending is not None and version <= self._pending[0]:
                return
            if self.drafter is not None and not isinstance(state_dict, Eagle3Draft):
                pend = self._pending[1] if self._pending is not None else None
                if isinstance(pend, Eagle3Draft):  # a whole draft not yet installed: update it instead
                    into = EagleDrafter(pend, self.spec)
                    into.check(state_dict)
                    into.swap(state_dict)
                    state_dict = pend
                else:
                    self.drafter.check(state_dict)
            self._pending = (version, state_dict)

    def offer_draft(self, version: int, draft: Eagle3Draft) -> None:
        """Thread-safe: replace the whole draft at the next round boundary (see EagleDrafter.replace)."""
        self.offer_swap(version, draft)

    def _apply_swap(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or self.drafter is None or pending[0] <= self.draft_version:
            return
        t0 = time.perf_counter()
        if isinstance(pending[1], Eagle3Draft):
            self.drafter.replace(pending[1])
        else:
            self.drafter.swap(pending[1])
        self.draft_version = pending[0]
        self.swaps += 1
        self.last_swap_ms = (time.perf_counter() - t0) * 1e3

    def _topk(self, logits: torch.Tensor):
        lp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(lp, min(self.topk, lp.shape[-1]), dim=-1)
        return top.indices.to(torch.int32).numpy(), top.values.numpy().astype(np.float32)

    def _pick(self, logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen))

    @torch.no_grad()
    def start(self, prompt: list[int], max_new_tokens: int, eos: int | None = None, domain: str = "",
              request_id: str | None = None, temperature: float = 0.0, seed: int | None = None,
              speculative: bool = True) -> "Request":
        """Prefill (emits the first token); then call `step` until `done`, then `finish`.
        `speculative=False` decodes this request target-only (one token per forward), e.g. the
        baseline arm of a side-by-side on the same engine."""
        if not prompt:
            raise ValueError("empty prompt")
        gen = None
        if temperature > 0:
            gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (1 << 62)))
        r = Request(prompt=list(prompt), max_new_tokens=max_new_tokens, eos=eos, domain=domain,
                    request_id=request_id or uuid.uuid4().hex, temperature=temperature, gen=gen,
                    cache=self.target.new_cache(), t_start=time.time(), version=self.draft_version,
                    draft=self.drafter.new_state() if self.drafter is not None else None,
                    speculative=speculative and self.drafter is not None)
        logits, aux_p = self.target.forward(r.prompt, r.cache)
        r.aux = list(aux_p)  # aux[t]: features after token t
        ids, lps = self._topk(logits)
        r.top_ids, r.top_lp = list(ids), list(lps)
        r.tokens = r.prompt + [self._pick(logits[-1], temperature, gen)]
        r.forwards = 1
        return r

    @torch.no_grad()
    def step(self, r: "Request") -> int:
        """One verification round (or one plain decode step without a draft). Returns tokens emitted."""
        return self.step_many([r])[0]

    @torch.no_grad()
    def step_many(self, reqs: list["Request"]) -> list[int]:
        """One round for each request: their draft steps fused (`EagleDrafter.propose_many`), then
        their target forwards fused into one batched forward. Returns tokens emitted per request."""
        trees: list = [None] * len(reqs)
        t0 = time.perf_counter()
        if self.drafter is not None:
            self._apply_swap()
            spec = [i for i, r in enumerate(reqs) if r.speculative]
            f0 = self.drafter.forwards
            for i, nodes in zip(spec, self.drafter.propose_many([(reqs[i].tokens, reqs[i].aux, reqs[i].draft)
                                                                 for i in spec])):
                if reqs[i].forwards == 1:  # its first round; a later swap keeps the label: a request
                    reqs[i].version = self.draft_version  # is labelled with the oldest version that drafted it
                trees[i] = nodes or None  # no candidate above spec.min_prob: a plain one-token round
            if spec:
                self.timing["draft_s"] += time.perf_counter() - t0
                self.timing["draft_forwards"] += self.drafter.forwards - f0
        plans = [self._plan(r, nodes) for r, nodes in zip(reqs, trees)]
        t1 = time.perf_counter()
        outs = self.target.forward_many([(p[0], r.cache, p[1], p[2]) for r, p in zip(reqs, plans)])
        kind = "tree" if any(t is not None for t in trees) else "plain"
        self.timing[f"{kind}_s"] += time.perf_counter() - t1
        self.timing[f"{kind}_forwards"] += 1
        self.fused_forwards += 1
        self.fused_requests += len(reqs)
        return [self._commit(r, p[3], logits, a) for r, p, (logits, a) in zip(reqs, plans, outs)]

    def _plan(self, r: "Request", nodes: list[Node] | None):
        """(input ids, positions, tree mask, draft nodes) of this request's next target forward."""
        tokens, q = r.tokens, len(r.tokens) - 1
        if nodes is None:
            return [tokens[q]], None, None, None
        n, past = len(nodes), q
        allowed = torch.zeros(n + 1, past + n + 1, dtype=torch.bool)
        allowed[:, :past + 1] = True  # everything before, and the root x_q
        for k, nd in enumerate(nodes):
            j = k
            while j >= 0:
                allowed[k + 1, past + 1 + j] = True
                j = nodes[j].parent
        positions = [q] + [q + nd.depth for nd in nodes]
        return [tokens[q]] + [nd.token for nd in nodes], positions, allowed, nodes

    def _commit(self, r: "Request", nodes, logits, a) -> int:
        """Accept against the target's logits, trim the target cache, record the round's tree."""
        tokens, q = r.tokens, len(r.tokens) - 1
        r.forwards += 1
        if nodes is None:
            r.aux.append(a[0])
            i, l = self._topk(logits)
            r.top_ids.append(i[0]), r.top_lp.append(l[0])
            tokens.append(self._pick(logits[0], r.temperature, r.gen))
            r.accepts.append(1)
            return 1
        n = len(nodes)
        path, bonus = accept(logits, nodes, r.temperature, r.gen)  # node k is logits row k + 1
        rows = [0] + [k + 1 for k in path]
        ids, lps = self._topk(logits)  # every row is in the trace: the path's, or a rejected node's
        for row in rows:
            r.aux.append(a[row])
            r.top_ids.append(ids[row]), r.top_lp.append(lps[row])
        tokens.extend(nodes[k].token for k in path)
        tokens.append(bonus)
        self.target.keep(r.cache, q, rows)
        r.accepts.append(len(path) + 1)
        accepted = np.zeros(n, bool)
        accepted[path] = True
        rejected = np.nonzero(~accepted)[0].astype(np.int32)
        r.steps.append(TreeStep(q, np.asarray([nd.token for nd in nodes], np.int32),
                                np.asarray([nd.parent for nd in nodes], np.int32), accepted, rejected,
                                ids[rejected + 1], lps[rejected + 1]))
        return len(path) + 1

    @torch.no_grad()
    def finish(self, r: "Request") -> Result:
        """Cut at max_new_tokens / EOS and build the trace (only what the trunk still holds)."""
        out = r.output
        tokens = r.prompt + out
        L = len(tokens)
        if len(r.aux) < L:  # the last token was pending: one more target position for its features
            logits, a = self.target.forward([tokens[-1]], r.cache)
            r.aux.append(a[0])
            i, l = self._topk(logits)
            r.top_ids.append(i[0]), r.top_lp.append(l[0])
        steps = cut_steps(r.steps, L)
        trace = Trace(request_id=r.request_id, tokens=np.asarray(tokens, np.int32), prompt_len=len(r.prompt),
                      aux_hidden=_np(torch.stack(r.aux[:L])), target_ids=np.stack(r.top_ids[:L]).astype(np.int32),
                      target_logprobs=np.stack(r.top_lp[:L]).astype(np.float32), steps=steps,
                      draft_version=r.version, domain=r.domain, start_unix_s=r.t_start, end_unix_s=time.time(),
                      target_forwards=r.forwards)
        r.cache = None  # free the KV cache now
        return Result(out, trace, r.forwards, r.accepts)

    def generate(self, prompt: list[int], max_new_tokens: int, **kw) -> Result:
        r = self.start(prompt, max_new_tokens, **kw)
        while not r.done:
            self.step(r)
        return self.finish(r)


@dataclasses.dataclass
class Request:
    """One request's decoding state (the engine batches several at round granularity)."""

    prompt: list[int]
    max_new_tokens: int
    eos: int | None
    domain: str
    request_id: str
    temperature: float
    gen: torch.Generator | None
    cache: object
    t_start: float
    version: int  # the draft version of its first round: the oldest that drafted any of its tokens
    draft: DraftState | None
    speculative: bool = True
    tokens: list[int] = dataclasses.field(default_factory=list)
    aux: list = dataclasses.field(default_factory=list)
    top_ids: list = dataclasses.field(default_factory=list)
    top_lp: list = dataclasses.field(default_factory=list)
    steps: list = dataclasses.field(default_factory=list)
    accepts: list = dataclasses.field(default_factory=list)
    forwards: int = 0

    @property
    def output(self) -> list[int]:
        """Emitted tokens so far, cut at EOS and max_new_tokens."""
        out = self.tokens[len(self.prompt):]
        if self.eos is not None and self.eos in out:
            out = out[:out.index(self.eos) + 1]
        return out[:self.max_new_tokens]

    @property
    def done(self) -> bool:
        out = self.tokens[len(self.prompt):]
        return len(out) >= self.max_new_tokens or (self.eos is not None and self.eos in out)


def _np(t: torch.Tensor) -> np.ndarray:
    """A trace array: bf16 and f16 kept as they are, anything else as float32; a copy."""
    return tensor_to_numpy(t if t.dtype in (torch.bfloat16, torch.float16) else t.float()).copy()
