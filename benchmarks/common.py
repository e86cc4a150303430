"""Shared pieces of the benchmark harness: shapes (SPEC section 8), masks and inputs in
the models' real token order, timing, the device roofline table and the bytes model of
attention."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from kvlock_kernels.attention.routing import DEVICE_PROFILES


@dataclass(frozen=True)
class AttnShape:
    """One self-attention call of a video DiT: a (frames, height, width) token grid after
    patchify, flattened in (t, h, w) order, plus ``text_tokens`` joint text positions
    (never locked): in front (CogVideoX) or, with ``text_last``, behind (HunyuanVideo)."""
    name: str
    batch: int
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    text_tokens: int = 0
    text_last: bool = False

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seqlen(self) -> int:
        return self.video_tokens + self.text_tokens

    def flops(self) -> float:
        """Forward attention FLOPs: 4 B Sq Skv H D."""
        return 4.0 * self.batch * self.seqlen * self.seqlen * self.heads * self.head_dim

    def with_batch(self, batch: int) -> "AttnShape":
        return replace(self, batch=batch)


# SPEC section 8: the real shapes (batch 2 = CFG branches; 3 adds an in-batch source).
WAN_1_3B = AttnShape("wan2.1-1.3B 480p", 2, 21, 30, 52, 12, 128)
WAN_14B = AttnShape("wan2.1-14B 720p", 2, 21, 45, 80, 40, 128)
COGVIDEOX_5B = AttnShape("cogvideox-5B 480p", 2, 13, 30, 45, 48, 64, text_tokens=226)
HUNYUAN = AttnShape("hunyuanvideo 720p", 2, 33, 45, 80, 24, 128, text_tokens=256, text_last=True)
GPU_SHAPES = (WAN_1_3B, WAN_14B, COGVIDEOX_5B, HUNYUAN)

# CPU stand-ins: the same head layouts on fewer frames / a smaller grid.
CPU_SHAPES = (
    AttnShape("wan2.1-1.3B, half frame (CPU)", 2, 1, 15, 52, 12, 128),
    AttnShape("wan2.1-1.3B, 1 frame (CPU)", 2, 1, 30, 52, 12, 128),
    AttnShape("wan2.1-1.3B, 2 frames (CPU)", 2, 2, 30, 52, 12, 128),
    AttnShape("cogvideox-5B, 1 frame + text (CPU)", 2, 1, 30, 45, 48, 64, text_tokens=226),
)
CPU_SHAPES_QUICK = CPU_SHAPES[:2] + CPU_SHAPES[3:]
# The routed-paths section on CPU (PyTorch paths only): Wan's and CogVideoX's head layouts.
CPU_PATH_SHAPES = (
    AttnShape("wan2.1-1.3B, 10 rows (CPU)", 2, 1, 10, 52, 12, 128),
    AttnShape("cogvideox-5B, 10 rows + text (CPU)", 2, 1, 10, 45, 48, 64, text_tokens=226),
)
# Interpreter correctness checks (small): video-only and joint text+video.
INTERP_SHAPES = (
    AttnShape("wan-like (interpreter)", 2, 1, 15, 26, 2, 128),
    AttnShape("cogvideox-like + text (interpreter)", 3, 1, 10, 13, 2, 64, text_tokens=30),
)


def box_token_mask(shape: AttnShape, fg_fraction: float, device) -> torch.Tensor:
    """(video_tokens,) bool foreground mask: a centred box of about fg_fraction of each
    frame, flattened in (t, h, w) order like the DiT's tokens.  fg 1.0 = everything."""
    side = fg_fraction ** 0.5
    bh, bw = max(1, round(shape.height * side)), max(1, round(shape.width * side))
    m = torch.zeros(shape.frames, shape.height, shape.width, dtype=torch.bool, device=device)
    h0, w0 = (shape.height - bh) // 2, (shape.width - bw) // 2
    m[:, h0:h0 + bh, w0:w0 + bw] = True
    return m.flatten()


def moving_rect_mask(shape: AttnShape, fg_fraction: float, device="cpu") -> torch.Tensor:
    """(video_tokens,) bool foreground mask: a rectangle of about ``fg_fraction`` of each
    latent frame that moves diagonally from the top-left corner (first latent frame) to
    the bottom-right corner (last), flattened in (t, h, w) order like the DiT's tokens."""
    side = fg_fraction ** 0.5
    bh = min(shape.height, max(1, round(shape.height * side)))
    bw = min(shape.width, max(1, round(shape.width * side)))
    m = torch.zeros(shape.frames, shape.height, shape.width, dtype=torch.bool, device=device)
    steps = max(shape.frames - 1, 1)
    for t in range(shape.frames):
        h0 = round(t * (shape.height - bh) / steps)
        w0 = round(t * (shape.width - bw) / steps)
        m[t, h0:h0 + bh, w0:w0 + bw] = True
    return m.flatten()


