"""Pure-PyTorch references: the oracle every kernel is tested against, and the
memory-efficient fallback that CPU users get with ``backend="torch"``.

Everything here is deliberately plain PyTorch.  The oracle (``kv_lock_attention``)
materialises the full score matrix and is meant for tests at small shapes; the
fallback (``kv_lock_attention_torch``) blends K/V, then calls
``F.scaled_dot_product_attention`` and never builds an Sq x Skv fp32 matrix.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .lock_kv import blend, lock_as_bshd

__all__ = ["kv_lock_attention", "kv_lock_attention_torch"]


def _to_bshd(t: Optional[torch.Tensor], layout: str) -> Optional[torch.Tensor]:
    if t is None or layout == "bshd":
        return t
    if layout == "bhsd":
        return t.transpose(1, 2)
    raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")


def kv_lock_attention(q, k, v, k_src=None, v_src=None, lock=None, *, softmax_scale=None,
                      layout: str = "bshd", return_lse: bool = False, upcast: bool = True):
    """The oracle: blend K/V, explicit scores, softmax, weighted sum.

    q: (B, Sq, Hq, D); k, v: (B, Skv, Hkv, D) (layout "bshd"; "bhsd" swaps S and H).
    With ``upcast=True`` every step runs in fp32 (the ground truth).  With
    ``upcast=False`` the blend and both matmuls run in the inputs' dtype, like a
    framework would: the baseline of the flash-attention tolerance rule.
    Returns out in q's dtype (same layout as q) and, if asked, lse (B, Hq, Sq) fp32.
    """
    q, k, v, k_src, v_src = (_to_bshd(t, layout) for t in (q, k, v, k_src, v_src))
    dtype = q.dtype
    work = torch.float32 if upcast else dtype
    if lock is not None and k_src is not None:
        w = lock_as_bshd(lock)
        # upcast: the blend stays fp32 (ground truth); otherwise rounded to the dtype.
        blend_dtype = torch.float32 if upcast else None
        k, v = blend(k, k_src, w, blend_dtype), blend(v, v_src, w, blend_dtype)
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    probs = torch.softmax(scores.float(), dim=-1).to(work)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work)).to(dtype)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    if return_lse:
        return out, torch.logsumexp(scores.float(), dim=-1)
    return out


def kv_lock_attention_torch(q, k, v, k_src=None, v_src=None, lock=None, *, softmax_scale=None,
                            return_lse: bool = False, query_chunk: int = 1024):
    """Memory-efficient PyTorch path, bshd tensors in, bshd out (+ lse (B, Hq, Sq) fp32).

    The blend follows ``reference.lock_kv``'s rule (fp32, rounded once); attention is
    ``F.scaled_dot_product_attention`` with GQA.  SDPA does
    not return the log-sum-exp, so with ``return_lse`` the attention is computed in
    query chunks of ``query_chunk`` rows: peak extra memory is chunk x Skv per head.
    """
    if lock is not None and k_src is not None:
        w = lock_as_bshd(lock)
        k, v = blend(k, k_src, w), blend(v, v_src, w)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not return_lse:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale,
                                             enable_gqa=kh.shape[1] != qh.shape[1])
        return out.transpose(1, 2)
    group = qh.shape[1] // kh.shape[1]
    kf = kh.repeat_interleave(group, dim=1).float()
    vf = vh.repeat_interleave(group, dim=1).float()
    B, H, Sq, D = qh.shape
    out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    for s in range(0, Sq, query_chunk):
        scores = torch.matmul(qh[:, :, s:s + query_chunk].float(), kf.transpose(-1, -2)) * scale
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - chunk_lse[..., None])
        out[:, s:s + query_chunk] = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
        lse[:, :, s:s + query_chunk] = chunk_lse
    return out, lse
