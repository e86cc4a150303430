"""Shared pieces of the benchmark harness: shapes (SPEC section 8), inputs, timing, the
device roofline table and the bytes model of attention."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class AttnShape:
    """One self-attention call of a video DiT: a (frames, height, width) token grid after
    patchify, plus `text_tokens` joint text positions in front (never locked)."""
    name: str
    batch: int
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    text_tokens: int = 0

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
HUNYUAN = AttnShape("hunyuanvideo 720p", 2, 33, 45, 80, 24, 128, text_tokens=256)
GPU_SHAPES = (WAN_1_3B, WAN_14B, COGVIDEOX_5B, HUNYUAN)

# CPU stand-ins: the same head layouts on fewer frames / a smaller grid.
CPU_SHAPES = (
    AttnShape("wan2.1-1.3B, half frame (CPU)", 2, 1, 15, 52, 12, 128),
    AttnShape("wan2.1-1.3B, 1 frame (CPU)", 2, 1, 30, 52, 12, 128),
    AttnShape("wan2.1-1.3B, 2 frames (CPU)", 2, 2, 30, 52, 12, 128),
    AttnShape("cogvideox-5B, 1 frame + text (CPU)", 2, 1, 30, 45, 48, 64, text_tokens=226),
)
CPU_SHAPES_QUICK = CPU_SHAPES[:2] + CPU_SHAPES[3:]
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


def make_attention_inputs(shape: AttnShape, dtype, device, *, fg_fraction=0.3, alpha=0.7, seed=0):
    """q, k, v (B, S, H, D); k_src, v_src as a batch-stride-0 view of one source branch;
    lock (1, S) = alpha * (1 - fg) on video tokens, 0 on text tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim

    def rnd(b):
        return torch.randn(b, S, H, D, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B), rnd(B), rnd(B)
    k_src, v_src = rnd(1).expand(B, -1, -1, -1), rnd(1).expand(B, -1, -1, -1)
    fg = box_token_mask(shape, fg_fraction, device)
    lock = torch.cat([torch.zeros(shape.text_tokens, device=device), alpha * (~fg).float()])[None]
    return q, k, v, k_src, v_src, lock


def attention_bytes(shape: AttnShape, elem_bytes: int = 2) -> dict:
    """Minimum HBM traffic (bytes) of one attention call, per provider kind.

    fused (kvlock): read q, one K and one V per key row (fresh or source: uniform blocks
    read one tile; mixed blocks, a thin fraction, read both), the lock; write out.
    unfused: the blend reads k, k_src, v, v_src and writes K, V; attention then reads
    q, K, V and writes out.  plain (no blend): q, k, v, out.  Attention's re-reads of K/V
    per query block are the same for every provider and left out.
    """
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    tile = B * S * H * D * elem_bytes
    src = S * H * D * elem_bytes  # one source branch shared by the batch (stride 0)
    plain = 4 * tile
    fused = plain + B * S * 4
    unfused = 2 * (tile + src) + 2 * tile + plain
    return {"fused": fused, "unfused": unfused, "plain": plain}


# Peak dense bf16 tensor-core FLOP/s and HBM bytes/s, keyed by a substring of the
# device name (the first match wins: more specific names first).
DEVICE_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.0e12),
    ("L40S", 362e12, 0.864e12),
    ("A10", 125e12, 0.6e12),
)


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
