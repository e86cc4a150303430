"""Edit masks from files, arrays or a box, made binary and matched to the video.

Foreground (= the region to edit) is decided per pixel, with one threshold at **half the
value range** (``MASK_THRESHOLD`` = 0.5):

- uint8 images and videos: value >= 128 is foreground (255 / 2 = 127.5); 16-bit images:
  >= 32768.  Lossy video codecs smear a black/white mask by a few to a few tens of levels
  around 0 and 255 and ring at its edges; anything short of half the range (127 levels) is
  tolerated, so an mp4 mask reads back as the mask that was written.
- float arrays (Python API, ``.npy``): values in [0, 1], >= 0.5 is foreground.
- bool arrays and 1-bit images: True is foreground.
- a uint8/uint16/int image whose values are all 0 or 1 is a 0/1 label map (1 = foreground):
  segmentation tools save those, and thresholding them at 128 would make them empty.
- palette images (DAVIS-style annotations): any nonzero palette index is foreground.
- colour: RGB is reduced to one channel by its maximum (a mask drawn in any bright colour
  counts); RGBA with a non-constant alpha channel uses the alpha.

``fit_mask_to_video`` matches the mask to the video before the geometry rule runs: one
image is used for every frame; a mask video needs at least as many frames as the edit
uses (extra frames are ignored); a mask of another size is resized when its aspect ratio
is the video's (within 1 %), else it is an error.  ``dilate_mask`` grows the foreground by
N pixels (a (2N+1)-pixel square), after the mask has been fitted to the model's size.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EditInputError
from .geometry import resize_mask
from .video_io import read_raw_frames

__all__ = ["MASK_THRESHOLD", "binarize_mask", "read_mask", "mask_from_array", "parse_box", "box_mask",
           "fit_mask_to_video", "dilate_mask"]

MASK_THRESHOLD = 0.5  # a fraction of the value range
ASPECT_TOLERANCE = 0.01


def _reduce_channels(a: np.ndarray) -> np.ndarray:
    """(..., H, W, C) -> (..., H, W): alpha when it varies, else the maximum over colours."""
    c = a.shape[-1]
    if c in (2, 4):
        alpha = a[..., -1]
        if alpha.min() != alpha.max():
            return alpha
        a = a[..., :-1]
    return a.max(axis=-1)


def binarize_mask(values: np.ndarray, *, name: str = "mask", notes: Optional[List[str]] = None) -> np.ndarray:
    """Threshold a single-channel mask array at half its value range (see the module docstring).

    Arguments:
        values: (..., H, W) bool, uint8, uint16, int or float array.
    Returns:
        bool array of the same shape, True = foreground.
    """
    a = np.asarray(values)
    if a.dtype == bool:
        return a
    if a.size == 0:
        raise EditInputError(f"{name} is empty (shape {a.shape})")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise EditInputError(f"{name} has NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise EditInputError(f"a float {name} must have values in [0, 1] (soft masks allowed; "
                                 f"thresholded at {MASK_THRESHOLD}), got values in [{lo:g}, {hi:g}]; "
                                 "8-bit masks should be uint8 (0 / 255)")
        return a >= MASK_THRESHOLD
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0:
            raise EditInputError(f"an integer {name} must not be negative, got values in [{lo}, {hi}]")
        if hi <= 1:
            if notes is not None and hi == 1:
                notes.append(f"{name}: values are 0/1, read as a label map (1 = foreground)")
            return a == 1
        if a.dtype == np.uint8 or hi <= 255:
            full = 255
        elif a.dtype == np.uint16 or hi <= 65535:
            full = 65535
        else:
            raise EditInputError(f"an integer {name} must be 8- or 16-bit, got values up to {hi}")
        return a >= MASK_THRESHOLD * full  # uint8: >= 127.5, i.e. >= 128
    raise EditInputError(f"{name} must be a bool, integer or float array, got dtype {a.dtype}")


def mask_from_array(mask, *, name: str = "mask",
                    notes: Optional[List[str]] = None) -> torch.Tensor:
    """A mask given as an array or tensor -> (F, H', W') bool tensor (not yet matched to the video).

    Accepted layouts: (H, W); (F, H, W); (H, W, C) and (F, H, W, C) with C in 1..4 (colour
    reduced as for files).  torch tensors and numpy arrays alike.  Matching it to the video is
    ``fit_mask_to_video``'s.
    """
    if isinstance(mask, torch.Tensor):
        a = mask.detach().cpu()
        a = a.float().numpy() if a.dtype in (torch.bfloat16, torch.float16) else a.numpy()
    elif isinstance(mask, np.ndarray):
        a = mask
    elif isinstance(mask, (list, tuple)) and mask and all(isinstance(m, (np.ndarray, torch.Tensor)) for m in mask):
        return torch.cat([mask_from_array(m, name=name, notes=notes) for m in mask])
    else:
        raise TypeError(f"{name} must be a numpy array, a torch tensor, a path or a box, got {type(mask).__name__}")
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[2] in (1, 2, 3, 4):
        # (H, W, C): one colour image (a mask 1-4 pixels wide cannot be (F, H, W) of a video the model takes)
        a = _reduce_channels(a)[None]
    elif a.ndim == 4:
        if a.shape[3] not in (1, 2, 3, 4):
            raise EditInputError(f"a 4-d {name} must be (F, H, W, C) with C in 1..4, got shape {a.shape}")
        a = _reduce_channels(a) if a.shape[3] > 1 else a[..., 0]
    elif a.ndim != 3:
        raise EditInputError(f"{name} must be (H, W), (F, H, W) or (F, H, W, C), got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(binarize_mask(a, name=name, notes=notes)))


def read_mask(path: str, *, max_frames: Optional[int] = None, notes: Optional[List[str]] = None) -> torch.Tensor:
    """Read a mask file: a video (mp4, webm, ...), a GIF, one image, a folder of images, or a
    ``.npy`` array -> (F, H, W) bool tensor, thresholded (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"mask path must be a string, got {type(path).__name__}")
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"mask file not found: {path!r}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EditInputError(f"could not read mask {path!r}: {e}") from None
        m = mask_from_array(arr, name=f"mask {path!r}", notes=notes)
        return m[:max_frames] if max_frames else m
    frames, _ = read_raw_frames(path, max_frames=max_frames, what="mask", palette_as_mask=True)
    single = [(_reduce_channels(f) if f.ndim == 3 else f) for f in frames]
    return torch.from_numpy(binarize_mask(np.stack(single), name=f"mask {path!r}", notes=notes))


