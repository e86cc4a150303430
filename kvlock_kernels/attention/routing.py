"""Routing of a locked attention call, and plain attention with the best kernel there is.

A locked attention call (``K' = k + w (k_src - k)``, same for V, then attention) can run
two ways:

(a) ``"blend_then_plain"``: one memory-bound pass writes K', V' (``lock_kv``), then the
    fastest plain attention available attends over them: FA3 (``flash_attn_interface``,
    Hopper) > FA2 (``flash_attn``) > ``F.scaled_dot_product_attention`` (flash, cuDNN or
    memory-efficient kernels inside torch);
(b) ``"fused"``: the single-pass Triton kernel blends each K/V tile as it is loaded.  No
    K'/V' is materialised, but every query block re-blends every KV tile it visits
    (Sq / BLOCK_M times per KV tile), and a Triton flash kernel reaches a lower fraction
    of the tensor-core peak than FA3.

``choose_path`` picks one by a cost model of shapes, dtype and device only.  It never
reads a tensor (it takes no tensor): no host sync, CUDA-graph capturable, and the lock's
values cannot steer it.  Since it cannot see the lock, the fused kernel is costed at its
worst case over lock values (every key block blended, which any soft alpha makes true for
every background block); the blend-then-plain path costs the same whatever the lock.

The cost model (all times in seconds; ``docs/performance.md`` derives every constant):

    plain(b)  = max(F / (P_tc * eff[b]), bytes_plain / (BW * BW_EFF)) + LAUNCH
    blend     = bytes_blend / (BW * BW_EFF) + LAUNCH
    fused     = max(F / P_tc * (1 / eff_triton + (1 - OVERLAP) * r(BLOCK_M)),
                    bytes_fused(f) / (BW * BW_EFF)) + LAUNCH
    r(BM)     = 2 * BLEND_LANE_OPS * TC_FLOP_PER_LANE / (4 * BM)
    route     = fused if fused * (1 + FUSED_MARGIN) < blend + min_b plain(b) else blend_then_plain

with F = 4 B Sq Skv Hq D, P_tc the dense fp16/bf16 tensor-core peak (fp32: the CUDA-core
peak), f the fraction of key blocks whose two tiles the fused kernel reads (1 for
routing; its in-register blend runs on every block), and r the blend's ALU work on one
KV tile (2 tiles x BLOCK_N x D elements x BLEND_LANE_OPS lane operations) relative to
the tile's tensor-core work at peak (4 BM BLOCK_N D FLOP).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._validate import (
    check_bool,
    check_choice,
    check_int,
    check_same_device,
    check_same_dtype,
    check_softmax_scale,
    check_tensor,
    describe,
)
from .configs import arch_family, configs_for, dtype_name

__all__ = [
    "PLAIN_BACKENDS", "PATHS", "Route", "DeviceProfile", "DEVICE_PROFILES", "CPU_PROFILE",
    "EFFICIENCY", "FP32_EFFICIENCY", "BW_EFF", "LAUNCH_S", "BLEND_LANE_OPS", "BLEND_OVERLAP",
    "TC_FLOP_PER_LANE", "FUSED_MARGIN", "plain_attention_backends", "plain_attention", "choose_path", "device_profile",
    "attention_flops", "plain_bytes", "blend_bytes", "fused_bytes", "plain_time", "blend_time", "fused_time",
    "fused_blocks", "efficiency", "sdpa_kernel_kind", "reset_probes",
]

PLAIN_BACKENDS = ("fa3", "fa2", "sdpa")  # preference order, best first
PATHS = ("blend_then_plain", "fused")
_HALF = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------
# Devices: peaks from the vendors' datasheets (dense, no sparsity)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """Peaks of one device: ``tensor_flops`` dense fp16/bf16 tensor-core FLOP/s,
    ``fp32_flops`` fp32 FLOP/s on the CUDA cores (an FMA counts 2), ``bandwidth`` HBM
    bytes/s; ``arch`` = 10 * major + minor (0: CPU)."""
    name: str
    arch: int
    tensor_flops: float
    fp32_flops: float
    bandwidth: float


# Matched by substring of the device name, first match wins (A100 before A10).  Sources:
# NVIDIA H100 datasheet (SXM5: 989.4 TFLOP/s bf16 dense, 66.9 TFLOP/s fp32, 3.35 TB/s;
# PCIe: 756, 51.2, 2.0), H200 datasheet (989 bf16, 67 fp32, 4.8 TB/s), A100 datasheet
# (312 bf16, 19.5 fp32, 2.0 TB/s for the 80 GB SXM), L40S (362, 91.6, 0.864), A10 (125, 31.2, 0.6).
DEVICE_PROFILES = (
    DeviceProfile("H200", 90, 989e12, 67e12, 4.8e12),
    DeviceProfile("H100 PCIe", 90, 756e12, 51e12, 2.0e12),
    DeviceProfile("H100", 90, 989e12, 67e12, 3.35e12),
    DeviceProfile("A100", 80, 312e12, 19.5e12, 2.0e12),
    DeviceProfile("L40S", 89, 362e12, 91.6e12, 0.864e12),
    DeviceProfile("A10", 86, 125e12, 31.2e12, 0.6e12),
)
# CPU tensors run the PyTorch path (blend, then SDPA); nominal numbers only so that a Route
# carries a finite time.  They are not a prediction of CPU speed.
CPU_PROFILE = DeviceProfile("CPU (nominal)", 0, 1e12, 1e12, 50e9)


def _profile_for(name: Optional[str], arch: Optional[int]) -> DeviceProfile:
    if name:
        for p in DEVICE_PROFILES:
            if p.name in name:
                return p if arch is None or arch == p.arch else DeviceProfile(p.name, arch, p.tensor_flops,
                                                                               p.fp32_flops, p.bandwidth)
    arch = 90 if arch is None else arch
    base = DEVICE_PROFILES[2] if arch >= 90 else DEVICE_PROFILES[3]  # H100 SXM / A100 stand in
    return DeviceProfile(f"{name or 'unknown GPU'} (modelled as {base.name})", arch, base.tensor_flops,
                         base.fp32_flops, base.bandwidth)


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, 10 * props.major + props.minor


def _cuda_arch(device: torch.device) -> Optional[int]:
    """sm_<arch> of a CUDA device (host-side query, cached), None for other devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_properties(index)[1]