def token_lock(shape: AttnShape, fg: torch.Tensor, alpha: float) -> torch.Tensor:
    """(S,) fp32 lock weights in the model's token order: ``alpha * (1 - fg)`` on video
    tokens, 0 on text tokens (in front, or behind with ``text_last``)."""
    video = alpha * (~fg).float()
    text = torch.zeros(shape.text_tokens, device=fg.device)
    return torch.cat([video, text] if shape.text_last else [text, video])


def make_attention_inputs(shape: AttnShape, dtype, device, *, fg_fraction=0.3, alpha=0.7, seed=0, mask="box"):
    """q, k, v (B, S, H, D); k_src, v_src as a batch-stride-0 view of one source branch;
    lock (1, S) = alpha * (1 - fg) on video tokens, 0 on text tokens.  ``mask``: "box" (a
    centred box) or "moving" (``moving_rect_mask``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim

    def rnd(b):
        return torch.randn(b, S, H, D, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B), rnd(B), rnd(B)
    k_src, v_src = rnd(1).expand(B, -1, -1, -1), rnd(1).expand(B, -1, -1, -1)
    fg = (moving_rect_mask if mask == "moving" else box_token_mask)(shape, fg_fraction, device)
    lock = token_lock(shape, fg, alpha)[None]
    return q, k, v, k_src, v_src, lock


def attention_bytes(shape: AttnShape, elem_bytes: int = 2) -> dict:
    """Minimum HBM traffic (bytes) of one attention call, per provider kind.

    fused (kvlock): read q, both K tiles and both V tiles (fresh and source) per key row,
    the lock; write out.  That is the bound for a soft lock (alpha strictly between 0 and 1
    makes every background key block blended) and close to it at alpha = 1 (a third to a
    half of the key blocks straddle a mask edge at SPEC shapes: ``benchmarks/model.py``
    counts them on the real mask).  unfused: the blend reads k, k_src, v, v_src and writes
    K, V; attention then reads q, K, V and writes out.  plain (no blend): q, k, v, out.
    Attention's re-reads of K/V per query block are the same for every provider and left out.
    """
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    tile = B * S * H * D * elem_bytes
    src = S * H * D * elem_bytes  # one source branch shared by the batch (stride 0)
    plain = 4 * tile
    fused = plain + 2 * tile + B * S * 4
    unfused = 2 * (tile + src) + 2 * tile + plain
    return {"fused": fused, "unfused": unfused, "plain": plain}


# Peak dense bf16 tensor-core FLOP/s and HBM bytes/s, keyed by a substring of the
# device name (the first match wins: more specific names first).  One table for the
# harness and the routing model: ``kvlock_kernels.attention.routing.DEVICE_PROFILES``.
DEVICE_PEAKS = tuple((p.name, p.tensor_flops, p.bandwidth) for p in DEVICE_PROFILES)


def device_peaks(name: str):
    """(peak FLOP/s, peak bytes/s) for a device name, or None (CPU, unknown GPU)."""
    for key, flops, bw in DEVICE_PEAKS:
        if key in name:
            return flops, bw
    return None


def roofline_percent(flops: float, nbytes: float, seconds: float, peaks) -> float | None:
    """Measured time against the roofline bound max(flops / peak, bytes / bandwidth)."""
    if peaks is None or seconds <= 0:
        return None
    bound = max(flops / peaks[0], nbytes / peaks[1])
    return 100.0 * bound / seconds


def synced(fn):
    """``fn`` followed by a device synchronisation on CUDA, so that pytest-benchmark's
    wall clock measures the kernels and not their launch."""
    def run(*args):
        out = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


def time_fn(fn, *, warmup=2, repeats=5, device=torch.device("cpu")):
    """Median, min and max in milliseconds.  CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def bytes_row(row: dict, fn, nbytes: float, device, peaks, repeats: int) -> dict:
    """``row`` with ``fn()`` timed (status "ok", median/min/max ms) and its traffic against
    the bytes model ``nbytes``: achieved GB/s and percent of the bandwidth roofline."""
    med, lo, hi = time_fn(fn, warmup=1, repeats=repeats, device=device)
    return dict(row, status="ok", median_ms=med, min_ms=lo, max_ms=hi, model_bytes=nbytes,
                gbps=nbytes / (med * 1e-3) / 1e9, roofline_pct=roofline_percent(0.0, nbytes, med * 1e-3, peaks))
