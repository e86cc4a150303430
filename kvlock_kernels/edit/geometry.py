"""The one rule that fits a video and its mask to a model's constraints.

A video DiT with a causal video VAE takes ``1 + t*k`` frames (Wan: t = 4, the first frame
is encoded alone, then groups of 4) and sizes that are multiples of the VAE's spatial
factor times the transformer's patch size (Wan2.1 / Wan2.2 A14B: 8 * 2 = 16; Wan2.2
TI2V-5B: 16 * 2 = 32).  ``plan_fit`` decides, from the source's shape and the
requested ``frames`` / ``height`` / ``width``, and the plan is applied identically to the
video and to the mask:

1. **Frames**: take the first ``frames`` frames (default: all of them; never more than
   the source has), then drop trailing frames down to the largest ``1 + t*k`` count (and,
   for a transformer that patchifies time, e.g. CogVideoX 1.5's ``patch_size_t = 2``,
   down to a latent frame count ``k + 1`` that is a multiple of it).
   Nothing is resampled in time: the output keeps the source's frame rate.
2. **Target size**: ``height`` x ``width`` when both are given; one of them given: the
   other follows the source's aspect ratio; neither: the source's size.  Each is then
   rounded *down* to its multiple (at least one multiple).
3. **Scale and crop**: scale the frames uniformly (aspect ratio kept) by the smallest
   factor that covers the target, then crop the centre.  A source already at the target
   size is not resampled; a source that only needs rounding is only cropped.

Video frames are resampled bilinearly with antialiasing.  The mask goes through the same
scale and crop, conservatively: when shrinking, a model pixel is foreground if its
footprint touches a foreground source pixel (a thin mask never vanishes); when growing,
nearest neighbour.  ``FitPlan.message`` says what was done.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..control.masks import latent_frames
from .errors import EditInputError

__all__ = ["ModelConstraints", "FitPlan", "plan_fit", "resize_mask"]


def config_getter(config):
    """``get(key, default)`` over a config that is a dict (or diffusers FrozenDict) or an object with attributes."""
    return config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))


@dataclass(frozen=True)
class ModelConstraints:
    """What a model accepts.

    Attributes:
        temporal: frames must be ``1 + temporal * k`` (the VAE's temporal factor).
        multiple_h, multiple_w: height and width must be multiples of these
            (VAE spatial factor times the transformer's patch size).
        vae_stride: (temporal, spatial, spatial) compression of the VAE, pixels -> latents.
        patch: the transformer's (pt, ph, pw) patch size, latents -> tokens.
        latent_frame_multiple: latent frames must be a multiple of this (the temporal patch pt).
    """

    temporal: int = 4
    multiple_h: int = 16
    multiple_w: int = 16
    vae_stride: tuple = (4, 8, 8)
    patch: tuple = (1, 2, 2)
    latent_frame_multiple: int = 1

    @classmethod
    def from_pipe(cls, pipe) -> "ModelConstraints":
        """Read the constraints from a loaded diffusers pipeline (its VAE and transformer)."""
        vae = pipe.vae
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", None)
                       or getattr(vae.config, "scale_factor_temporal", None) or 4)
        spatial = int(getattr(pipe, "vae_scale_factor_spatial", None)
                      or getattr(vae.config, "scale_factor_spatial", None) or 8)
        transformer = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.transformer_2
        return cls.from_configs(temporal, spatial, transformer.config)

    @classmethod
    def from_configs(cls, temporal: int, spatial: int, transformer_config) -> "ModelConstraints":
        """From the VAE's temporal / spatial factors and the transformer's config (``patch_size``
        as Wan's (pt, ph, pw) or CogVideoX's int with ``patch_size_t``)."""
        get = config_getter(transformer_config)
        p = get("patch_size", (1, 2, 2))
        if isinstance(p, (list, tuple)):
            patch = tuple(int(x) for x in p)
        else:
            pt = get("patch_size_t", None)
            patch = (int(pt) if pt else 1, int(p), int(p))
        return cls(temporal=int(temporal), multiple_h=int(spatial) * patch[1], multiple_w=int(spatial) * patch[2],
                   vae_stride=(int(temporal), int(spatial), int(spatial)), patch=patch,
                   latent_frame_multiple=patch[0])


@dataclass(frozen=True)
class FitPlan:
    """What ``plan_fit`` decided.  Shapes are (frames, height, width) in pixels."""

    source_frames: int
    source_height: int
    source_width: int
    frames: int
    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    message: str

    @property
    def resamples(self) -> bool:
        return (self.resized_height, self.resized_width) != (self.source_height, self.source_width)

    @property
    def changed(self) -> bool:
        return (self.frames, self.height, self.width) != (self.source_frames, self.source_height, self.source_width)

    def to_dict(self) -> dict:
        return asdict(self)

    def apply_video(self, frames: np.ndarray, chunk: int = 16) -> np.ndarray:
        """(F, H, W, 3) uint8 source frames (F >= plan.frames) -> (frames, height, width, 3) uint8."""
        if frames.ndim != 4 or frames.shape[1:3] != (self.source_height, self.source_width):
            raise EditInputError(f"video frames must be (F, {self.source_height}, {self.source_width}, C) as planned, "
                                 f"got {frames.shape}")
        if frames.shape[0] < self.frames:
            raise EditInputError(f"the plan needs {self.frames} frames, the video has {frames.shape[0]}")
        frames = frames[:self.frames]
        if not self.resamples:
            return np.ascontiguousarray(frames[:, self.top:self.top + self.height, self.left:self.left + self.width])
        out = np.empty((self.frames, self.height, self.width, frames.shape[3]), dtype=np.uint8)
        for s in range(0, self.frames, chunk):  # bounded memory for long, large videos
            x = torch.from_numpy(np.ascontiguousarray(frames[s:s + chunk])).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(self.resized_height, self.resized_width), mode="bilinear",
                              align_corners=False, antialias=True)
            x = x[:, :, self.top:self.top + self.height, self.left:self.left + self.width]
            out[s:s + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return out

    def apply_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(F, H, W) bool source-resolution mask (F >= plan.frames) -> (frames, height, width) bool."""
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (self.source_height, self.source_width):
            raise EditInputError(f"mask must be (F, {self.source_height}, {self.source_width}) as planned, "
                                 f"got {tuple(mask.shape)}")
        m = mask[:self.frames].bool()
        if self.resamples:
            m = resize_mask(m, (self.resized_height, self.resized_width))
        return m[:, self.top:self.top + self.height, self.left:self.left + self.width].contiguous()


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """(F, H, W) bool -> (F, *size) bool, conservatively: shrinking keeps a pixel foreground when
    its footprint touches a foreground pixel; growing is nearest neighbour."""
    if tuple(mask.shape[1:]) == tuple(size):
        return mask.bool()
    x = mask[:, None].float()
    if size[0] < mask.shape[1] or size[1] < mask.shape[2]:
        # adaptive average pooling's windows cover every source pixel a target pixel
        # overlaps, so > 0 is "touches a foreground pixel".
        if size[0] > mask.shape[1] or size[1] > mask.shape[2]:
            x = F.interpolate(x, size=(max(size[0], mask.shape[1]), max(size[1], mask.shape[2])),
                              mode="nearest-exact")
        x = F.adaptive_avg_pool2d(x, size) > 0
    else:
        x = F.interpolate(x, size=tuple(size), mode="nearest-exact") > 0.5
    return x[:, 0]


def _positive_int(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EditInputError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise EditInputError(f"{name} must be a positive integer, got {value}")
    return int(value)


def plan_fit(source_frames: int, source_height: int, source_width: int, constraints: ModelConstraints = None, *,
             frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None) -> FitPlan:
    """Decide how a (source_frames, source_height, source_width) video is trimmed, scaled and
    cropped to fit ``constraints`` (see the module docstring for the rule)."""
    c = constraints or ModelConstraints()
    frames, height, width = (_positive_int("frames", frames), _positive_int("height", height),
                             _positive_int("width", width))
    if min(source_frames, source_height, source_width) < 1:
        raise EditInputError(f"the video is empty: {source_frames} frames of {source_height}x{source_width}")
    notes = []
    # 1. frames
    wanted = source_frames if frames is None else frames
    if wanted > source_frames:
        notes.append(f"{wanted} frames were asked for but the video has {source_frames}: using {source_frames}")
        wanted = source_frames
    latent = latent_frames(wanted, c.temporal)
    latent -= latent % c.latent_frame_multiple
    if latent < 1:
        need = 1 + c.temporal * (c.latent_frame_multiple - 1)
        raise EditInputError(f"the model needs at least {need} frames (its latent frame count must be a multiple "
                             f"of {c.latent_frame_multiple}); the video gives {wanted}")
    n = 1 + c.temporal * (latent - 1)
    if n != source_frames:
        rule = f"1 + {c.temporal}k frames" + (f" with k + 1 a multiple of {c.latent_frame_multiple}"
                                              if c.latent_frame_multiple > 1 else "")
        why = f"; the model takes {rule}" if n != wanted else ""
        notes.append(f"kept frames 0-{n - 1} of {source_frames}{why}")
    # 2. target size
    aspect = source_width / source_height
    if height is None and width is None:
        th, tw = source_height, source_width
    elif width is None:
        th, tw = height, height * aspect
    elif height is None:
        th, tw = width / aspect, width
    else:
        th, tw = height, width
    th_r = max(c.multiple_h, int(th) // c.multiple_h * c.multiple_h)
    tw_r = max(c.multiple_w, int(tw) // c.multiple_w * c.multiple_w)
    for name, given, got, mult in (("height", height, th_r, c.multiple_h), ("width", width, tw_r, c.multiple_w)):
        if given is not None and given != got:
            notes.append(f"--{name} {given} rounded to {got} (a multiple of {mult})")
    # 3. uniform scale covering the target, centre crop
    s = max(th_r / source_height, tw_r / source_width)
    if s == 1.0:
        rh, rw = source_height, source_width
    else:
        rh, rw = max(th_r, round(source_height * s)), max(tw_r, round(source_width * s))
        notes.append(f"scaled {source_height}x{source_width} by {s:.4g} to {rh}x{rw} (aspect ratio kept)")
    top, left = (rh - th_r) // 2, (rw - tw_r) // 2
    if (rh, rw) != (th_r, tw_r):
        notes.append(f"centre-cropped {rh}x{rw} to {th_r}x{tw_r} (sizes must be multiples of "
                     f"{c.multiple_h}x{c.multiple_w})" if (height, width) == (None, None)
                     else f"centre-cropped {rh}x{rw} to {th_r}x{tw_r}")
    head = (f"video {source_frames} frames {source_height}x{source_width} (HxW) -> {n} frames {th_r}x{tw_r}")
    message = head + (": " + "; ".join(notes) if notes else ": unchanged")
    return FitPlan(source_frames, source_height, source_width, n, th_r, tw_r, rh, rw, top, left, message)