def device_profile(device=None, *, name: Optional[str] = None, arch: Optional[int] = None) -> DeviceProfile:
    """The profile the model uses for ``device`` (default: the current CUDA device, else
    CPU).  ``name``/``arch`` model another device (e.g. ``name="H100", arch=90`` on a
    machine without a GPU)."""
    if name is not None or arch is not None:
        return _profile_for(name, arch)
    device = _as_device(device)
    if device.type != "cuda":
        return CPU_PROFILE
    if not torch.cuda.is_available():
        return _profile_for(None, 90)
    index = device.index if device.index is not None else torch.cuda.current_device()
    dev_name, dev_arch = _cuda_properties(index)
    return _profile_for(dev_name, dev_arch)


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, (str, int)):
        return torch.device(device)
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, str or None, got {describe(device)}")
    return device


# --------------------------------------------------------------------------------------
# Constants of the model.  Efficiency = achieved forward FLOP/s / dense peak, non-causal,
# long sequences, per head-dim tier (head_dim <= 64, <= 128, <= 256).
# --------------------------------------------------------------------------------------
EFFICIENCY = {
    # H100 SXM, bf16: FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608, Fig. 5,
    # forward, non-causal, 16k tokens): FA3 about 500 / 650 / 750 TFLOP/s at head dim
    # 64 / 128 / 256; FA2 about 330-370 ("FlashAttention-2 achieves only 35% utilization on
    # H100"); cuDNN 9 about 450-650; Triton (the H100 tutorial kernel) about 400-500.
    ("sm90", "fa3"): (0.50, 0.66, 0.74),
    ("sm90", "fa2"): (0.33, 0.36, 0.34),
    ("sm90", "sdpa_flash"): (0.33, 0.36, 0.34),   # torch's flash backend is FA2's kernel
    ("sm90", "sdpa_cudnn"): (0.45, 0.58, 0.65),
    ("sm90", "sdpa_efficient"): (0.20, 0.22, 0.20),  # CUTLASS memory-efficient kernel: estimate
    ("sm90", "sdpa_math"): (0.05, 0.05, 0.05),     # materialises the score matrix: estimate
    # Our fused kernel: the Triton tutorial's level minus the per-block lock load and the
    # pointer selects.  An estimate until a GPU measurement replaces it (docs/performance.md).
    ("sm90", "triton"): (0.38, 0.45, 0.30),
    # A100, bf16: FlashAttention-2 paper (Dao 2023, arXiv:2307.08691, Fig. 4, forward,
    # non-causal): up to 70-73% of peak at head dim 128, about 60% at 64; Triton about 55%.
    ("sm80", "fa2"): (0.60, 0.70, 0.62),
    ("sm80", "sdpa_flash"): (0.60, 0.70, 0.62),
    ("sm80", "sdpa_cudnn"): (0.50, 0.57, 0.50),   # cuDNN is slower than flash on Ampere
    ("sm80", "sdpa_efficient"): (0.40, 0.45, 0.40),
    ("sm80", "sdpa_math"): (0.10, 0.10, 0.10),
    ("sm80", "triton"): (0.48, 0.52, 0.40),
}
# fp32 has no FA2/FA3 and no tensor cores (the fused kernel runs IEEE fp32 dots): fractions
# of the CUDA-core fp32 peak.  Estimates, not measured.
FP32_EFFICIENCY = {"sdpa": 0.50, "triton": 0.35}
# Streaming kernels on HBM reach about 85-90% of the nominal bandwidth (STREAM-like copies
# on H100 SXM: ~2.9-3.0 of 3.35 TB/s).
BW_EFF = 0.85
# Per kernel launch: a few microseconds of launch latency and tail.
LAUNCH_S = 4e-6
# Blend-on-load ALU work per blended element, in fp32 lane operations: unpack k and k_src
# (2), k + w (k_src - k) as a subtract and an FMA (2), the w == 0 / w == 1 selects of the
# blending rule (2), and half a pack back to 16 bits: about 6.
BLEND_LANE_OPS = 6.0
# Dense fp16/bf16 tensor FLOP per FP32 lane per clock: sm_90 4096 FLOP/clk/SM over 128
# lanes (H100 whitepaper), sm_80 2048 over 64 (A100 whitepaper); both 32.  For fp32 dots
# on the CUDA cores an FMA is 2 FLOP per lane: 2.
TC_FLOP_PER_LANE = 32.0
FP32_FLOP_PER_LANE = 2.0
# Fraction of the blend's ALU time hidden under asynchronous tensor-core work.  0 until a
# GPU measures it: the static report shows the locked loop's PV wgmma waiting at depth 0
# in its own iteration (its V operand is blended in registers each iteration), so the
# blend serialises with the tensor cores (tools/gpu_report, docs/attention.md).
BLEND_OVERLAP = 0.0
# The fused kernel must be modelled this much faster than the blend path to be chosen:
# its efficiency is our estimate, the FA2/FA3 numbers are published measurements.
FUSED_MARGIN = 0.05


