"""SGLang outputs -> RequestTrace (docs/design.md section 3), for the pinned SGLang 0.5.23.

Two sources, joined by request id in the sidecar:

1. The `/generate` response of a request sent with `return_hidden_states=True`, `return_logprob=True`,
   `logprob_start_len=0`, `top_logprobs_num=k` (shapes, all in sglang/srt/managers/):
   - `output_ids`: generated ids (tokenizer_manager.py:2665).
   - `meta_info.hidden_states`: one 2-D entry with the rows of the prefill chunk that completed the
     prompt (scheduler_components/batch_result_processor.py:659; earlier chunks of a chunked prefill
     store nothing, :330-337 pass `store=should_commit_output`, false while middle chunks are in
     flight), then one row per decoded token (a 1-D list each, :699). With
     `--enable-return-aux-hidden-states` (target only) or an EAGLE3 draft these rows are the
     concatenated aux hidden states [3H] (arg_groups/fields/exec_.py:129).
   - `meta_info.input_top_logprobs`: per prompt position, None for position 0, else a list of
     (logprob, token_id, text) (tokenizer_manager.py:3106, :3135); `output_top_logprobs` likewise per
     generated token: the distribution that token was drawn from.
   - `meta_info.weight_version`: the weight version serving when the request ended (:2511), and
     `meta_info.weight_versions`, the spans of output tokens each version served when a swap happened
     while the request ran (utils/weight_versions.py): the trace is labelled with the oldest.
   The last generated token has no hidden state (it was never fed back), so the trace stops one
   token short. Leading prompt rows are missing in two cases: a prompt longer than the chunked-
   prefill size (only its last chunk's rows come back) and a prefix served from the radix cache
   (never computed). The trace then starts where the rows do (`cut`, counted in the sidecar's
   `cut_tokens`); `sglang.chunked_prefill_size` above the longest prompt avoids the first case.

2. Verify-step records from the scheduler plugin (`plugin.py`): per request and verify step, the
   draft block of `EagleVerifyInput` (speculative/eagle_info.py:18-25: `draft_token` with the root
   at local index 0, `retrieve_next_token` / `retrieve_next_sibling` as local first-child /
   next-sibling links) and the accepted local indices from `eagle_sample`'s `accept_index`
   (speculative/eagle_utils.py:633, root first; filled by kernels/ops/speculative/spec_tree.py:232).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bridge.traces import Trace, TreeStep, cut_steps


class SGLangTraceError(ValueError):
    pass


@dataclasses.dataclass
class StepRecord:
    """One request's tree in one verify step, as the plugin records it (JSON-able)."""

    rid: str
    trunk_pos: int  # index of the root token in the request's sequence (= seq_len before verify)
    tokens: list[int]  # [n] block tokens, root first (target vocabulary ids)
    next_token: list[int]  # [n] first child (local index) or -1
    next_sibling: list[int]  # [n] next sibling (local index) or -1
    accepted: list[int]  # local indices on the accepted path, root first
    topk_ids: list[list[int]] | None = None  # [n, k] target top-k after each block token
    topk_logprobs: list[list[float]] | None = None


def step_from_record(rec: StepRecord) -> TreeStep:
    """Linked-list tree -> parent array in breadth-first order (parents before children)."""
    n = len(rec.tokens)
    if not (len(rec.next_token) == len(rec.next_sibling) == n) or n < 1:
        raise SGLangTraceError(f"request {rec.rid} step at {rec.trunk_pos}: tree arrays disagree in length")
    if not rec.accepted or rec.accepted[0] != 0:
        raise SGLangTraceError(f"request {rec.rid} step at {rec.trunk_pos}: accepted path must start at the root")
    order, parent_local = [], {}
    frontier = [0]
    while frontier:
        nxt = []
        for u in frontier:
            c, guard = rec.next_token[u], 0
            while c != -1:
                if not 0 < c < n or c in parent_local or guard > n:
                    raise SGLangTraceError(f"request {rec.rid} step at {rec.trunk_pos}: malformed tree links at {c}")
                parent_local[c] = u
                order.append(c)
                nxt.append(c)
                c, guard = rec.next_sibling[c], guard + 1
        frontier = nxt
    if len(order) != n - 1:
        raise SGLangTraceError(f"request {rec.rid} step at {rec.trunk_pos}: {n - 1 - len(order)} draft tokens "
                               "are not reachable from the root")
    ours = {local: i for i, local in enumerate(order)}  # local block index -> our node index
    parents = np.asarray([-1 if parent_local[u] == 0 else ours[parent_local[u]] for u in order], np.int32)
    accepted = np.zeros(n - 1, bool)
    for u in rec.accepted[1:]:
        if u not in ours:
            raise SGLangTraceError(f"request {rec.rid} step at {rec.trunk_pos}: accepted index {u} not in the tree")
        accepted[ours[u]] = True
    step = TreeStep(rec.trunk_pos, np.asarray([rec.tokens[u] for u in order], np.int32), parents, accepted)
    if rec.topk_ids is not None:
        rejected = np.nonzero(~accepted)[0].astype(np.int32)
        step.target_nodes = rejected
        step.target_ids = np.asarray([rec.topk_ids[order[i]] for i in rejected], np.int32).reshape(len(rejected), -1)
        step.target_logprobs = np.asarray([rec.topk_logprobs[order[i]] for i in rejected],
                                          np.float32).reshape(len(rejected), -1)
    return step


