"""Background fidelity of an edit: PSNR and SSIM of the edited video against the source over the
background only, and how much the foreground changed beside them.

Both videos are compared at the model's resolution (the source after the geometry rule,
exactly what was encoded), as RGB in [0, 1].

- **PSNR** over a region: ``10 log10(1 / MSE)`` with the MSE averaged over the region's
  pixels and the three channels of every frame; capped at 100 dB (identical pixels).
- **SSIM** (Wang et al. 2004): Gaussian window 11 px, sigma 1.5, K1 = 0.01, K2 = 0.03,
  data range 1, computed per channel on each whole frame (reflect padding at the frame
  borders, window shrunk to the frame for frames smaller than 11 px), averaged over the
  channels, then over the region's pixels.  Windows near the mask boundary see both sides:
  that is the usual "background SSIM" of video-editing benchmarks, which mask the metric,
  not the frames.
- **Foreground change**: PSNR, SSIM and mean absolute difference over the foreground.  A
  real edit has a low foreground PSNR (the region changed) and a high background PSNR.

An empty region gives ``None`` for its entries (e.g. the background of an all-foreground
mask).  Implemented in torch, in chunks of frames, on the frames' device.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_unit_video", "masked_psnr", "ssim_map", "masked_ssim", "fidelity", "PSNR_CAP_DB"]

PSNR_CAP_DB = 100.0
_K1, _K2 = 0.01, 0.03


def to_unit_video(frames) -> torch.Tensor:
    """(F, H, W, 3) uint8 (numpy or torch) or (F, 3, H, W) float in [0, 1] -> (F, 3, H, W) float32 in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
    if x.dim() != 4:
        raise ValueError(f"frames must be (F, H, W, 3) uint8 or (F, 3, H, W) float, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (F, H, W, 3), got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if not x.is_floating_point() or x.shape[1] != 3:
        raise ValueError(f"float frames must be (F, 3, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}")
    return x.float()


def _region(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape[0], like.shape[2], like.shape[3], dtype=torch.bool, device=like.device)
    if tuple(mask.shape) != (like.shape[0], like.shape[2], like.shape[3]):
        raise ValueError(f"mask must be (F, H, W) = {(like.shape[0], like.shape[2], like.shape[3])}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(like.device).bool()


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                data_range: float = 1.0) -> Optional[float]:
    """PSNR in dB between (F, 3, H, W) videos over the pixels where mask (F, H, W) is True
    (all pixels when None); None for an empty region; capped at ``PSNR_CAP_DB``."""
    m = _region(mask, a)
    n = int(m.sum())
    if n == 0:
        return None
    sq = 0.0
    for s in range(0, a.shape[0], 16):
        d = (a[s:s + 16].double() - b[s:s + 16].to(a.device).double()) ** 2
        sq += float((d.sum(1) * m[s:s + 16]).sum())
    return _psnr_db(sq, n * a.shape[1], data_range)


def _psnr_db(sq: float, count: int, data_range: float) -> float:
    """PSNR of a summed squared error over ``count`` values, capped at ``PSNR_CAP_DB``."""
    mse = sq / count
    if mse <= data_range ** 2 * 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian(window: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(window, device=device, dtype=dtype) - (window - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = 11,
             sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of (N, C, H, W) images, averaged over channels -> (N, H, W) float32."""
    n, c, h, w = a.shape
    win = min(window, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if win < 1:
        raise ValueError(f"frames of {h}x{w} are too small for SSIM")
    g = _gaussian(win, sigma * win / window, a.device, torch.float32)
    gy = g.view(1, 1, win, 1).expand(c, 1, win, 1)
    gx = g.view(1, 1, 1, win).expand(c, 1, 1, win)
    pad = win // 2

    def blur(x):
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(F.conv2d(x, gy, groups=c), gx, groups=c)

    a, b = a.float(), b.float()
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean(dim=1)


def masked_ssim(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                data_range: float = 1.0) -> Optional[float]:
    """Mean SSIM of (F, 3, H, W) videos over the pixels where mask (F, H, W) is True; None if empty."""
    m = _region(mask, a)
    n = int(m.sum())
    if n == 0:
        return None
    total = 0.0
    for s in range(0, a.shape[0], 8):
        sm = ssim_map(a[s:s + 8], b[s:s + 8].to(a.device), data_range=data_range)
        total += float((sm.double() * m[s:s + 8]).sum())
    return total / n


def fidelity(source, edited, fg_mask: torch.Tensor) -> dict:
    """Background fidelity and foreground change of an edit.

    Arguments:
        source, edited: (F, H, W, 3) uint8 or (F, 3, H, W) float in [0, 1], same shape.
        fg_mask: (F, H, W) bool, True = foreground (the edited region).
    Returns:
        {"background": {"psnr", "ssim", "mean_abs_diff", "pixels", "fraction"},
         "foreground": {the same}} with None for an empty region.
    """
    a, b = to_unit_video(source), to_unit_video(edited)
    if a.shape != b.shape:
        raise ValueError(f"source and edited must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    fg = _region(fg_mask, a)
    total = fg.numel()
    fg_pixels = int(fg.sum())
    regions = {"background": (~fg, total - fg_pixels), "foreground": (fg, fg_pixels)}
    # One pass over the frames: each chunk's squared difference, SSIM map and absolute
    # difference is computed once and summed under both masks (same chunks and double-precision
    # sums as masked_psnr / masked_ssim).
    sq = dict.fromkeys(regions, 0.0)
    ss = dict.fromkeys(regions, 0.0)
    ab = dict.fromkeys(regions, 0.0)
    for s in range(0, a.shape[0], 16):
        ca, cb = a[s:s + 16], b[s:s + 16].to(a.device)
        d2 = ((ca.double() - cb.double()) ** 2).sum(1)
        d1 = (ca - cb).abs().mean(1).double()
        for name, (m, _) in regions.items():
            sq[name] += float((d2 * m[s:s + 16]).sum())
            ab[name] += float((d1 * m[s:s + 16]).sum())
        for k in range(0, ca.shape[0], 8):
            sm = ssim_map(ca[k:k + 8], cb[k:k + 8]).double()
            for name, (m, _) in regions.items():
                ss[name] += float((sm * m[s + k:s + k + 8]).sum())
    out = {}
    for name, (_, n) in regions.items():
        out[name] = {"psnr": _psnr_db(sq[name], n * a.shape[1], 1.0) if n else None,
                     "ssim": ss[name] / n if n else None, "mean_abs_diff": ab[name] / n if n else None,
                     "pixels": n, "fraction": n / total}
    return out