def parse_box(text: Union[str, Sequence[float]]) -> Tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> a 4-tuple.  Integers are pixels of the source video (x1, y1
    exclusive); numbers written with a decimal point, all in [0, 1], are fractions of the
    width and height."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise EditInputError(f"--box must be x0,y0,x1,y1 (four numbers), got {text!r}") from None
        fractional = any("." in p for p in parts)
    else:
        values = [float(v) for v in text]
        fractional = any(not float(v).is_integer() for v in values)
    if len(values) != 4 or not all(np.isfinite(values)):
        raise EditInputError(f"--box must be x0,y0,x1,y1 (four finite numbers), got {text!r}")
    if fractional and not all(0.0 <= v <= 1.0 for v in values):
        raise EditInputError(f"--box with fractional values must have all four in [0, 1], got {text!r}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise EditInputError(f"--box needs x0 < x1 and y0 < y1, got {text!r}")
    return (x0, y0, x1, y1) if fractional else tuple(int(round(v)) for v in values)


def box_mask(box, frames: int, height: int, width: int) -> torch.Tensor:
    """(frames, height, width) bool mask of a box (see ``parse_box``), the same on every frame."""
    x0, y0, x1, y1 = parse_box(box) if isinstance(box, str) else box
    if any(isinstance(v, float) for v in (x0, y0, x1, y1)):
        x0, x1 = int(np.floor(x0 * width)), int(np.ceil(x1 * width))
        y0, y1 = int(np.floor(y0 * height)), int(np.ceil(y1 * height))
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        raise EditInputError(f"--box {x0},{y0},{x1},{y1} lies outside the {width}x{height} (WxH) video")
    m = torch.zeros(frames, height, width, dtype=torch.bool)
    m[:, cy0:cy1, cx0:cx1] = True
    return m


def fit_mask_to_video(mask: torch.Tensor, frames: int, height: int, width: int, *, video_frames: Optional[int] = None,
                      notes: Optional[List[str]] = None) -> torch.Tensor:
    """Match an (Fm, Hm, Wm) bool mask to the video's first ``frames`` frames of size height x width.

    One mask frame is used for every frame; more mask frames than needed are cut; a
    different size with the video's aspect ratio is resized.  Anything else raises
    EditInputError naming both shapes.
    """
    notes = notes if notes is not None else []
    if mask.dim() != 3:
        raise EditInputError(f"mask must be (F, H, W), got shape {tuple(mask.shape)}")
    fm, hm, wm = mask.shape
    video_frames = frames if video_frames is None else video_frames
    if (hm, wm) != (height, width):
        if abs((wm / hm) / (width / height) - 1.0) > ASPECT_TOLERANCE:
            raise EditInputError(f"the mask is {hm}x{wm} (HxW) but the video is {height}x{width}: a mask must have the "
                                 "video's size or at least its aspect ratio")
        mask = resize_mask(mask, (height, width))
        notes.append(f"mask resized from {hm}x{wm} to the video's {height}x{width}")
    if fm == 1:
        if frames > 1:
            notes.append(f"one mask image used for all {frames} frames")
        return mask.expand(frames, height, width).contiguous()
    if fm < frames:
        usable = 1 + 4 * ((fm - 1) // 4)
        raise EditInputError(f"the mask has {fm} frames but the edit uses {frames} frames of the video "
                             f"({video_frames} read): give one mask frame per video frame, one image for all "
                             f"frames, or fewer frames (--frames {usable})")
    if fm > video_frames:
        notes.append(f"the mask has {fm} frames, the video {video_frames}: extra mask frames ignored")
    return mask[:frames].contiguous()


def dilate_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow the foreground of an (F, H, W) bool mask by ``pixels`` in every direction
    (a (2 * pixels + 1)-pixel square, per frame)."""
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 0:
        raise EditInputError(f"--dilate must be a non-negative integer (pixels), got {pixels!r}")
    if pixels == 0:
        return mask
    k = 2 * int(pixels) + 1
    return F.max_pool2d(mask[:, None].float(), k, stride=1, padding=int(pixels))[:, 0] > 0
