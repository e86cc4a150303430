"""Shared pieces of the benchmark suites: shapes, inputs, timing and the bytes model."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnShape:
    name: str
    batch: int
    frames: int
    height: int  # latent tokens per frame along h (after the (1, 2, 2) patchify)
    width: int
    heads: int
    head_dim: int

    @property
    def seqlen(self) -> int:
        return self.frames * self.height * self.width

    def flops(self) -> float:
        return 4.0 * self.batch * self.seqlen * self.seqlen * self.heads * self.head_dim


# Wan2.1-T2V-1.3B at 480x832x81: 21 latent frames of 30x52 tokens, 12 heads of 128.
WAN_1_3B = AttnShape("wan2.1-1.3B 480p", 2, 21, 30, 52, 12, 128)
# CPU stand-in: the same head layout and token grid, two latent frames.
WAN_1_3B_CPU = AttnShape("wan2.1-1.3B, 2 frames (CPU)", 2, 2, 30, 52, 12, 128)
WAN_1_3B_CPU_QUICK = AttnShape("wan2.1-1.3B, 1 frame (CPU)", 2, 1, 30, 52, 12, 128)
# Interpreter correctness check: the same token grid on a quarter of the frame.
WAN_INTERP = AttnShape("wan-like, interpreter", 2, 1, 15, 26, 2, 128)


def box_token_mask(shape: AttnShape, fg_fraction: float, device) -> torch.Tensor:
    """(F*H*W,) bool foreground mask: a centred box of about fg_fraction of each frame,
    flattened in (t, h, w) order like the DiT's tokens."""
    side = fg_fraction ** 0.5
    bh, bw = max(1, round(shape.height * side)), max(1, round(shape.width * side))
    m = torch.zeros(shape.frames, shape.height, shape.width, dtype=torch.bool, device=device)
    h0, w0 = (shape.height - bh) // 2, (shape.width - bw) // 2
    m[:, h0:h0 + bh, w0:w0 + bw] = True
    return m.flatten()


def make_attention_inputs(shape: AttnShape, dtype, device, *, fg_fraction=0.3, alpha=0.7, seed=0):
    """q, k, v (B, S, H, D); k_src, v_src as a batch-stride-0 view of one source branch;
    lock (1, S) = alpha * (1 - fg)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim

    def rnd(b):
        return torch.randn(b, S, H, D, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B), rnd(B), rnd(B)
    k_src, v_src = rnd(1).expand(B, -1, -1, -1), rnd(1).expand(B, -1, -1, -1)
    fg = box_token_mask(shape, fg_fraction, device)
    lock = (alpha * (~fg).float())[None]
    return q, k, v, k_src, v_src, lock


def bytes_model(shape: AttnShape, elem_bytes: int, fg_fraction: float) -> dict:
    """Minimum HBM traffic (bytes) of one locked attention call.

    fused: read q, one K and one V tile per uniform key block (both for the ~0 mixed
    blocks), the lock, write out.  unfused: the blend reads k, k_src, v, v_src and
    writes K, V; then attention reads q, K, V and writes out.  Attention's own
    re-reads of K/V per query block are the same for both and left out.
    """
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    tile = B * S * H * D * elem_bytes
    src = S * H * D * elem_bytes  # one source branch shared by the batch (stride 0)
    fused = tile * 2 + tile * 2 + B * S * 4  # q + out, K + V (one of new/src per row)
    blend = 2 * (tile + src) + 2 * tile
    unfused = blend + tile * 4
    return {"fused": fused, "unfused": unfused, "ratio": unfused / fused}


def time_fn(fn, *, warmup=2, repeats=5, device=torch.device("cpu")):
    """Median and spread (min, max) in milliseconds.  CUDA events on GPU."""
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
