"""CFG-Zero* scale: the projection of the conditional prediction on the unconditional.

    s*[b] = <v_cond[b], v_uncond[b]> / (||v_uncond[b]||^2 + eps)

One read of both inputs: each program reduces a block of one sample to a partial dot
product and squared norm (fp32); the partials are summed in a fixed order afterwards,
so the result has the same bits on every run (no float atomics).

Contract (both backends):
- shapes: (B, ...) with B >= 0; a 1-D input is B samples of one element each; a sample
  with no elements (B, 0, ...) has s* = 0 / (0 + eps) = 0.  Any strides.
- eps: a finite number > 0 (with eps = 0 a zero v_uncond would give 0 / 0).
- non-finite values: s*[b] is NaN when sample b of either input holds a NaN or +-inf (or
  its fp32 sums overflow); s* is otherwise finite.  Other samples are unaffected.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import reference
from .._autograd import register_recompute_backward
from .._utils import device_guard, use_triton
from .._validate import (
    check_backend,
    check_real,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_tensor,
)
from ..reference.control import _finalise_scale

__all__ = ["cfg_zero_star_scale"]

# (BLOCK elements per program, num_warps): also what tools/gpu_report compiles.
LAUNCH_CONFIG = (4096, 8)
# Offsets inside one sample are int32 in the kernel: larger samples take the PyTorch path.
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _dot_and_norm_kernel(VC, VU, PART_DOT, PART_NORM, numel_per_sample, num_blocks, BLOCK: tl.constexpr):
    # A 1-D grid (B * num_blocks programs): grid.y would cap B at 65535 on CUDA (a 1-D
    # input is B one-element samples).
    part = tl.program_id(0)
    b = (part // num_blocks).to(tl.int64)
    offs = (part % num_blocks) * BLOCK + tl.arange(0, BLOCK)  # < 2**31: see _INT32_MAX
    ok = offs < numel_per_sample
    vc = tl.load(VC + b * numel_per_sample + offs, mask=ok, other=0.0).to(tl.float32)
    vu = tl.load(VU + b * numel_per_sample + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(PART_DOT + part, tl.sum(vc * vu, axis=0))
    tl.store(PART_NORM + part, tl.sum(vu * vu, axis=0))


def check_prediction_pair(v_cond, v_uncond):
    """Shared checks of a (conditional, unconditional) prediction pair: tensors of one
    float dtype (TypeError), one shape with a batch dim and one device (ValueError)."""
    check_tensor("v_cond", v_cond, min_ndim=1, layout="(B, ...)")
    check_tensor("v_uncond", v_uncond, min_ndim=1, layout="(B, ...)")
    check_same_dtype("v_uncond", v_uncond, "v_cond", v_cond)
    check_same_shape("v_uncond", v_uncond, "v_cond", v_cond)
    check_same_device(v_cond=v_cond, v_uncond=v_uncond)


def cfg_zero_star_scale(v_cond: torch.Tensor, v_uncond: torch.Tensor, eps: float = 1e-8, *,
                        backend: str = "auto") -> torch.Tensor:
    """Per-sample CFG-Zero* scale.

    Arguments:
        v_cond, v_uncond: (B, ...) conditional / unconditional predictions, same shape
            and dtype (fp16/bf16/fp32), any strides; a 1-D input is B one-element samples.
        eps: added to the squared norm, a finite number > 0.
    Returns:
        s_star: (B,) fp32, deterministic; NaN for a sample holding a NaN or inf.
    Differentiable (the backward recomputes the PyTorch path; not fused).
    """
    check_prediction_pair(v_cond, v_uncond)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    check_backend(backend)
    use_triton(v_cond.device, backend)  # an impossible backend raises here, before the op
    return _cfg_zero_star_op(v_cond, v_uncond, eps, backend)


@torch.library.custom_op("kvlock_kernels::cfg_zero_star_scale", mutates_args=())
def _cfg_zero_star_op(v_cond: torch.Tensor, v_uncond: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    B = v_cond.shape[0]
    L = math.prod(v_cond.shape[1:])
    block, warps = LAUNCH_CONFIG
    if not use_triton(v_cond.device, backend) or L + block > _INT32_MAX:
        return _torch_cfg_zero_star(v_cond, v_uncond, eps, backend)
    vc, vu = v_cond.reshape(B, L).contiguous(), v_uncond.reshape(B, L).contiguous()
    num_blocks = max(1, triton.cdiv(L, block))
    part_dot = torch.zeros(B, num_blocks, dtype=torch.float32, device=vc.device)
    part_norm = torch.zeros(B, num_blocks, dtype=torch.float32, device=vc.device)
    if L > 0 and B > 0:
        with device_guard(vc.device):
            _dot_and_norm_kernel[(B * num_blocks,)](vc, vu, part_dot, part_norm, L, num_blocks, BLOCK=block,
                                                  num_warps=warps)
    return _finalise_scale(part_dot.sum(dim=1), part_norm.sum(dim=1), eps)


@_cfg_zero_star_op.register_fake
def _(v_cond, v_uncond, eps, backend):
    return v_cond.new_empty(v_cond.shape[0], dtype=torch.float32)


def _torch_cfg_zero_star(v_cond, v_uncond, eps, backend):
    return reference.cfg_zero_star_scale(v_cond, v_uncond, eps)


register_recompute_backward(_cfg_zero_star_op, _torch_cfg_zero_star)  # not fused: the PyTorch path under autograd


# --------------------------------------------------------------------------------------
# gpu_report job protocol (kvlock_kernels.tools.gpu_report)
# --------------------------------------------------------------------------------------
def gpu_report_jobs(arch: int, all_configs: bool) -> list[tuple]:
    """One job per input dtype (bf16 by default; fp16 and fp32 with all_configs); no head
    dim (reported as 0)."""
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    return [("cfg_zero_star_scale", __name__, "gpu_report_spec", arch, dt, 0, LAUNCH_CONFIG) for dt in dtypes]


def gpu_report_spec(arch: int, dtype_name: str, head_dim: int, config) -> dict:
    block, warps = config
    types = dict(VC="*" + dtype_name, VU="*" + dtype_name, PART_DOT="*fp32", PART_NORM="*fp32")
    return dict(fn=_dot_and_norm_kernel, const=dict(BLOCK=block), types=types, warps=warps, stages=1,
                pointers=tuple(types), unit_strides=(), divisible=("numel_per_sample",),
                config=f"B{block}/w{warps}")