def _tier(head_dim: int) -> int:
    return 0 if head_dim <= 64 else (1 if head_dim <= 128 else 2)


def sdpa_kernel_kind(dtype: torch.dtype, head_dim: int) -> str:
    """Which kernel ``F.scaled_dot_product_attention`` dispatches to on CUDA for a plain
    (maskless, non-causal) call: the first enabled backend in torch's priority order that
    supports the dtype and head dim ("flash", "efficient", "cudnn" or "math").  Reads
    torch's flags only (host state, no tensor)."""
    order = [1, 2, 0, 3]  # torch's default: flash, efficient, math, cudnn
    try:
        order = [int(b) for b in torch._C._get_sdp_priority_order()]
    except Exception:
        pass
    cuda = torch.backends.cuda
    enabled = {1: cuda.flash_sdp_enabled(), 2: cuda.mem_efficient_sdp_enabled(), 0: cuda.math_sdp_enabled(),
               3: getattr(cuda, "cudnn_sdp_enabled", lambda: False)()}
    supports = {1: dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0, 2: True, 0: True,
                3: dtype in _HALF and head_dim <= 128 and head_dim % 8 == 0}
    names = {1: "flash", 2: "efficient", 0: "math", 3: "cudnn"}
    for b in order:
        if b in names and enabled[b] and supports[b]:
            return names[b]
    return "math"


