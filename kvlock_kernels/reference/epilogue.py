"""Reference of ``qkv_epilogue``: the attention-ready q, K', V' of a video DiT's
self-attention, from its q/k/v projections.

    q, k, v  (B, S, heads*D)  projection outputs
    q_out = rope(norm_q(q)),  K = rope(norm_k(k)),  V = v        viewed (B, S, heads, D)
    K' = K + w (K_src - K),   V' = V + w (V_src - V)             ``reference.lock_kv``'s rule

This is the PyTorch path of the op (``backend="torch"``) and the oracle of its kernel.
It runs the same sequence of torch operations as the stock diffusers processors, so
that without a lock (or with weight 0 everywhere) its outputs equal theirs bit for bit:

- ``norm="rms_across_heads"`` (Wan): ``F.rms_norm`` over the whole heads*D row, as
  ``torch.nn.RMSNorm(heads * D)``, then the row is split into heads.
- ``norm="rms_per_head"`` (HunyuanVideo): diffusers' ``RMSNorm(D)``: mean of squares
  in fp32, ``x * rsqrt(ms + eps)``, rounded to the weight's dtype when that is a half
  type, times the weight (plus bias).
- ``norm="layer_per_head"`` (CogVideoX): ``F.layer_norm`` over each head's D values.
- ``rope="interleaved"``: pairs (2i, 2i+1); ``rope="half"``: pairs (i, i + D/2).  For
  the tokens ``rope_start .. rope_start + S_rope``: ``x * cos + rotate(x) * sin`` with x
  upcast to fp32, ``rotate`` the pair rotation (-x_odd, x_even) or (-x_hi, x_lo), and one
  rounding back to the dtype.  Other tokens (text) are left as normed.

fp64 inputs keep fp64 for every intermediate that is fp32 for the other dtypes (the
path can then be gradchecked); results are otherwise unchanged by that rule.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .lock_kv import lock_kv

__all__ = ["NORMS", "ROPES", "apply_norm", "apply_rope", "qkv_epilogue"]

NORMS = ("none", "rms_across_heads", "rms_per_head", "layer_per_head")
ROPES = ("none", "interleaved", "half")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for fp16/bf16/fp32 (what the stock processors do), fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms_per_head(x, weight, bias, eps):
    """diffusers' ``RMSNorm`` over the last dim, operation by operation."""
    mean_sq = _upcast(x).square().mean(dim=-1, keepdim=True)
    y = x * torch.rsqrt(mean_sq + eps)
    if weight is None:
        return y.to(x.dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    y = y * weight
    return y if bias is None else y + bias


def apply_norm(x: torch.Tensor, kind: str, heads: int, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: Optional[float]) -> torch.Tensor:
    """Normalise a projection output x (B, S, heads*D); returns (B, S, heads, D)."""
    if kind == "rms_across_heads":
        x = F.rms_norm(x, (x.shape[-1],), weight, eps)
    xh = x.unflatten(-1, (heads, -1))
    if kind in ("none", "rms_across_heads"):
        return xh
    if eps is None:  # torch's default: the machine epsilon of the compute dtype
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    if kind == "rms_per_head":
        return _rms_per_head(xh, weight, bias, eps)
    if kind == "layer_per_head":
        return F.layer_norm(xh, (xh.shape[-1],), weight, bias, eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _rotate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The pair partner with the sign of the rotation: (-x_odd, x_even) or (-x_hi, x_lo)."""
    if kind == "interleaved":
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((odd.neg(), even), dim=-1).flatten(-2)
    lo, hi = x.chunk(2, dim=-1)
    return torch.cat((hi.neg(), lo), dim=-1)


def apply_rope(x: torch.Tensor, kind: str, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
               start: int = 0) -> torch.Tensor:
    """RoPE on tokens ``start .. start + cos.shape[0]`` of x (B, S, H, D); the others are
    returned unchanged.  cos, sin: (S_rope, D), one value per element of D."""
    if kind == "none":
        return x
    if kind not in ROPES:
        raise ValueError(f"rope must be one of {ROPES}, got {kind!r}")
    n = cos.shape[0]
    seg = x[:, start:start + n]
    cos_b, sin_b = cos.to(x.device)[None, :, None, :], sin.to(x.device)[None, :, None, :]
    rotated = (_upcast(seg) * cos_b + _upcast(_rotate(seg, kind)) * sin_b).to(x.dtype)
    if start == 0 and n == x.shape[1]:
        return rotated
    return torch.cat((x[:, :start], rotated, x[:, start + n:]), dim=1)


def rope_table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A RoPE table as (S_rope, D): (S_rope, D) as given, or diffusers' Wan layout
    (1, S_rope, 1, D)."""
    if t is None or t.dim() == 2:
        return t
    return t.reshape(t.shape[1], t.shape[-1])


def qkv_epilogue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, norm: str = "none",
                 norm_q_weight: Optional[torch.Tensor] = None, norm_q_bias: Optional[torch.Tensor] = None,
                 norm_k_weight: Optional[torch.Tensor] = None, norm_k_bias: Optional[torch.Tensor] = None,
                 norm_eps: Optional[float] = 1e-6, rope: str = "none", rope_cos: Optional[torch.Tensor] = None,
                 rope_sin: Optional[torch.Tensor] = None, rope_start: int = 0,
                 lock: Optional[torch.Tensor] = None, k_src: Optional[torch.Tensor] = None,
                 v_src: Optional[torch.Tensor] = None, source_index: Optional[int] = None):
    """(q_out, k_out, v_out), each (B, S, heads, D) in q's dtype (no argument checks).

    q, k, v: (B, S, heads*D) (or already (B, S, heads, D)).  norm weights: (heads*D,)
    for "rms_across_heads", (D,) otherwise.  rope_cos, rope_sin: (S_rope, D) (or
    (1, S_rope, 1, D)).  lock: (S,), (1, S) or (B, S); the source is k_src, v_src
    (B|1, S, heads, D), already normed and rotated, or batch entry ``source_index``.
    Differentiable (this is also the op's backward).
    """
    if q.dim() == 4:
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
    cos, sin = rope_table(rope_cos), rope_table(rope_sin)
    q_out = apply_rope(apply_norm(q, norm, heads, norm_q_weight, norm_q_bias, norm_eps), rope, cos, sin, rope_start)
    k_out = apply_rope(apply_norm(k, norm, heads, norm_k_weight, norm_k_bias, norm_eps), rope, cos, sin, rope_start)
    v_out = v.unflatten(-1, (heads, -1))
    # A norm weight in a wider dtype than q (kept in fp32, say) widens the stock result;
    # the op's outputs are q's dtype.
    q_out, k_out = q_out.to(q.dtype), k_out.to(q.dtype)
    if lock is not None and (k_src is not None or source_index is not None):
        k_out, v_out = lock_kv(k_out, v_out, lock, k_src=k_src, v_src=v_src, source_index=source_index)
    return q_out, k_out, v_out
