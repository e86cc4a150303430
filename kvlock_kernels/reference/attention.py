"""Pure-PyTorch references: the oracle every kernel is tested against, and the
memory-efficient fallback that CPU users get with ``backend="torch"``.

Everything here is deliberately plain PyTorch.  The oracle (``kv_lock_attention``)
materialises the full score matrix and is meant for tests at small shapes; the
fallback (``kv_lock_attention_torch``) blends K/V, then calls
``F.scaled_dot_product_attention`` and never builds an Sq x Skv fp32 matrix.

Both blend with the library's one rule (``reference.lock_kv``; float64 inputs blend in
float64 with the same selections) and are differentiable: the blend's backward is that of
the linear map ``k + w (k_src - k)`` (dk = (1 - w) g, dk_src = w g, dw = sum (k_src - k) g),
also at w == 0 and w == 1 where the forward selects one operand.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .lock_kv import blend, lock_as_bshd

__all__ = ["kv_lock_attention", "kv_lock_attention_torch", "blend_differentiable"]


class _Blend(torch.autograd.Function):
    """Forward: the blending rule.  Backward: the linear map's derivatives."""

    @staticmethod
    def forward(x, x_src, w, out_dtype):
        return blend(x, x_src, w, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, x_src, w, _ = inputs
        ctx.save_for_backward(x, x_src, w)

    @staticmethod
    def backward(ctx, grad):
        x, x_src, w = ctx.saved_tensors
        work = torch.float64 if torch.float64 in (x.dtype, x_src.dtype, w.dtype, grad.dtype) else torch.float32
        g, wf = grad.to(work), w.to(work)
        gx = gs = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g * (1 - wf)).sum_to_size(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gs = (g * wf).sum_to_size(x_src.shape).to(x_src.dtype)
        if ctx.needs_input_grad[2]:
            gw = (g * (x_src.to(work) - x.to(work))).sum_to_size(w.shape).to(w.dtype)
        return gx, gs, gw, None


def blend_differentiable(x: torch.Tensor, x_src: torch.Tensor, w: torch.Tensor,
                         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``reference.lock_kv.blend`` with the gradients of the linear blend (see module doc).
    x: (B, S, H, D); x_src: (B|1, S, H, D); w: broadcastable, e.g. (B|1, S, 1, 1)."""
    return _Blend.apply(x, x_src, w, out_dtype)


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
    work = (torch.float64 if dtype == torch.float64 else torch.float32) if upcast else dtype
    if lock is not None and k_src is not None:
        w_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        w = lock_as_bshd(lock, w_dtype)
        # upcast: the blend stays fp32 (ground truth); otherwise rounded to the dtype.
        blend_dtype = w_dtype if upcast else None
        k, v = blend_differentiable(k, k_src, w, blend_dtype), blend_differentiable(v, v_src, w, blend_dtype)
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    soft = torch.float64 if work == torch.float64 else torch.float32
    probs = torch.softmax(scores.to(soft), dim=-1).to(work)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(work)).to(dtype)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    if return_lse:
        return out, torch.logsumexp(scores.to(soft), dim=-1)
    return out


def kv_lock_attention_torch(q, k, v, k_src=None, v_src=None, lock=None, *, softmax_scale=None,
                            return_lse: bool = False, query_chunk: int = 1024):
    """Memory-efficient PyTorch path, bshd tensors in, bshd out (+ lse (B, Hq, Sq) fp32).

    q: (B, Sq, Hq, D); k, v: (B, Skv, Hkv, D); k_src, v_src: (B|1, Skv, Hkv, D); lock:
    (B, Skv), (1, Skv) or (Skv,).  The blend follows ``reference.lock_kv``'s rule (fp32,
    rounded once); attention is ``F.scaled_dot_product_attention`` with GQA.  SDPA does
    not return the log-sum-exp, so with ``return_lse`` the attention is computed in
    query chunks of ``query_chunk`` rows (fp32, float64 for float64 inputs): peak extra
    memory is chunk x Skv per head.  Differentiable (the recompute backward of the
    ``kvlock_kernels::kv_lock_attention`` op runs this function).
    """
    if lock is not None and k_src is not None:
        w = lock_as_bshd(lock, torch.float64 if k.dtype == torch.float64 else torch.float32)
        k, v = blend_differentiable(k, k_src, w), blend_differentiable(v, v_src, w)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not return_lse:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale,
                                             enable_gqa=kh.shape[1] != qh.shape[1]).transpose(1, 2)
        # A query row holding NaN or +-inf has no finite score (+-inf * k or NaN, and
        # inf - inf in the softmax), so IEEE arithmetic (the Triton kernel, the oracle, the
        # lse path below) gives a NaN row; PyTorch's CPU flash SDPA returns zeros for it.
        # One rule: NaN.
        return out.masked_fill(~torch.isfinite(q).all(dim=-1, keepdim=True), float("nan"))
    group = qh.shape[1] // kh.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = kh.repeat_interleave(group, dim=1).to(work)
    vf = vh.repeat_interleave(group, dim=1).to(work)
    outs, lses = [], []
    for s in range(0, qh.shape[2], query_chunk):
        scores = torch.matmul(qh[:, :, s:s + query_chunk].to(work), kf.transpose(-1, -2)) * scale
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - chunk_lse[..., None])
        outs.append(torch.matmul(probs, vf).transpose(1, 2).to(q.dtype))
        lses.append(chunk_lse.float() if work == torch.float32 else chunk_lse)
    if not outs:  # Sq == 0
        B, H, _, D = qh.shape
        return q.new_empty(B, 0, H, D), q.new_empty(B, H, 0, dtype=work)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)
