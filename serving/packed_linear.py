"""Linear layers whose weights are laid out once for oneDNN, for decoding on CPU.

Why: torch's CPU `F.linear` passes oneDNN the weight in its plain [out, in] layout at every call.
At decode sizes (a few rows against a large weight) the call then costs well above what reading
the weight should. SmolLM2-135M, bf16, one thread on the 2-core EPYC:
- a 576x1536 projection for 2 rows takes 254 µs plain and 157 µs packed;
- the 49152-way lm_head for 8 rows takes 9.1 ms plain and 4.6 ms packed.
Plain calls also grow with the rows, which is what a tree pass pays for its extra tokens.

So we pack every weight once into oneDNN's own layout, with the ops torch.compile's CPU freezing
uses (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`). In bf16 the results are
bit-identical to `F.linear`; in float32 they differ by the summation order (~1e-6).

A packed copy is rebuilt when its weight changes. A hot-swap's `load_state_dict` writes in place,
which bumps the tensor's version, so draft swaps need nothing more. Where oneDNN cannot pack a
weight (another device, float16, a torch built without oneDNN), the layer multiplies as a plain
`nn.Linear`, also after a cast or a move.
"""

from __future__ import annotations

import torch
from torch import nn

_ROWS_HINT = 8  # the rows a decode round's linears see (a tree of a few nodes); the layout barely depends on it


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state_dict) that multiplies by a packed copy of its weight."""

    _packed: torch.Tensor | None = None
    _packed_from: tuple = ()

    def pack(self) -> torch.Tensor | None:
        """The packed weight, rebuilt if the weight was replaced, cast, moved or written since;
        None where oneDNN cannot pack it (then the layer multiplies as `nn.Linear` does)."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._packed_from != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROWS_HINT) if _packable(w) else None
            self._packed_from = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.pack()
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


def _packable(w: torch.Tensor) -> bool:
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if w.dtype == torch.float32:
        return True
    return w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `PackedLinear`, in place: the module objects and
    their parameters stay (tied weights stay tied). Returns how many were packed."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and _packable(module.weight):
            module.__class__ = PackedLinear  # only forward differs; parameters, hooks, references stay
            module.pack()  # now, not in the first request
            n += 1
    return n
