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

__all__ = [
    "blend_kv",
    "branch_variance",
    "cfg_zero_star_scale",
    "kvlock_guidance",
    "kv_lock_attention",
    "kv_lock_attention_torch",
    "merge_attention_states",
]


def _to_bshd(t: Optional[torch.Tensor], layout: str) -> Optional[torch.Tensor]:
    if t is None or layout == "bshd":
        return t
    if layout == "bhsd":
        return t.transpose(1, 2)
    raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")


def _lock_bshd(lock: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Skv,), (1, Skv) or (B, Skv) -> (B|1, Skv, 1, 1), broadcastable over (B, Skv, H, D)."""
    if lock.dim() == 1:
        lock = lock[None]
    return lock.to(dtype)[:, :, None, None]


def blend_kv(k, v, k_src, v_src, lock, *, dtype: Optional[torch.dtype] = None):
    """Locked keys/values ``k + lock * (k_src - k)`` (same for v), in bshd layout.

    k, v: (B, Skv, Hkv, D); k_src, v_src: (B|1, Skv, Hkv, D); lock: (Skv,), (1, Skv)
    or (B, Skv).  The arithmetic runs in ``dtype`` (default: k's dtype) and the result
    is returned in k's dtype.  Returns (k, v) unchanged when lock or k_src is None.
    """
    if lock is None or k_src is None:
        return k, v
    work = dtype or k.dtype
    w = _lock_bshd(lock, work)
    kf, vf = k.to(work), v.to(work)
    k_out = kf + w * (k_src.to(work) - kf)
    v_out = vf + w * (v_src.to(work) - vf)
    return k_out.to(k.dtype), v_out.to(v.dtype)


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
    k, v = blend_kv(k, v, k_src, v_src, lock, dtype=torch.float32 if upcast else None)
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

    The blend is one ``torch.lerp`` in the input dtype (computed in fp32 internally,
    rounded once; the lock is rounded to the dtype); attention is
    ``F.scaled_dot_product_attention`` with GQA.  SDPA does
    not return the log-sum-exp, so with ``return_lse`` the attention is computed in
    query chunks of ``query_chunk`` rows: peak extra memory is chunk x Skv per head.
    """
    if lock is not None and k_src is not None:
        w = _lock_bshd(lock, k.dtype)
        k, v = torch.lerp(k, k_src, w), torch.lerp(v, v_src, w)
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


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Reference merge of two partial attentions over disjoint key sets.

    out_*: (B, S, H, D); lse_*: (B, H, S) fp32 natural-log.  Math in fp32; an lse of
    -inf marks an empty partial (weight 0).  Returns (out in out_a's dtype, lse fp32).
    """
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    # Both -inf: keep weights finite (0) instead of NaN.
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    wa = torch.exp(la - safe).transpose(1, 2)[..., None]
    wb = torch.exp(lb - safe).transpose(1, 2)[..., None]
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse


def masked_mean(values, mask):
    """Mean of values (B, *spatial) over positions where mask (B|1, *spatial) != 0, per
    sample; 0 where a sample's mask is empty.  mask=None: plain mean."""
    if mask is None:
        return values.flatten(1).mean(dim=1) if values[0].numel() else values.new_zeros(values.shape[0])
    sel = (mask != 0).expand_as(values).flatten(1)
    total = torch.where(sel, values.flatten(1), torch.zeros((), dtype=values.dtype, device=values.device)).sum(1)
    count = sel.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def branch_variance(x, *, mask=None, correction: int = 1):
    """x (N, B, C, *spatial) -> (var_map (B, *spatial) fp32, masked_mean (B,) fp32)."""
    var_map = x.float().var(dim=0, correction=correction).mean(dim=1)
    return var_map, masked_mean(var_map, mask)


def cfg_zero_star_scale(v_cond, v_uncond, eps: float = 1e-8):
    """s* = <v_c, v_u> / (||v_u||^2 + eps) per sample, (B,) fp32 (fp32 math, cascaded sums)."""
    vc, vu = v_cond.float().flatten(1), v_uncond.float().flatten(1)
    return (vc * vu).sum(1) / ((vu * vu).sum(1) + eps)


def _per_sample(value, batch, ndim, device):
    """A float, () or (B,) tensor as an fp32 tensor broadcastable over (B, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.reshape(-1, *([1] * (ndim - 1))) if t.dim() == 1 else t


def kvlock_guidance(v_cond, v_uncond, omega, *, s_star=None, latents=None, sigma=None):
    """guided = (1 - omega) * s * v_uncond + omega * v_cond (s = s_star or 1), in fp32 and
    returned in v's dtype; with latents and sigma also x0_hat = latents - sigma * guided
    (from the fp32 guided), in latents' dtype."""
    B, nd, dev = v_cond.shape[0], v_cond.dim(), v_cond.device
    w = _per_sample(omega, B, nd, dev)
    s = _per_sample(1.0 if s_star is None else s_star, B, nd, dev)
    guided = (1 - w) * s * v_uncond.float() + w * v_cond.float()
    if latents is None:
        return guided.to(v_cond.dtype)
    x0 = latents.float() - _per_sample(sigma, B, nd, dev) * guided
    return guided.to(v_cond.dtype), x0.to(latents.dtype)
