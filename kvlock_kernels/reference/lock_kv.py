"""Reference of ``lock_kv``: the locked keys/values, and the library's one blending rule.

    w = lock[b, j]                       per batch entry and key token, in [0, 1]
    K'[b, j] = k[b, j] + w (k_src[b, j] - k[b, j])          same for V

The rule every backend follows (the Triton kernels, the PyTorch paths, this oracle):

- the blend is computed in fp32 and rounded once to the output dtype;
- ``w == 0`` selects ``k`` exactly and the source is not read: a NaN/inf in ``k_src``
  under weight 0 does not reach the output; ``w == 1`` selects ``k_src`` exactly and
  ``k`` is not read;
- ``0 < w < 1`` uses both operands with IEEE propagation (a NaN in either gives NaN).

That is what a lock means (weight 0: the fresh token alone; weight 1: the source
alone), and it is what lets kernels skip the tile a block does not need.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["blend", "lock_kv", "lock_as_bshd"]


def lock_as_bshd(lock: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(S,), (1, S) or (B, S) -> (B|1, S, 1, 1) in ``dtype`` (fp32 by default),
    broadcastable over (B, S, H, D)."""
    if lock.dim() == 1:
        lock = lock[None]
    return lock.to(dtype)[:, :, None, None]


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 operands; fp64 when one of them is fp64 (so that the
    PyTorch paths can be gradchecked in float64)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def blend(x: torch.Tensor, x_src: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None):
    """``x + w (x_src - x)`` under the rule above; w broadcasts against x (fp32 math).
    Returns ``out_dtype`` (default: x's dtype)."""
    work = _work_dtype(x.dtype, x_src.dtype)
    xf, sf = x.to(work), x_src.to(work)
    mixed = xf + w * (sf - xf)
    out = torch.where(w == 0, xf, torch.where(w == 1, sf, mixed))
    return out.to(out_dtype or x.dtype)


def lock_kv(k: torch.Tensor, v: torch.Tensor, lock: torch.Tensor, *, k_src: Optional[torch.Tensor] = None,
            v_src: Optional[torch.Tensor] = None, source_index: Optional[int] = None):
    """Locked (K', V'), new tensors in k's dtype, bshd layout.

    k, v: (B, S, H, D).  The source is either ``k_src, v_src`` of shape (B|1, S, H, D)
    or ``source_index``: batch entry i of k, v itself (an in-batch source branch; that
    entry is returned unchanged).  lock: (S,), (1, S) or (B, S) weights in [0, 1]
    (bool allowed).  The blend runs in fp32 (fp64 for fp64 inputs) and is rounded once.
    """
    if source_index is not None:
        k_src, v_src = k[source_index:source_index + 1], v[source_index:source_index + 1]
    lock_dtype = torch.float64 if lock.dtype == torch.float64 else torch.float32
    w = lock_as_bshd(lock, lock_dtype).to(k.device)
    if source_index is not None:
        w = w.expand(k.shape[0], -1, -1, -1).clone()
        w[source_index] = 0.0  # the source entry is not locked toward itself
    return blend(k, k_src, w), blend(v, v_src, w)
