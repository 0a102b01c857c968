"""Flax draft variables <-> torch tensors in SGLang's EAGLE3 state_dict layout.

Zero copy where it can be: arrays on the host (CPU JAX arrays, numpy) are wrapped through DLPack,
and the [in, out] -> [out, in] kernel transpose is a strided view, so exporting a draft costs a
dictionary of views, not a copy of its weights. Two things to know about such views:
- they share memory with the source arrays: treat them as read-only (load them with
  `load_state_dict` / `param.copy_`, which copy). JAX arrays are immutable to JAX, but a torch
  in-place op on a view would change them behind JAX's back;
- the trainer donates its parameter buffers to the next step, so views of live trainer params are
  valid until that step runs: the publish hook consumes them synchronously, or asks for `copy=True`.
Arrays on an accelerator take the safe path: one device-to-host copy.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from bridge.eagle3 import TRANSPOSED, DraftConfig, torch_keys

BF16 = np.dtype(ml_dtypes.bfloat16)


def tensor_from_numpy(a: np.ndarray) -> torch.Tensor:
    """numpy -> torch sharing memory; bf16 (ml_dtypes) included, which numpy's DLPack does not know:
    its bits are reinterpreted."""
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == BF16 else torch.from_numpy(a)


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU torch tensor -> numpy sharing memory; bf16 comes back as ml_dtypes.bfloat16."""
    return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()


def _host_tensor(a) -> tuple[torch.Tensor, bool]:
    """(tensor, shares_memory) for a JAX or numpy array."""
    if isinstance(a, np.ndarray):
        return tensor_from_numpy(a), True
    devices = getattr(a, "devices", lambda: set())()
    if all(d.platform == "cpu" for d in devices):
        try:
            return torch.from_dlpack(a), True
        except (RuntimeError, TypeError, BufferError):
            pass
    return _host_tensor(np.asarray(a))[0].clone(), False  # accelerator (or no DLPack): copy to host


def to_torch(flat: dict, *, copy: bool = False, contiguous: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Flax paths -> {torch key: tensor}. Returns (state_dict, bytes copied).

    `contiguous` materialises the transposed kernels (a copy each); `copy` detaches everything
    from the source buffers.
    """
    sd, copied = {}, 0
    for key, a in torch_keys(flat):
        t, shared = _host_tensor(a)
        copied += 0 if shared else t.nbytes
        if key in TRANSPOSED:
            t = t.T
        if key == "d2t" and t.dtype != torch.int64:
            t, copied = t.to(torch.int64), copied + t.numel() * 8  # SGLang's dtype; tiny
        if key == "t2d" and t.dtype != torch.bool:
            t = t.to(torch.bool)
        if (copy and shared) or (contiguous and not t.is_contiguous()):
            t = t.contiguous() if not t.is_contiguous() else t.clone()
            copied += t.nbytes
        sd[key] = t
    return sd, copied


def to_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """torch state_dict -> numpy (bf16 as ml_dtypes.bfloat16), sharing memory where possible."""
    out = {}
    for k, t in sd.items():
        out[k] = tensor_to_numpy(t.detach().cpu())
    return out


def from_torch(sd: dict[str, torch.Tensor], cfg: DraftConfig) -> dict[str, np.ndarray]:
    """torch state_dict (SGLang key spellings accepted) -> Flax paths, layout checked."""
    from bridge.eagle3 import from_torch_layout

    return from_torch_layout(to_numpy(sd), cfg)

