"""SGLang scheduler plugin: record every EAGLE verify step's trees and ship them to the sidecar.

Loaded through SGLang's own plugin framework (entry point group `sglang.srt.plugins`, run by
`load_plugins()` in every scheduler process, sglang/srt/plugins/__init__.py) and attached with an
AFTER hook from its hook registry (sglang/srt/plugins/hook_registry.py) on
`sglang.srt.speculative.eagle_worker_common.eagle_sample`, the function every EAGLE/EAGLE3 verify
step calls to accept tokens (eagle_worker_common.py: run_eagle_verify). No SGLang file is patched.

It is inert unless `AURORA_TREE_SINK` (the sidecar's `http://host:port/aurora/steps`) is set, and
only TP rank 0 sends. Each verify step costs one device->host copy of the small tree tensors (with
the top-k ids of the target logits when `AURORA_TREE_TOPK` > 0, plus one of their logprobs: a top-k
and a logsumexp over the logits, no full log-softmax); records are posted in batches by a background
thread, and dropped (counted) when the sidecar is slow, never blocking the scheduler. With DP
attention only TP rank 0 of the first group sends, so other groups' trees are not recorded (their
traces still carry the target's rows and distributions, without trees).
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import httpx
import torch

from serving.sglang.traces import StepRecord

log = logging.getLogger(__name__)
HOOK_TARGET = "sglang.srt.speculative.eagle_worker_common.eagle_sample"


def records_from_verify(verify_input, batch, logits_output, result, topk: int = 0) -> list[StepRecord]:
    """Per-request trees of one verify step, from the objects `eagle_sample` sees and returns.

    verify_input: EagleVerifyInput (draft_token [bs*n], retrieve_next_token / retrieve_next_sibling
    [bs, n], draft_token_num n); batch: ScheduleBatch (reqs[i].rid, seq_lens [bs]); logits_output:
    LogitsProcessorOutput (next_token_logits [bs*n, V]); result: (predict, accept_lens [bs],
    accept_index [bs, depth] of global block indices, root first).
    """
    _, accept_lens, accept_index = result
    n = int(verify_input.draft_token_num)
    bs = len(batch.reqs)
    if bs == 0:
        return []
    depth = accept_index.numel() // bs
    parts = [verify_input.draft_token.view(bs, n), verify_input.retrieve_next_token.view(bs, n),
             verify_input.retrieve_next_sibling.view(bs, n), accept_index.view(bs, depth), accept_lens.view(bs, 1)]
    top_lp = None
    if topk > 0 and logits_output is not None and logits_output.next_token_logits is not None:
        # top-k of the logits, normalised by one logsumexp: no [bs*n, V] log-softmax is materialised
        logits = logits_output.next_token_logits[: bs * n]
        top = torch.topk(logits, topk, dim=-1)
        top_lp = top.values.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        parts.append(top.indices.view(bs, n * topk))
    # one device->host copy of every integer tensor (plus one of the top-k logprobs)
    ints = torch.cat([p.to(torch.int64) for p in parts], dim=1).cpu()
    widths = [p.shape[1] for p in parts]
    cols = torch.split(ints, widths, dim=1)
    tokens, nxt, sib, acc_idx = (c.tolist() for c in cols[:4])
    acc_len = cols[4].view(bs).tolist()
    top_ids = cols[5].view(bs, n, topk).tolist() if top_lp is not None else None
    top_lp = top_lp.view(bs, n, topk).cpu().tolist() if top_lp is not None else None
    seq = batch.seq_lens_cpu if getattr(batch, "seq_lens_cpu", None) is not None else batch.seq_lens.cpu()
    seq = seq.tolist()
    out = []
    for i, req in enumerate(batch.reqs):
        accepted = [g - i * n for g in acc_idx[i][: acc_len[i]]]
        out.append(StepRecord(rid=str(req.rid), trunk_pos=int(seq[i]), tokens=tokens[i], next_token=nxt[i],
                              next_sibling=sib[i], accepted=accepted,
                              topk_ids=top_ids[i] if top_ids else None, topk_logprobs=top_lp[i] if top_lp else None))
    return out


class Sender:
    """Bounded queue + one thread that POSTs JSON batches of records to the sidecar."""

    def __init__(self, url: str, max_queue: int = 10000):
        self.url, self.q = url, queue.Queue(maxsize=max_queue)
        self.sent = self.dropped = 0
        self._http = httpx.Client(timeout=5)  # one keep-alive connection to the sidecar
        threading.Thread(target=self._run, name="aurora-tree-sender", daemon=True).start()

    def put(self, records: list[StepRecord]) -> None:
        for r in records:
            try:
                self.q.put_nowait(r)
            except queue.Full:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            while len(batch) < 512:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._http.post(self.url, json=[r.__dict__ for r in batch]).raise_for_status()
                self.sent += len(batch)
            except httpx.HTTPError as e:
                self.dropped += len(batch)
                log.warning("aurora tree sink %s unreachable (%s); %d records dropped", self.url, e, len(batch))


_SENDER: Sender | None = None
_TOPK = 0  # AURORA_TREE_TOPK, read once at registration


def _after_eagle_sample(result, verify_input, batch, logits_output, *args, **kwargs):
    try:
        from sglang.srt.runtime_context import get_parallel
        if get_parallel().tp_rank != 0 or batch.forward_mode.is_idle():
            return None
        _SENDER.put(records_from_verify(verify_input, batch, logits_output, result, _TOPK))
    except Exception:  # recording must never break serving
        log.exception("aurora tree recording failed; serving continues")
    return None  # keep eagle_sample's result


def register() -> None:
    """Entry point `aurora` in group `sglang.srt.plugins`."""
    global _SENDER, _TOPK
    url = os.environ.get("AURORA_TREE_SINK", "")
    if not url:
        log.info("aurora plugin inactive (AURORA_TREE_SINK not set)")
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    _SENDER, _TOPK = Sender(url), int(os.environ.get("AURORA_TREE_TOPK", "0"))
    HookRegistry.register(HOOK_TARGET, _after_eagle_sample, HookType.AFTER)
    log.info("aurora plugin: recording EAGLE verify trees to %s", url)
