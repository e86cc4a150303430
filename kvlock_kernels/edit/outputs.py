"""What kvlock-edit writes beside the edited video: a labelled side-by-side comparison, the
schedule plot and the report JSON."""
from __future__ import annotations

import json
import math
import os
from typing import Any, List, Optional, Sequence

import numpy as np

from .video_io import write_video

__all__ = ["comparison_frames", "write_comparison", "plot_schedule", "write_report", "json_safe"]

PANEL_LABELS = ("source", "mask (edit region)", "edited")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _mask_panel(source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The source dimmed, the foreground tinted red: where the edit happens, in context."""
    src = source.astype(np.float32)
    red = np.array([255.0, 40.0, 40.0], dtype=np.float32)
    m = mask[..., None].astype(np.float32)
    out = src * 0.35 * (1 - m) + (0.45 * src + 0.55 * red) * m
    return out.round().clip(0, 255).astype(np.uint8)


def comparison_frames(source: np.ndarray, mask: np.ndarray, edited: np.ndarray,
                      labels: Sequence[str] = PANEL_LABELS, *, min_panel: int = 160) -> np.ndarray:
    """(F, H, W, 3) source, (F, H, W) bool mask, (F, H, W, 3) edited -> labelled (F, H', W', 3)
    frames: three panels side by side under a label band.  Small videos are enlarged by an
    integer factor (nearest) so that each panel is at least ``min_panel`` pixels wide."""
    from PIL import Image, ImageDraw

    f, h, w, _ = source.shape
    scale = max(1, math.ceil(min_panel / w))
    panels = [source, _mask_panel(source, mask), edited]
    if scale > 1:
        panels = [p.repeat(scale, axis=1).repeat(scale, axis=2) for p in panels]
    ph, pw = h * scale, w * scale
    gap = 4
    band = max(18, ph // 14)
    H, W = band + ph, 3 * pw + 2 * gap
    H, W = H + H % 2, W + W % 2
    canvas = np.full((f, H, W, 3), 24, dtype=np.uint8)
    for i, p in enumerate(panels):
        x0 = i * (pw + gap)
        canvas[:, band:band + ph, x0:x0 + pw] = p
    header = Image.new("RGB", (W, band), (24, 24, 24))
    draw = ImageDraw.Draw(header)
    font = _font(max(10, band - 6))
    for i, text in enumerate(labels):
        x0 = i * (pw + gap)
        # shorten the label until it fits its panel
        t = text
        while t and draw.textlength(t, font=font) > pw - 6:
            t = t[:-2] + "…" if len(t) > 2 else ""
        draw.text((x0 + 3, 2), t, fill=(235, 235, 235), font=font)
    canvas[:, :band] = np.asarray(header)[None]
    return canvas


def write_comparison(path: str, source, mask, edited, fps: float, labels: Sequence[str] = PANEL_LABELS) -> str:
    """Write the labelled comparison video (and, for a ``.png`` path, only its middle frame)."""
    frames = comparison_frames(source, np.asarray(mask), edited, labels)
    if path.lower().endswith(".png"):
        from PIL import Image

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(frames[len(frames) // 2]).save(path)
        return path
    return write_video(path, frames, fps)


def plot_schedule(path: str, trace: List[dict], schedule: dict, *, title: Optional[str] = None) -> str:
    """sigma2, alpha and omega per step (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in trace]

    def col(key):
        return [np.nan if r.get(key) is None else float(r[key]) for r in trace]

    fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
    n, kappa = schedule.get("num_steps") or len(trace), schedule.get("kappa") or 0
    for ax, key, ref, ref_label in ((axes[0], "sigma2", schedule.get("tau"), "tau"),
                                    (axes[1], "alpha", None, None),
                                    (axes[2], "omega", schedule.get("omega0"), "omega0")):
        ax.plot(steps, col(key), marker="o", ms=3, lw=1.2, label=key)
        if ref is not None:
            ax.axhline(ref, color="gray", ls="--", lw=0.8, label=f"{ref_label} = {ref:g}")
        if kappa:
            ax.axvspan(n - kappa - 0.5, n - 0.5, color="tab:orange", alpha=0.12, lw=0,
                       label=f"active: last kappa = {kappa} steps")
        experts = [r.get("expert") for r in trace]
        if "transformer_2" in experts and "transformer" in experts:
            ax.axvline(experts.index("transformer_2") - 0.5, color="tab:purple", lw=0.8, label="expert switch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[1].set_ylim(-0.05, 1.05)
    axes[0].set_title("sigma2: foreground x0-hat variance (NaN until the window fills)", fontsize=9)
    axes[1].set_title("alpha: background lock strength", fontsize=9)
    axes[2].set_title("omega: guidance scale", fontsize=9)
    axes[2].set_xlabel("denoising step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def json_safe(x: Any) -> Any:
    """Plain JSON: NaN / inf -> None, numpy and torch scalars -> Python numbers, tuples -> lists."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if torch is not None and isinstance(x, torch.Tensor):
        return json_safe(x.tolist())
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def write_report(path: str, report: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(report), f, indent=2, allow_nan=False)
        f.write("\n")
    return path
