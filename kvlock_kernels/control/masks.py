"""Edit masks from pixels to latents to DiT tokens, and per-token lock weights.

Mask values (every function here):
- bool and uint8 masks are binary: nonzero = foreground (edit), so a uint8 0/255 mask
  read from an image file works as is.  Their results are bool / uint8 0-1 masks.
- float masks (fp16, bf16, fp32, fp64) must lie in [0, 1] (NaN and values outside are a
  ValueError; the check reads the mask on the host once, skipped under torch.compile and
  CUDA-graph capture or with ``check_values=False``).  Soft values are kept: pooling takes
  the maximum, so a latent cell or token carries the largest value of the pixels it
  covers, and ``lock_weights`` turns a soft value m into a partial lock alpha * (1 - m).
- A mask with a channel dimension (an RGB/RGBA image, (F, H, W, 3)) is refused with a
  ValueError: reduce it to one channel first (``mask.amax(-1)``: any channel nonzero is
  foreground).

Pixel -> latent follows the VAE (Wan's AutoencoderKLWan, strides (4, 8, 8)):
- time: the encoder takes frame 0 alone, then chunks of 4 frames, ``1 + (F - 1) // 4``
  latent frames; frames after the last full chunk are never read by the VAE, and are
  dropped here in the same way.  Latent frame t >= 1 covers pixel frames 1 + 4(t-1) .. 4t.
- space: each stride-2 downsampling of the encoder floors, so the latent is
  ``H // 8 x W // 8``; the rows (columns) after the last full group of 8 are still read by
  the encoder's last latent row (column), so they are pooled into it (conservative).
  H or W below the stride cannot be encoded: ValueError.
Every step is a max-pool, so any latent cell or token that touches an edited pixel is
foreground.  These run once per edit (not per step), as plain PyTorch ops on the mask's
device.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .._validate import (
    MASK_DTYPES,
    check_bool,
    check_mask,
    check_tensor,
    check_values_in_range,
    describe,
)

__all__ = ["latent_size", "latent_frames", "latent_mask_to_tokens", "lock_weights", "pixel_mask_to_latent"]


def _check_stride(name, stride, n):
    if not isinstance(stride, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of {n} positive ints, got {describe(stride)}")
    if len(stride) != n or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in stride):
        raise ValueError(f"{name} must be {n} positive ints, got {tuple(stride)!r}")
    return tuple(int(s) for s in stride)


def latent_frames(num_frames: int, temporal_stride: int = 4) -> int:
    """Latent frames the causal VAE makes of ``num_frames`` pixel frames:
    ``1 + (num_frames - 1) // temporal_stride`` (trailing frames that do not fill a
    chunk are dropped, as the VAE drops them)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral):
        raise TypeError(f"num_frames must be an int, got {describe(num_frames)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    (st,) = _check_stride("temporal_stride", (temporal_stride,), 1)
    return 1 + (int(num_frames) - 1) // st


def latent_size(num_frames: int, height: int, width: int, vae_stride=(4, 8, 8)) -> tuple[int, int, int]:
    """(T, h, w) of the VAE latent of a (num_frames, height, width) video: the shape
    ``pixel_mask_to_latent`` returns for a mask of that size."""
    st, sh, sw = _check_stride("vae_stride", vae_stride, 3)
    for name, size, s in (("height", height, sh), ("width", width, sw)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {describe(size)}")
        if size < s:
            raise ValueError(f"{name} must be >= the VAE's spatial stride {s} (the VAE cannot encode fewer "
                             f"pixels), got {size}")
    return latent_frames(num_frames, st), int(height) // sh, int(width) // sw


def _as_batched(name, mask, check_values, pixel_stride=None):
    """(F, H, W) or (B, F, H, W) -> (B, F, H, W) and whether to squeeze B again."""
    check_tensor(name, mask, dtypes=MASK_DTYPES)
    layout = "(F, H, W) or (B, F, H, W)"
    # A trailing 1/3/4 below the VAE's stride cannot be a width the VAE encodes: it is a
    # channel dimension, of a video (F, H, W, C) or of a single image (H, W, C).
    if mask.dim() == 5 or (mask.dim() in (3, 4) and pixel_stride is not None and mask.shape[-1] in (1, 3, 4)
                           and mask.shape[-1] < pixel_stride):
        raise ValueError(f"{name} must be {layout} with one value per pixel, got shape {tuple(mask.shape)}, which "
                         "looks like an image with a channel dimension (RGB/RGBA): reduce it to one channel first, "
                         "e.g. mask.amax(-1) (any channel nonzero = foreground)")
    check_mask(name, mask, ndim=(3, 4), layout=layout, check_values=check_values)
    return (mask[None], True) if mask.dim() == 3 else (mask, False)


def _as_float(mask):
    """Binary masks to 0/1, float masks as they are (checked in [0, 1])."""
    if mask.dtype in (torch.bool, torch.uint8):
        return (mask != 0).to(torch.float32)
    return mask if mask.dtype == torch.float64 else mask.to(torch.float32)


def _restore(result, like, squeeze):
    if like.dtype == torch.bool:
        result = result > 0
    elif like.dtype == torch.uint8:
        result = (result > 0).to(torch.uint8)
    else:
        result = result.to(like.dtype)
    return result[0] if squeeze else result


def pixel_mask_to_latent(mask: torch.Tensor, vae_stride=(4, 8, 8), *, strict: bool = False,
                         pad: bool | None = None, check_values: bool = True) -> torch.Tensor:
    """Pixel edit mask -> latent mask, grouped exactly as the VAE groups the video.

    Arguments:
        mask: (F, H, W) or (B, F, H, W); bool/uint8 (nonzero = edit, foreground) or
            float in [0, 1] (soft values kept: each latent cell gets the maximum of its
            pixels).  F >= 1, H >= sh, W >= sw.
        vae_stride: (st, sh, sw), Wan's (4, 8, 8) (``vae.config.scale_factor_temporal``,
            ``scale_factor_spatial``).
        strict: refuse (ValueError) a mask the VAE would not map one to one: F not of
            the form 1 + st * k, or H, W not multiples of sh, sw.
        pad: accepted for compatibility and ignored.  It used to pad F up to 1 + st * k,
            which gave one latent frame more than the VAE; the result now always has the
            VAE's frame count.
        check_values: check float masks lie in [0, 1] (one host read of the mask).
    Returns:
        (T, H // sh, W // sw) or (B, T, ...) with T = 1 + (F - 1) // st; bool for bool
        masks, uint8 0/1 for uint8 masks, float masks in their dtype.  Frames after the
        last full group of st are dropped (the VAE never reads them); pixel rows and
        columns after the last full group of sh (sw) are pooled into the last latent row
        (column), whose receptive field covers them.
    """
    st, sh, sw = _check_stride("vae_stride", vae_stride, 3)
    check_bool("strict", strict)
    if pad is not None:
        check_bool("pad", pad)
    check_bool("check_values", check_values)
    m, squeeze = _as_batched("mask", mask, check_values, pixel_stride=sw)
    B, Fr, H, W = m.shape
    if Fr == 0:
        raise ValueError(f"mask must have at least one frame, got shape {tuple(mask.shape)}")
    if H < sh or W < sw:
        raise ValueError(f"mask of shape (F, H, W) = ({Fr}, {H}, {W}) is smaller than the VAE's spatial stride "
                         f"({sh}, {sw}): the VAE cannot encode it")
    T, h, w = 1 + (Fr - 1) // st, H // sh, W // sw
    if strict and ((Fr - 1) % st or H % sh or W % sw):
        raise ValueError(f"mask of shape (F, H, W) = ({Fr}, {H}, {W}) does not fit vae_stride {(st, sh, sw)} "
                         f"one to one: F must be 1 + {st}k (the first frame is alone), H a multiple of {sh}, "
                         f"W of {sw}; strict=False drops the trailing frames as the VAE does")
    x = _as_float(m)[:, : 1 + (T - 1) * st]  # the frames the VAE reads
    rest = x[:, 1:].reshape(B, T - 1, st, H, W).amax(dim=2)
    x = torch.cat([x[:, :1], rest], dim=1)
    # Rows/columns past the last full group go to the last latent row/column: pad with
    # copies of the remainder up to a full group, then max-pool.
    pad_h, pad_w = (-H) % sh, (-W) % sw
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    x = x.reshape(B, T, h + (pad_h > 0), sh, w + (pad_w > 0), sw).amax(dim=(3, 5))
    if pad_h:
        x = torch.cat([x[:, :, : h - 1], x[:, :, h - 1:].amax(dim=2, keepdim=True)], dim=2)
    if pad_w:
        x = torch.cat([x[..., : w - 1], x[..., w - 1:].amax(dim=3, keepdim=True)], dim=3)
    return _restore(x, mask, squeeze)


def latent_mask_to_tokens(mask: torch.Tensor, patch=(1, 2, 2), *, check_values: bool = True) -> torch.Tensor:
    """Latent mask -> token mask: max-pool over the DiT's patches, flatten in (t, h, w) order.

    Arguments:
        mask: (T, H, W) or (B, T, H, W); bool/uint8 (nonzero = foreground) or float in
            [0, 1] (soft values kept: each token gets the maximum of its cells).  T, H, W
            multiples of patch (the DiT patchifies without padding).
        patch: (pt, ph, pw), Wan's (1, 2, 2).
        check_values: check float masks lie in [0, 1] (one host read of the mask).
    Returns:
        (L,) or (B, L) with L = (T / pt) (H / ph) (W / pw); bool for bool masks, uint8
        0/1 for uint8 masks, float masks in their dtype.
    """
    pt, ph, pw = _check_stride("patch", patch, 3)
    check_bool("check_values", check_values)
    m, squeeze = _as_batched("mask", mask, check_values)
    B, T, H, W = m.shape
    if T % pt or H % ph or W % pw:
        raise ValueError(f"mask of shape (T, H, W) = ({T}, {H}, {W}) is not divisible by patch {(pt, ph, pw)}")
    x = _as_float(m).reshape(B, T // pt, pt, H // ph, ph, W // pw, pw).amax(dim=(2, 4, 6))
    return _restore(x.reshape(B, -1), mask, squeeze)


def lock_weights(token_fg_mask: torch.Tensor, alpha, *, check_inputs: bool = True) -> torch.Tensor:
    """Per-key-token lock weights ``alpha * (1 - m)``, fp32, on the mask's device.

    Arguments:
        token_fg_mask: (L,) or (B, L); bool/uint8 (nonzero = foreground, m = 1) or float
            in [0, 1] (a soft value m gives the partial lock alpha * (1 - m)).
        alpha: the fusion ratio in [0, 1]: a Python number, or a 0-dim floating tensor on
            the mask's device (stays on the device: the scheduler's alpha).
        check_inputs: check a float mask and a tensor alpha lie in [0, 1] and are not NaN
            (one host read each; skipped under torch.compile and CUDA-graph capture).
            Where the check does not run, a tensor alpha is clamped to [0, 1] on the
            device (a NaN alpha stays NaN); a Python alpha is always checked.
    Returns:
        lock weights with token_fg_mask's shape, fp32 (the ``lock`` of kv_lock_attention
        and lock_kv).
    """
    check_bool("check_inputs", check_inputs)
    check_mask("token_fg_mask", token_fg_mask, ndim=(1, 2), layout="(L,) or (B, L)", check_values=check_inputs)
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a Python number or a floating-point 0-dim tensor, got {describe(alpha)}")
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a Python number or a 0-dim tensor, got shape {tuple(alpha.shape)}")
        if alpha.device != token_fg_mask.device:
            raise ValueError(f"alpha must be on token_fg_mask's device {token_fg_mask.device}, got {alpha.device}")
    m = _as_float(token_fg_mask).to(torch.float32)
    if isinstance(alpha, torch.Tensor):
        check_values_in_range("alpha", alpha, low=0.0, high=1.0, check_values=check_inputs)
        alpha = alpha.to(torch.float32).clamp(0.0, 1.0)
    elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:  # NaN fails too
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    else:
        raise TypeError(f"alpha must be a Python number or a 0-dim tensor, got {describe(alpha)}")
    return alpha * (1.0 - m)
