"""Edit masks from pixels to latents to DiT tokens, and per-token lock weights.

Wan's causal 3D VAE compresses time by 4 with the first frame alone: latent frame 0
covers pixel frame 0, latent frame t >= 1 covers pixel frames 1 + 4(t-1) .. 4t.  Every
step is a max-pool, so any token that touches an edited pixel is foreground.  These run
once per edit (not per step), as plain PyTorch ops on the mask's device.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

__all__ = ["pixel_mask_to_latent", "latent_mask_to_tokens", "lock_weights"]

_MASK_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_mask(name, mask, ndims, layout):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{name} must be bool, uint8 or float, got {mask.dtype}")
    if mask.dim() not in ndims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(mask.shape)}")


def _as_batched(name, mask):
    _check_mask(name, mask, (3, 4), "(F, H, W) or (B, F, H, W)")
    return (mask[None], True) if mask.dim() == 3 else (mask, False)


def _restore(result, like, squeeze):
    result = (result > 0) if like.dtype == torch.bool else result.to(like.dtype)
    return result[0] if squeeze else result


def _check_stride(name, stride, n):
    if len(stride) != n or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stride):
        raise ValueError(f"{name} must be {n} positive ints, got {stride!r}")


def pixel_mask_to_latent(mask: torch.Tensor, vae_stride=(4, 8, 8), *, pad: bool = False) -> torch.Tensor:
    """Pixel edit mask -> latent mask with the causal temporal grouping.

    Arguments:
        mask: (F, H, W) or (B, F, H, W), bool/uint8/float, nonzero = edit (foreground).
            F must be 1 + st * k and H, W multiples of the spatial strides.
        vae_stride: (st, sh, sw), Wan's (4, 8, 8).
        pad: pad F up to 1 + st * k and H, W up to the strides with unedited pixels
            instead of raising.
    Returns:
        (T, H / sh, W / sw) or (B, T, ...) with T = 1 + (F - 1) / st, in mask's dtype.
    """
    _check_stride("vae_stride", tuple(vae_stride), 3)
    st, sh, sw = vae_stride
    m, squeeze = _as_batched("mask", mask)
    B, Fr, H, W = m.shape
    if Fr == 0:
        raise ValueError("mask must have at least one frame")
    pad_f, pad_h, pad_w = (-(Fr - 1)) % st, (-H) % sh, (-W) % sw
    if (pad_f or pad_h or pad_w) and not pad:
        raise ValueError(f"mask of shape (F, H, W) = ({Fr}, {H}, {W}) does not fit vae_stride {tuple(vae_stride)}: "
                         f"F must be 1 + {st}k (the first frame is alone), H a multiple of {sh}, W of {sw}; "
                         "pass pad=True to pad with unedited pixels")
    x = m.float()
    if pad_f or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_f))
        Fr, H, W = Fr + pad_f, H + pad_h, W + pad_w
    first = x[:, :1]
    rest = x[:, 1:].reshape(B, (Fr - 1) // st, st, H, W).amax(dim=2)
    x = torch.cat([first, rest], dim=1)
    x = x.reshape(B, x.shape[1], H // sh, sh, W // sw, sw).amax(dim=(3, 5))
    return _restore(x, mask, squeeze)


def latent_mask_to_tokens(mask: torch.Tensor, patch=(1, 2, 2)) -> torch.Tensor:
    """Latent mask -> token mask: max-pool over the DiT's patches, flatten in (t, h, w) order.

    Arguments:
        mask: (T, H, W) or (B, T, H, W), bool/uint8/float; T, H, W multiples of patch.
        patch: (pt, ph, pw), Wan's (1, 2, 2).
    Returns:
        (L,) or (B, L) with L = (T / pt) (H / ph) (W / pw), in mask's dtype.
    """
    _check_stride("patch", tuple(patch), 3)
    pt, ph, pw = patch
    m, squeeze = _as_batched("mask", mask)
    B, T, H, W = m.shape
    if T % pt or H % ph or W % pw:
        raise ValueError(f"mask of shape (T, H, W) = ({T}, {H}, {W}) is not divisible by patch {tuple(patch)}")
    x = m.float().reshape(B, T // pt, pt, H // ph, ph, W // pw, pw).amax(dim=(2, 4, 6))
    return _restore(x.reshape(B, -1), mask, squeeze)


def lock_weights(token_fg_mask: torch.Tensor, alpha) -> torch.Tensor:
    """Per-key-token lock weights ``alpha * (1 - m)``, fp32, on the mask's device.

    Arguments:
        token_fg_mask: (L,) or (B, L), bool/uint8/float in [0, 1]; 1 = foreground.
        alpha: the fusion ratio in [0, 1]: a float, or a 0-dim tensor (stays on the device).
    Returns:
        lock weights with token_fg_mask's shape, fp32 (the ``lock`` of kv_lock_attention).
    """
    _check_mask("token_fg_mask", token_fg_mask, (1, 2), "(L,) or (B, L)")
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    elif isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a float or a 0-dim tensor, got shape {tuple(alpha.shape)}")
        if alpha.device != token_fg_mask.device:
            raise ValueError(f"alpha is on {alpha.device} but token_fg_mask on {token_fg_mask.device}")
    else:
        raise TypeError(f"alpha must be a float or a 0-dim tensor, got {type(alpha).__name__}")
    return alpha * (1.0 - token_fg_mask.to(torch.float32))
