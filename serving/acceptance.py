"""Verification of a draft tree against the target: which nodes are accepted, and the bonus token.

`logits` row 0 is the target's distribution at the root (the trunk position), row k + 1 its
distribution after node k; `nodes` are the tree's nodes (`parent` -1 = the root), parents first.
"""

from __future__ import annotations

import torch


def accept(logits: torch.Tensor, nodes: list, temperature: float,
           gen: torch.Generator | None) -> tuple[list[int], int]:
    """Accepted path (node indices) and the bonus token. Greedy: follow the target's argmax.
    Sampling: at each node try its children in draft order, accepting child c with the
    target's residual probability p(c) / p(remaining), removing c on rejection; if none is
    accepted, the bonus is drawn from the residual. Each emitted token is then distributed
    exactly as the target's (a draft that is a point mass per candidate), for any tree."""
    path, cur = [], -1
    while True:
        row = logits[cur + 1]
        kids = [k for k, nd in enumerate(nodes) if nd.parent == cur]
        if temperature <= 0:
            choice = int(row.argmax())
            nxt = next((k for k in kids if nodes[k].token == choice), None)
            if nxt is None:
                return path, choice
        else:
            p = torch.softmax(row.float() / temperature, -1)
            nxt = None
            for k in kids:
                t = nodes[k].token
                total = float(p.sum())
                if total > 0 and float(torch.rand((), generator=gen)) * total < float(p[t]):
                    nxt = k
                    break
                p[t] = 0.0
            if nxt is None:
                if float(p.sum()) <= 0:  # every token with mass was a rejected child: cannot happen
                    p = torch.softmax(row.float() / temperature, -1)
                return path, int(torch.multinomial(p / p.sum(), 1, generator=gen))
        path.append(nxt)
        cur = nxt
