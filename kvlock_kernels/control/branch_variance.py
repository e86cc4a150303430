"""Per-token variance across stacked predictions: the hallucination signal of KV-Lock.

    x: (N, B, C, *spatial)   N >= 2 stacked predictions (CFG branches, or a window of
                             x0-hat history)
    var_map[b, s]  = mean_c var_n(x[:, b, c, s])           (with ``correction``)
    masked_mean[b] = mean of var_map[b] over positions where mask != 0

One read of x: each program owns a block of spatial positions of one sample, walks the
channels and the N predictions accumulating sums of x_n - x_0 (shifted by the first
prediction: stable for large means, unlike a raw sum of squares), writes its var_map
block and a partial masked sum and count.  The partials are reduced in a fixed order
afterwards, so the result is deterministic.

Contract (both backends):
- shapes: N >= 2, C >= 1 (C = 0 is a ValueError: a mean over no channels is undefined);
  B = 0 gives empty outputs; no spatial dims (x of shape (N, B, C)) gives var_map (B,)
  and masked_mean = var_map; empty spatial dims give an empty var_map and masked_mean 0.
  Any strides.
- non-finite values: NaN or +-inf anywhere in x[:, b, :, s] gives var_map[b, s] = NaN;
  masked_mean[b] is NaN when such a position is counted (mask nonzero there, or no
  mask) and unaffected otherwise.  A sample with nothing counted gives 0.  Mask values
  only select (nonzero, NaN included, counts).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._autograd import register_recompute_backward
from .._utils import device_guard, use_triton
from .._validate import check_backend, check_int, check_same_device, check_tensor

__all__ = ["branch_variance"]

# (BLOCK positions per program, num_warps): also what tools/gpu_report compiles.
LAUNCH_CONFIG = (1024, 4)
# Positions inside one sample are int32 offsets in the kernel.
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _branch_variance_kernel(
    X, MASK, VAR, PART_SUM, PART_CNT,
    stride_n, stride_b, stride_c, stride_mask_b,
    num_positions, num_channels, num_preds, inv_preds, inv_dof, inv_channels, num_blocks,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    # A 1-D grid (B * num_blocks programs): grid.y would cap B at 65535 on CUDA.
    part = tl.program_id(0)
    pid_b = part // num_blocks
    pid_p = part % num_blocks
    offs = pid_p * BLOCK + tl.arange(0, BLOCK)  # < 2**31: larger samples take the PyTorch path
    ok = offs < num_positions

    # Pointer increments keep every offset 64-bit (x can exceed 2**31 elements).
    chan_ptr = X + pid_b.to(tl.int64) * stride_b + offs
    m2_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for _c in range(num_channels):
        # Shifted sums: d = x_n - x_0 is exact in fp32 when the predictions are close
        # (Sterbenz), so large means cost no precision, unlike a raw sum of squares.
        shift = tl.load(chan_ptr, mask=ok, other=0.0).to(tl.float32)
        pred_ptr = chan_ptr + stride_n
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
        s2 = tl.zeros([BLOCK], dtype=tl.float32)
        for _n in range(1, num_preds):
            d = tl.load(pred_ptr, mask=ok, other=0.0).to(tl.float32) - shift
            s1 += d
            s2 += d * d
            pred_ptr += stride_n
        # Rounding can leave a tiny negative m2: clamp it, but keep NaN (a non-finite input)
        # where tl.maximum would drop it.
        m2 = s2 - s1 * s1 * inv_preds
        m2_sum += tl.where(m2 < 0.0, 0.0, m2)
        chan_ptr += stride_c
    var = m2_sum * inv_dof * inv_channels
    tl.store(VAR + pid_b.to(tl.int64) * num_positions + offs, var, mask=ok)

    # Partial masked sum/count of this block; reduced in a fixed order by the launcher.
    if HAS_MASK:
        m = tl.load(MASK + pid_b.to(tl.int64) * stride_mask_b + offs, mask=ok, other=0)
        sel = ok & (m != 0)
    else:
        sel = ok
    tl.store(PART_SUM + part, tl.sum(tl.where(sel, var, 0.0), axis=0))
    tl.store(PART_CNT + part, tl.sum(sel.to(tl.float32), axis=0))


def _check_args(x, mask, correction, backend):
    check_tensor("x", x, min_ndim=3, layout="(N, B, C, *spatial)")
    N, B, C = x.shape[:3]
    if N < 2:
        raise ValueError(f"x must stack N >= 2 predictions along dim 0 (N, B, C, *spatial), got shape {tuple(x.shape)}")
    if C < 1:
        raise ValueError(f"x must have C >= 1 channels (N, B, C, *spatial): the variance is averaged over channels, "
                         f"got shape {tuple(x.shape)}")
    correction = check_int("correction", correction, low=0, high=N - 1)
    if mask is not None:
        check_tensor("mask", mask, dtypes=None, layout="(B or 1, *spatial)")
        spatial = tuple(x.shape[3:])
        if tuple(mask.shape[1:]) != spatial or mask.dim() != 1 + len(spatial) or mask.shape[0] not in (1, B):
            want = ", ".join(map(str, (f"{B} or 1", *spatial)))
            raise ValueError(f"mask must have shape (B or 1, *spatial) = ({want}) to match x of shape "
                             f"{tuple(x.shape)}, got {tuple(mask.shape)}")
        if mask.is_complex():
            raise TypeError(f"mask must be a real or bool tensor, got {str(mask.dtype).replace('torch.', '')}")
        check_same_device(x=x, mask=mask)
    check_backend(backend)
    return correction


def branch_variance(x: torch.Tensor, *, mask: Optional[torch.Tensor] = None, correction: int = 1,
                    backend: str = "auto"):
    """Variance across stacked predictions, averaged over channels, and its masked mean.

    Arguments:
        x: (N, B, C, *spatial), fp16/bf16/fp32, N >= 2 stacked predictions, C >= 1,
            zero or more spatial dims, any strides.
        mask: (B, *spatial) or (1, *spatial), bool/int/float; positions where it is
            nonzero count for masked_mean.  None: all positions.
        correction: degrees-of-freedom correction of the variance (1: unbiased), in [0, N).
    Returns:
        var_map: (B, *spatial) fp32.
        masked_mean: (B,) fp32; 0 for a sample with no counted position.  It is NaN only
            where a counted position of var_map is NaN (a NaN or inf in x there).
    Raises TypeError (not a tensor, wrong dtype) or ValueError (shapes, N < 2, C = 0,
    correction out of range, devices, backend) before anything runs.  Differentiable in x
    (the backward recomputes the PyTorch path; not fused).
    """
    correction = _check_args(x, mask, correction, backend)
    use_triton(x.device, backend)  # an impossible backend raises here, before the op
    return _branch_variance_op(x, mask, correction, backend)


@torch.library.custom_op("kvlock_kernels::branch_variance", mutates_args=())
def _branch_variance_op(x: torch.Tensor, mask: Optional[torch.Tensor], correction: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    N, B, C = x.shape[:3]
    spatial = tuple(x.shape[3:])
    P = math.prod(spatial)
    block, warps = LAUNCH_CONFIG
    if not use_triton(x.device, backend) or P + block > _INT32_MAX:
        return _torch_branch_variance(x, mask, correction, backend)
    xv = x.reshape(N, B, C, P)
    if P > 0 and xv.stride(3) != 1:
        xv = xv.contiguous()
    var = torch.empty(B, P, dtype=torch.float32, device=x.device)
    num_blocks = max(1, triton.cdiv(P, block))
    part_sum = torch.zeros(B, num_blocks, dtype=torch.float32, device=x.device)
    part_cnt = torch.zeros(B, num_blocks, dtype=torch.float32, device=x.device)
    if mask is not None:
        mv = mask.reshape(mask.shape[0], P)
        mv = mv.view(torch.uint8) if mv.dtype == torch.bool else mv
        mv = mv if mv.stride(-1) == 1 else mv.contiguous()
        mask_stride_b = mv.stride(0) if mv.shape[0] > 1 else 0
    else:
        mv, mask_stride_b = var, 0  # placeholder, never read (HAS_MASK is a constexpr)
    if P > 0 and B > 0:
        with device_guard(x.device):
            _branch_variance_kernel[(B * num_blocks,)](
                xv, mv, var, part_sum, part_cnt,
                xv.stride(0), xv.stride(1), xv.stride(2), mask_stride_b,
                P, C, N, 1.0 / N, 1.0 / (N - correction), 1.0 / C, num_blocks,
                HAS_MASK=mask is not None, BLOCK=block, num_warps=warps,
            )
    total, count = part_sum.sum(dim=1), part_cnt.sum(dim=1)
    masked_mean = torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))
    return var.reshape(B, *spatial), masked_mean


@_branch_variance_op.register_fake
def _(x, mask, correction, backend):
    return (x.new_empty(x.shape[1], *x.shape[3:], dtype=torch.float32),
            x.new_empty(x.shape[1], dtype=torch.float32))


def _torch_branch_variance(x, mask, correction, backend):
    var_map, mean = reference.branch_variance(x, mask=mask, correction=correction)
    return var_map.contiguous(), mean


register_recompute_backward(_branch_variance_op, _torch_branch_variance)  # not fused: PyTorch under autograd


# --------------------------------------------------------------------------------------
# gpu_report job protocol (kvlock_kernels.tools.gpu_report)
# --------------------------------------------------------------------------------------
def gpu_report_jobs(arch: int, all_configs: bool) -> list[tuple]:
    """One job per input dtype (bf16 by default; fp16 and fp32 with all_configs).  The
    kernel has no head dim (reported as 0)."""
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    return [("branch_variance", __name__, "gpu_report_spec", arch, dt, 0, LAUNCH_CONFIG) for dt in dtypes]


def gpu_report_spec(arch: int, dtype_name: str, head_dim: int, config) -> dict:
    """What gpu_report compiles: the masked variant, specialised as the JIT does at Wan
    shapes (strides and the position count are multiples of 16)."""
    block, warps = config
    types = dict(X="*" + dtype_name, MASK="*u8", VAR="*fp32", PART_SUM="*fp32", PART_CNT="*fp32",
                 inv_preds="fp32", inv_dof="fp32", inv_channels="fp32")
    return dict(fn=_branch_variance_kernel, const=dict(HAS_MASK=True, BLOCK=block), types=types, warps=warps,
                stages=1, pointers=("X", "MASK", "VAR", "PART_SUM", "PART_CNT"), unit_strides=(),
                divisible=("stride_n", "stride_b", "stride_c", "stride_mask_b", "num_positions"),
                config=f"B{block}/w{warps}", variant="masked")
