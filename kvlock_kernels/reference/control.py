"""PyTorch references of the control-loop ops: the oracles of branch_variance,
cfg_zero_star_scale and kvlock_guidance, and what CPU tensors run."""
from __future__ import annotations

import torch

__all__ = ["branch_variance", "cfg_zero_star_scale", "kvlock_guidance", "masked_mean"]


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
