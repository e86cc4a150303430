"""PyTorch references of the control-loop ops: the oracles of branch_variance,
cfg_zero_star_scale and kvlock_guidance, and what CPU tensors run."""
from __future__ import annotations

import math

import torch

__all__ = ["branch_variance", "cfg_zero_star_scale", "kvlock_guidance", "masked_mean"]


def _flat(t, batch):
    """(B, *spatial) -> (B, P), also for B = 0 and no spatial dims."""
    return t.reshape(batch, math.prod(t.shape[1:]))


def masked_mean(values, mask):
    """Mean of values (B, *spatial) over positions where mask (B|1, *spatial) != 0, per
    sample; 0 where nothing is counted.  mask=None: every position counts.  NaN only
    where a counted value is NaN (uncounted values are not read)."""
    B = values.shape[0]
    flat = _flat(values, B)
    sel = torch.ones_like(flat, dtype=torch.bool) if mask is None else _flat((mask != 0).expand(values.shape), B)
    total = torch.where(sel, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).sum(1)
    count = sel.sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def branch_variance(x, *, mask=None, correction: int = 1):
    """x (N, B, C, *spatial) -> (var_map (B, *spatial) fp32, masked_mean (B,) fp32).
    A NaN or inf in x gives NaN at its position of var_map (as the kernel)."""
    xf = x.float()
    # (An empty x would make torch.var warn about degrees of freedom.)
    var = xf.var(dim=0, correction=correction) if xf.numel() else xf.new_zeros(xf.shape[1:])
    # torch.var of values with an inf can give inf or NaN; the op's rule is NaN.
    finite = torch.isfinite(xf).all(dim=0)
    var = torch.where(finite, var, torch.full((), float("nan"), device=var.device))
    var_map = var.mean(dim=1)
    return var_map, masked_mean(var_map, mask)


def _finalise_scale(dot, norm, eps):
    """s* from fp32 partial sums: NaN where the sums are not finite (a NaN or inf in the
    sample, or an fp32 overflow), never a finite number made from them."""
    s = dot / (norm + eps)
    return torch.where(torch.isfinite(dot) & torch.isfinite(norm), s, torch.full_like(s, float("nan")))


def _per_sample_flat(t):
    """(B, ...) -> (B, L): a 1-D tensor is B samples of one element each."""
    return t[:, None] if t.dim() == 1 else t.flatten(1)


def cfg_zero_star_scale(v_cond, v_uncond, eps: float = 1e-8):
    """s* = <v_c, v_u> / (||v_u||^2 + eps) per sample, (B,) fp32 (fp32 math, cascaded
    sums); NaN for a sample with a NaN or inf (see ``_finalise_scale``)."""
    vc, vu = _per_sample_flat(v_cond.float()), _per_sample_flat(v_uncond.float())
    return _finalise_scale((vc * vu).sum(1), (vu * vu).sum(1), eps)


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