def efficiency(kernel: str, arch: int, dtype: torch.dtype, head_dim: int) -> float:
    """Attainable fraction of the peak for ``kernel`` ("fa3", "fa2", "sdpa", "triton" or an
    explicit "sdpa_<kind>") on sm_<arch>; fp32 uses ``FP32_EFFICIENCY`` of the fp32 peak."""
    if dtype == torch.float32:
        if kernel in ("fa3", "fa2"):
            raise ValueError(f"{kernel} does not support float32")
        return FP32_EFFICIENCY["triton" if kernel == "triton" else "sdpa"]
    if kernel == "sdpa":
        kernel = "sdpa_" + sdpa_kernel_kind(dtype, head_dim)
    return EFFICIENCY[(arch_family(arch), kernel)][_tier(head_dim)]


# --------------------------------------------------------------------------------------
# FLOPs, bytes and times of each path
# --------------------------------------------------------------------------------------
def attention_flops(batch, seqlen_q, seqlen_kv, heads_q, head_dim) -> float:
    """Forward attention FLOPs: 4 B Sq Skv Hq D (two matmuls, an FMA = 2)."""
    return 4.0 * batch * seqlen_q * seqlen_kv * heads_q * head_dim


def _elem(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plain_bytes(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype) -> float:
    """Minimum HBM traffic of plain attention: read q, k, v once, write out (re-reads of
    K/V by later query blocks are assumed to hit L2, as for every provider)."""
    e = _elem(dtype)
    return e * head_dim * (2.0 * batch * seqlen_q * heads_q + 2.0 * batch * seqlen_kv * heads_kv)


def blend_bytes(batch, seqlen_kv, heads_kv, head_dim, dtype, *, source_shared=True) -> float:
    """The blend pass (``lock_kv``, functional): read k, v of every entry, the source once
    (shared: batch stride 0 or an in-batch entry) or per entry, the lock; write K', V'."""
    e = _elem(dtype)
    tile = seqlen_kv * heads_kv * head_dim * e
    src = 1 if source_shared else batch
    return tile * (2.0 * batch + 2.0 * src + 2.0 * batch) + 4.0 * batch * seqlen_kv


def fused_bytes(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, blended_fraction=1.0) -> float:
    """The fused kernel: q and out once; per key block one K and one V tile (fresh for w
    all 0, source for w all 1) or both tiles for a blended block; the lock."""
    e = _elem(dtype)
    kv = 2.0 * batch * seqlen_kv * heads_kv * head_dim * e * (1.0 + blended_fraction)
    return e * 2.0 * batch * seqlen_q * heads_q * head_dim + kv + 4.0 * batch * seqlen_kv


def _peak(profile: DeviceProfile, dtype) -> float:
    return profile.fp32_flops if dtype == torch.float32 else profile.tensor_flops


def plain_time(backend, batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, profile) -> float:
    """Modelled seconds of plain attention with ``backend`` ("fa3", "fa2", "sdpa", or an
    "sdpa_<kind>"), a roofline of compute at the backend's efficiency and bytes at BW_EFF."""
    flops = attention_flops(batch, seqlen_q, seqlen_kv, heads_q, head_dim)
    eff = efficiency(backend, max(profile.arch, 80), dtype, head_dim)
    nbytes = plain_bytes(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype)
    return max(flops / (_peak(profile, dtype) * eff), nbytes / (profile.bandwidth * BW_EFF)) + LAUNCH_S


def blend_time(batch, seqlen_kv, heads_kv, head_dim, dtype, profile, *, source_shared=True) -> float:
    """Modelled seconds of the memory-bound blend pass."""
    nbytes = blend_bytes(batch, seqlen_kv, heads_kv, head_dim, dtype, source_shared=source_shared)
    return nbytes / (profile.bandwidth * BW_EFF) + LAUNCH_S


def fused_blocks(head_dim, dtype, arch) -> tuple[Optional[int], Optional[int], str]:
    """(BLOCK_M, BLOCK_N, source) of the fused kernel's first (preferred) config for this
    head dim, dtype and arch, from ``attention.configs``; (None, None, why) where the
    table has no config (the fused kernel does not run there: fp32, head dim > 128 on
    sm_80)."""
    return _fused_blocks(int(head_dim), dtype_name(dtype), int(arch))


@functools.lru_cache(maxsize=None)
def _fused_blocks(head_dim: int, dtype_key: str, arch: int) -> tuple[Optional[int], Optional[int], str]:
    configs = configs_for(head_dim, dtype_key, arch=arch)
    if not configs:
        return None, None, f"no fused-kernel config for {dtype_key} d{head_dim} on sm_{arch}"
    bm, bn = configs[0][:2]
    return bm, bn, "attention.configs.configs_for"


def fused_time(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, profile, *,
               blended_fraction=1.0, block_m=None) -> float:
    """Modelled seconds of the single-pass fused kernel on a locked call.  Its one code path
    blends every KV tile on load in registers (ALU and shared-memory work, whatever the
    lock values), while memory traffic depends on the lock: ``blended_fraction`` of the
    (query block, key block) steps read both tiles (constant or mixed key blocks), the rest
    one (masked rows are not read).  ``block_m``: its query tile (default: the config table)."""
    arch = max(profile.arch, 80)
    if block_m is None:
        block_m = fused_blocks(head_dim, dtype, arch)[0]
    flops = attention_flops(batch, seqlen_q, seqlen_kv, heads_q, head_dim)
    eff = efficiency("triton", arch, dtype, head_dim)
    per_lane = FP32_FLOP_PER_LANE if dtype == torch.float32 else TC_FLOP_PER_LANE
    # Blend ALU work per KV tile relative to the tile's matmul work at peak; every query
    # block (Sq / BLOCK_M of them, per query head) redoes it.
    r = 2.0 * BLEND_LANE_OPS * per_lane / (4.0 * block_m)
    compute = flops / _peak(profile, dtype) * (1.0 / eff + (1.0 - BLEND_OVERLAP) * r)
    nbytes = fused_bytes(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, blended_fraction)
    return max(compute, nbytes / (profile.bandwidth * BW_EFF)) + LAUNCH_S


# --------------------------------------------------------------------------------------
# Plain attention backends (import probes cached: one import attempt per process)
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _fa3_func():
    try:
        from flash_attn_interface import flash_attn_func
    except Exception:  # not installed, or a build that does not load
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _fa2_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None
    return flash_attn_func


def reset_probes() -> None:
    """Forget the cached import probes and device queries (tests; a late install)."""
    _fa3_func.cache_clear()
    _fa2_func.cache_clear()
    _cuda_properties.cache_clear()
    _choose_cached.cache_clear()


def _fa_supports(dtype, head_dim) -> bool:
    return (dtype is None or dtype in _HALF) and (head_dim is None or (head_dim <= 256 and head_dim % 8 == 0))


def plain_attention_backends(device=None, dtype: Optional[torch.dtype] = None,
                             head_dim: Optional[int] = None) -> list[str]:
    """Plain attention backends usable on ``device`` (default: the current CUDA device,
    else CPU), best first: "fa3" (``flash_attn_interface``, sm_90 only), "fa2"
    (``flash_attn``, sm_80+), "sdpa" (always).  With ``dtype``/``head_dim`` given, only
    backends that support them (FA2/FA3: fp16/bf16, head dim <= 256 and a multiple of 8)."""
    device = _as_device(device)
    arch = _cuda_arch(device)
    out = []
    if arch is not None and _fa_supports(dtype, head_dim):
        if arch // 10 == 9 and _fa3_func() is not None:
            out.append("fa3")
        if arch >= 80 and _fa2_func() is not None:
            out.append("fa2")
    out.append("sdpa")
    return out


def plain_attention(q, k, v, *, softmax_scale=None, return_lse: bool = False, backend: Optional[str] = None):
    """Attention without a lock on the best (or the named) backend, bshd in and out.

    q: (B, Sq, Hq, D); k, v: (B, Skv, Hkv, D), fp16 / bf16 / fp32, one dtype and device,
        last dim contiguous; Hq divisible by Hkv (GQA: query head h reads KV head
        h // (Hq // Hkv)).
    softmax_scale: defaults to 1 / sqrt(D).
    return_lse: also return the log-sum-exp of the scaled scores, (B, Hq, Sq) fp32,
        natural log.  FA3 and FA2 return it from the kernel; for SDPA (which does not) the
        library's PyTorch LSE path ``reference.kv_lock_attention_torch(..., return_lse=True)``
        runs instead (fp32 matmuls in query chunks: correct, not fast).
    backend: None (the first of ``plain_attention_backends`` for these tensors), "fa3",
        "fa2" or "sdpa"; a backend that cannot run these tensors is a ValueError.
    Returns out (B, Sq, Hq, D) in q's dtype (for SDPA a transposed view of a bhsd
    buffer), and lse when return_lse is True.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, layout="(B, S, H, D)")
    check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q)
    B, Sq, Hq, D = q.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape (B, Skv, Hkv, D)={tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be (B={B}, Skv, Hkv, D={D}), got {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be divisible by number of KV heads ({Hkv})")
    check_bool("return_lse", return_lse)
    scale = check_softmax_scale(softmax_scale, D)
    usable = plain_attention_backends(q.device, q.dtype, D)
    if backend is None:
        backend = usable[0]
    else:
        check_choice("backend", backend, PLAIN_BACKENDS)
        if backend not in usable:
            raise ValueError(f"backend {backend!r} cannot run {q.dtype} head dim {D} tensors on {q.device} "
                             f"here; usable: {usable}")
    if backend in ("fa3", "fa2"):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return _run_flash(backend, q, k, v, scale, return_lse)
    if return_lse:
        from ..reference.attention import kv_lock_attention_torch
        return kv_lock_attention_torch(q, k, v, softmax_scale=scale, return_lse=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                         enable_gqa=Hkv != Hq)
    return out.transpose(1, 2)


def _run_flash(backend, q, k, v, scale, return_lse):
    fn = _fa3_func() if backend == "fa3" else _fa2_func()
    Sq = q.shape[1]
    if backend == "fa3":
        # FA3 releases differ: early ones return (out, lse) always and take no
        # return_attn_probs; current ones return out unless return_attn_probs=True.
        try:
            res = fn(q, k, v, softmax_scale=scale, **({"return_attn_probs": True} if return_lse else {}))
        except TypeError:
            if not return_lse:
                raise
            res = fn(q, k, v, softmax_scale=scale)
    else:
        res = fn(q, k, v, softmax_scale=scale, return_attn_probs=return_lse)
    out, lse = (res[0], res[1]) if isinstance(res, (tuple, list)) else (res, None)
    if not return_lse:
        return out
    if lse is None:
        raise RuntimeError(f"{backend} returned no log-sum-exp")
    return out, lse[..., :Sq].float()  # some releases pad lse's last dim to the block size


# --------------------------------------------------------------------------------------
# The route
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """The path a locked attention call takes, and why.

    path: "blend_then_plain" (``lock_kv``, then ``plain_attention(backend=plain_backend)``)
        or "fused" (the single-pass Triton kernel).
    plain_backend: the plain attention path (a) uses, the modelled-fastest usable one
        (also what an unlocked call should use); set for both paths.
    modelled_ms: the chosen path's modelled time; plain_ms: the chosen plain backend
        alone (no lock), the yardstick of the cost of locking.
    costs: every candidate's modelled ms, e.g. (("blend+fa3", 19.9), ("fused", 31.0)).
    """
    path: str
    plain_backend: str
    modelled_ms: float
    why: str
    plain_ms: float = float("nan")
    costs: tuple = field(default=())


def choose_path(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, device, *,
                source_shared: bool = True, available: Optional[Sequence[str]] = None,
                arch: Optional[int] = None, device_name: Optional[str] = None) -> Route:
    """Pick "blend_then_plain" or "fused" for a locked attention call from its shapes,
    dtype and device alone (no tensor is read; cheap and cached, fine in a hot loop).

    batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim: the bshd shapes of q and k.
    dtype: torch.float16 / bfloat16 / float32.  device: where the tensors live.
    source_shared: the source K/V is one tensor shared by the batch (batch stride 0, or an
        in-batch source entry): the blend pass reads it once.
    available, arch, device_name: model another machine (e.g. ``available=("fa3", "fa2",
        "sdpa"), arch=90, device_name="H100"``); default: this one.
    """
    batch = check_int("batch", batch, low=1)
    seqlen_q = check_int("seqlen_q", seqlen_q, low=1)
    seqlen_kv = check_int("seqlen_kv", seqlen_kv, low=1)
    heads_q = check_int("heads_q", heads_q, low=1)
    heads_kv = check_int("heads_kv", heads_kv, low=1)
    head_dim = check_int("head_dim", head_dim, low=1, high=MAX_HEAD_DIM)
    if heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be divisible by heads_kv ({heads_kv})")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {describe(dtype)}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of (float16, bfloat16, float32), got {dtype}")
    if not isinstance(source_shared, bool):
        raise TypeError(f"source_shared must be a bool, got {describe(source_shared)}")
    device = _as_device(device)
    modelled = arch is not None or device_name is not None
    if available is None:
        available = tuple(plain_attention_backends(device, dtype, head_dim))
    else:
        available = tuple(available)
        for b in available:
            check_choice("available", b, PLAIN_BACKENDS)
        if "sdpa" not in available:
            available += ("sdpa",)
        if not _fa_supports(dtype, head_dim):
            available = tuple(b for b in available if b == "sdpa")
    on_gpu = device.type == "cuda" or modelled
    sdpa_kind = sdpa_kernel_kind(dtype, head_dim) if on_gpu else "cpu"
    return _choose_cached(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, str(device),
                          source_shared, available, arch, device_name, sdpa_kind, on_gpu)


@functools.lru_cache(maxsize=4096)
def _choose_cached(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype, device, source_shared,
                   available, arch, device_name, sdpa_kind, on_gpu) -> Route:
    dims = (batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype)
    if not on_gpu:
        prof = CPU_PROFILE
        flops = attention_flops(batch, seqlen_q, seqlen_kv, heads_q, head_dim)
        plain = flops / (prof.tensor_flops * 0.3) + LAUNCH_S
        blend = blend_time(batch, seqlen_kv, heads_kv, head_dim, dtype, prof, source_shared=source_shared)
        return Route("blend_then_plain", "sdpa", (plain + blend) * 1e3,
                     f"{device}: the fused Triton kernel runs only through the interpreter off CUDA; "
                     "blend then SDPA (times nominal, not a CPU prediction)", plain * 1e3,
                     (("blend+sdpa", (plain + blend) * 1e3),))
    prof = device_profile(torch.device(device), name=device_name, arch=arch)
    a = max(prof.arch, 80)
    plain = {b: plain_time(b if b != "sdpa" else f"sdpa_{sdpa_kind}", *dims, prof) for b in available}
    blend = blend_time(batch, seqlen_kv, heads_kv, head_dim, dtype, prof, source_shared=source_shared)
    best_plain = min(available, key=lambda b: (plain[b], PLAIN_BACKENDS.index(b)))
    bm, bn, tile_src = fused_blocks(head_dim, dtype, a)
    path_a = blend + plain[best_plain]
    costs = tuple((f"blend+{b}", (blend + plain[b]) * 1e3) for b in available)
    blend_txt = f"blend {blend * 1e3:.3f} + {best_plain} {plain[best_plain] * 1e3:.3f} = {path_a * 1e3:.3f} ms"
    if bm is None:  # the fused kernel has no config here
        return Route("blend_then_plain", best_plain, path_a * 1e3, f"{blend_txt}; {tile_src}",
                     plain[best_plain] * 1e3, costs)
    fused = fused_time(*dims, prof, blended_fraction=1.0, block_m=bm)
    costs += (("fused", fused * 1e3),)
    flops = attention_flops(batch, seqlen_q, seqlen_kv, heads_q, head_dim)
    intensity = flops / plain_bytes(batch, seqlen_q, seqlen_kv, heads_q, heads_kv, head_dim, dtype)
    ridge = _peak(prof, dtype) / prof.bandwidth
    regime = "compute-bound" if intensity > ridge else "memory-bound"
    head = (f"sm_{prof.arch} {prof.name} {dtype_name(dtype)} d{head_dim}, {regime} ({intensity:.0f} FLOP/B vs "
            f"ridge {ridge:.0f}): ")
    fused_txt = (f"fused {fused * 1e3:.3f} ms (worst case over lock values: every key block blended on load, "
                 f"BLOCK_M {bm} from {tile_src})")
    if fused * (1.0 + FUSED_MARGIN) < path_a:
        return Route("fused", best_plain, fused * 1e3,
                     head + fused_txt + f" beats {blend_txt} by more than the {FUSED_MARGIN:.0%} margin",
                     plain[best_plain] * 1e3, costs)
    return Route("blend_then_plain", best_plain, path_a * 1e3,
                 head + blend_txt + f" <= {fused_txt} less the {FUSED_MARGIN:.0%} margin the fused estimate needs",
                 plain[best_plain] * 1e3, costs)