def aux_rows(hidden_states: list) -> np.ndarray:
    """Flatten SGLang's hidden_states list (2-D prefill chunks, then 1-D decode rows) to [rows, 3H]."""
    rows = []
    for entry in hidden_states:
        if entry and isinstance(entry[0], (list, tuple)):
            rows.extend(entry)
        elif entry:
            rows.append(entry)
    if not rows:
        return np.zeros((0, 0), np.float32)
    width = {len(r) for r in rows}
    if len(width) != 1:
        raise SGLangTraceError(f"hidden_states rows have different widths {sorted(width)}")
    return np.asarray(rows, np.float32)


def _topk(entries: list, k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(entries), k), -1, np.int32)
    lps = np.full((len(entries), k), -np.inf, np.float32)
    for i, e in enumerate(entries):
        if not e:
            raise SGLangTraceError(f"{where}[{i}] has no top logprobs (was top_logprobs_num set?)")
        for j, (lp, tid, *_) in enumerate(e[:k]):
            ids[i, j], lps[i, j] = int(tid), float(lp)
    return ids, lps


def served_version(meta: dict) -> int | None:
    """The draft version in `meta_info.weight_version` (we set it to the draft_version at each swap)."""
    v = str(meta.get("weight_version") or "")
    return int(v) if v.isdigit() else None


def trace_version(meta: dict) -> int:
    """The draft version a trace is labelled with: the oldest that served any of its tokens (a swap
    inside a request splits `weight_versions` into spans), so staleness is never understated."""
    spans = [str(s.get("version", "")) for s in meta.get("weight_versions") or () if isinstance(s, dict)]
    versions = [int(v) for v in spans if v.isdigit()]
    return min(versions) if versions else (served_version(meta) or 0)


def target_forwards(meta: dict, num_output: int) -> int:
    """Prefill + verify passes with a draft (`spec_verify_ct`); one forward per token without."""
    return 1 + int(meta["spec_verify_ct"]) if meta.get("spec_verify_ct") else num_output


def trace_from_generate(prompt_ids: list[int], response: dict, *, request_id: str, topk: int,
                        steps: list[TreeStep] = (), domain: str = "", start_unix_s: float = 0.0,
                        end_unix_s: float = 0.0) -> tuple[Trace, int]:
    """Trace of one finished `/generate` request, plus how many leading tokens had to be dropped."""
    meta = response.get("meta_info") or {}
    out = list(response.get("output_ids") or [])
    P, G = len(prompt_ids), len(out)
    if G < 1:
        raise SGLangTraceError(f"request {request_id}: no output tokens")
    hidden = meta.get("hidden_states")
    if not hidden:
        raise SGLangTraceError(f"request {request_id}: SGLang returned no hidden_states; start it with "
                               "--enable-return-aux-hidden-states --speculative-algorithm EAGLE3 (target only) or "
                               "--enable-return-hidden-states (with an EAGLE3 draft) and send return_hidden_states")
    for key in ("input_top_logprobs", "output_top_logprobs"):
        if meta.get(key) is None:
            raise SGLangTraceError(f"request {request_id}: meta_info.{key} missing (send return_logprob, "
                                   "logprob_start_len=0 and top_logprobs_num)")
    L = P + G - 1  # features and next-token distributions exist for tokens [0, L)
    aux = aux_rows(hidden)
    in_top, out_top = meta["input_top_logprobs"], meta["output_top_logprobs"]
    if len(out_top) < G:
        raise SGLangTraceError(f"request {request_id}: {len(out_top)} output_top_logprobs for {G} tokens")
    cut = max(L - aux.shape[0], 0)  # prompt rows served from the prefix cache have no features
    if cut >= P:
        raise SGLangTraceError(f"request {request_id}: {aux.shape[0]} hidden-state rows for {L} tokens")
    aux = aux[aux.shape[0] - (L - cut):]
    # row t = target top-k for token t + 1: prompt positions 1..P-1, then every output position
    pre = list(in_top[1:P])[cut:]
    ids, lps = _topk(pre + list(out_top[:G]), topk, f"request {request_id} top logprobs")
    ids, lps = ids[-(L - cut):], lps[-(L - cut):]
    tokens = np.asarray(list(prompt_ids) + out[:-1], np.int32)[cut:]
    shifted = [dataclasses.replace(s, trunk_pos=s.trunk_pos - cut) for s in steps if s.trunk_pos >= cut]
    trace = Trace(request_id=request_id, tokens=tokens, prompt_len=P - cut, aux_hidden=aux,
                  target_ids=ids, target_logprobs=lps, steps=cut_steps(shifted, L - cut),
                  draft_version=trace_version(meta), domain=domain,
                  start_unix_s=start_unix_s, end_unix_s=end_unix_s,
                  target_forwards=target_forwards(meta, G))
    return trace, cut
