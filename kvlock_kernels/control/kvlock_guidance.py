"""KV-Lock guidance: CFG with the CFG-Zero* scale, fused with the x0-hat prediction.

    guided = (1 - omega) * s * v_uncond + omega * v_cond        s = s* (or 1: classic CFG)
    x0_hat = latents - sigma * guided                           (flow matching)

One elementwise pass: each input is read once, each output written once; omega, s and
sigma are per-sample scalars read from device tensors (or passed as Python floats), so
a scheduler's device-side omega never goes through the host.

Contract (both backends):
- shapes: (B, ...) with B >= 0 (B = 0 or empty samples give empty outputs); a 1-D input
  is B one-element samples; any strides (also of the (B,) omega, s_star and sigma).
- omega, sigma: >= 0 and finite as Python numbers (ValueError otherwise); as tensors
  checked >= 0 and not NaN on the host with ``check_inputs`` where host checks are
  allowed, else used as they are.
- non-finite values propagate per element as IEEE arithmetic gives them: a NaN or inf
  in v_cond, v_uncond or latents makes that element of the outputs NaN or inf (0 * inf
  is NaN: omega = 1 with an infinite v_uncond gives NaN); a NaN or inf in a per-sample
  control (s_star, a tensor omega or sigma) does so for the whole sample.  Nothing is
  masked or replaced.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._autograd import register_recompute_backward
from .._triton_helpers import cast_for_store
from .._utils import device_guard, triton_interpreting, use_triton
from .._validate import (
    check_backend,
    check_bool,
    check_per_sample,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
)
from .cfg_zero_star_scale import check_prediction_pair

__all__ = ["kvlock_guidance"]

# (BLOCK elements per program, num_warps): also what tools/gpu_report compiles.
LAUNCH_CONFIG = (1024, 4)
# Offsets inside one sample are int32 in the kernel: larger samples take the PyTorch path.
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _load_per_sample(ptr, value, b, stride, IS_TENSOR: tl.constexpr):
    if IS_TENSOR:
        return tl.load(ptr + b * stride).to(tl.float32)
    return value


@triton.jit
def _guidance_kernel(
    VC, VU, LAT, GUIDED, X0,
    OMEGA_PTR, omega_value, stride_omega,
    S_PTR, stride_s,
    SIGMA_PTR, sigma_value, stride_sigma,
    numel_per_sample, num_blocks,
    OMEGA_IS_TENSOR: tl.constexpr, HAS_S: tl.constexpr, SIGMA_IS_TENSOR: tl.constexpr,
    WITH_X0: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    # A 1-D grid (B * num_blocks programs): grid.y would cap B at 65535 on CUDA (a 1-D
    # input is B one-element samples).
    pid = tl.program_id(0)
    b = pid // num_blocks
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)  # < 2**31: see _INT32_MAX
    ok = offs < numel_per_sample
    base = b.to(tl.int64) * numel_per_sample

    # Per-sample scalars: device tensors (stride 0 for a shared one) or kernel arguments.
    omega = _load_per_sample(OMEGA_PTR, omega_value, b, stride_omega, OMEGA_IS_TENSOR)
    uncond_w = 1.0 - omega
    if HAS_S:
        uncond_w = uncond_w * tl.load(S_PTR + b * stride_s).to(tl.float32)

    vc = tl.load(VC + base + offs, mask=ok, other=0.0).to(tl.float32)
    vu = tl.load(VU + base + offs, mask=ok, other=0.0).to(tl.float32)
    guided = uncond_w * vu + omega * vc
    tl.store(GUIDED + base + offs, cast_for_store(guided, GUIDED, INTERPRET), mask=ok)
    if WITH_X0:
        sigma = _load_per_sample(SIGMA_PTR, sigma_value, b, stride_sigma, SIGMA_IS_TENSOR)
        lat = tl.load(LAT + base + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(X0 + base + offs, cast_for_store(lat - sigma * guided, X0, INTERPRET), mask=ok)


def kvlock_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, omega, *,
                    s_star: Optional[torch.Tensor] = None, latents: Optional[torch.Tensor] = None,
                    sigma=None, backend: str = "auto", check_inputs: bool = True):
    """Guided velocity, and optionally the flow-matching x0 prediction, in one pass.

    Arguments:
        v_cond, v_uncond: (B, ...) conditional / unconditional velocity predictions,
            same shape and dtype (fp16/bf16/fp32), any strides.
        omega: guidance scale, >= 0: a Python number, or a floating tensor of shape ()
            or (B,) on v_cond's device, any stride (stays on the device: no host sync).
        s_star: (B,) CFG-Zero* scale (``cfg_zero_star_scale``), any float dtype and
            stride; None means 1 (classic CFG).
        latents: (B, ...) the current noisy latents z_t, same shape as v_cond
            (fp16/bf16/fp32, may differ from v's dtype).
        sigma: the noise level of z_t, >= 0: a Python number, or a tensor of shape () or
            (B,).  Given together with latents.
        check_inputs: check a tensor omega / sigma is non-negative and not NaN (one host
            read each; skipped under torch.compile and CUDA-graph capture).
    Returns:
        guided (v's dtype, contiguous), or (guided, x0_hat) with x0_hat in latents' dtype.
    Non-finite inputs propagate as IEEE arithmetic gives them (module docstring).
    Differentiable (the backward recomputes the PyTorch path; not fused).
    """
    check_prediction_pair(v_cond, v_uncond)
    check_bool("check_inputs", check_inputs)
    B = v_cond.shape[0]
    dev = v_cond.device
    omega_t, omega_v = check_per_sample("omega", omega, B, dev, low=0.0, check_values=check_inputs)
    if s_star is not None:
        check_tensor("s_star", s_star, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
                     layout="(B,)")
        check_shape("s_star", s_star, (B,), "(B,)")
        check_same_device(v_cond=v_cond, s_star=s_star)
    if (latents is None) != (sigma is None):
        missing, given = ("sigma", "latents") if sigma is None else ("latents", "sigma")
        raise ValueError(f"latents and sigma must be given together: {given} was given without {missing}")
    sigma_t, sigma_v = None, 0.0
    if latents is not None:
        check_tensor("latents", latents, layout="(B, ...)")
        check_same_shape("latents", latents, "v_cond", v_cond)
        check_same_device(v_cond=v_cond, latents=latents)
        sigma_t, sigma_v = check_per_sample("sigma", sigma, B, dev, low=0.0, check_values=check_inputs)
    check_backend(backend)
    use_triton(dev, backend)  # an impossible backend raises here, before the op
    guided, x0 = _guidance_op(v_cond, v_uncond, omega_t, omega_v, s_star, latents, sigma_t, sigma_v, backend)
    return guided if latents is None else (guided, x0)


def _per_sample_stride(t: Optional[torch.Tensor]) -> int:
    """Element stride between samples of a () or (B,) control: 0 for a shared value,
    the tensor's own stride otherwise (a (B,) view such as omega[::2] is not dense)."""
    return t.stride(0) if t is not None and t.dim() == 1 else 0


@torch.library.custom_op("kvlock_kernels::kvlock_guidance", mutates_args=())
def _guidance_op(v_cond: torch.Tensor, v_uncond: torch.Tensor, omega_t: Optional[torch.Tensor], omega_v: float,
                 s_star: Optional[torch.Tensor], latents: Optional[torch.Tensor], sigma_t: Optional[torch.Tensor],
                 sigma_v: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (guided, x0_hat); x0_hat is an empty tensor without latents."""
    B = v_cond.shape[0]
    L = math.prod(v_cond.shape[1:])
    block, warps = LAUNCH_CONFIG
    if not use_triton(v_cond.device, backend) or L + block > _INT32_MAX:
        return _torch_guidance(v_cond, v_uncond, omega_t, omega_v, s_star, latents, sigma_t, sigma_v, backend)
    with_x0 = latents is not None
    vc, vu = v_cond.contiguous(), v_uncond.contiguous()
    guided = torch.empty_like(vc)
    lat = latents.contiguous() if with_x0 else vc
    x0 = torch.empty_like(lat) if with_x0 else vc.new_empty(0)
    if L > 0 and B > 0:
        num_blocks = triton.cdiv(L, block)
        with device_guard(vc.device):
            _guidance_kernel[(B * num_blocks,)](
                vc, vu, lat, guided, x0 if with_x0 else guided,
                omega_t if omega_t is not None else vc, omega_v, _per_sample_stride(omega_t),
                s_star if s_star is not None else vc, _per_sample_stride(s_star),
                sigma_t if sigma_t is not None else vc, sigma_v, _per_sample_stride(sigma_t),
                L, num_blocks,
                OMEGA_IS_TENSOR=omega_t is not None, HAS_S=s_star is not None, SIGMA_IS_TENSOR=sigma_t is not None,
                WITH_X0=with_x0, BLOCK=block, INTERPRET=triton_interpreting(), num_warps=warps,
            )
    return guided, x0


@_guidance_op.register_fake
def _(v_cond, v_uncond, omega_t, omega_v, s_star, latents, sigma_t, sigma_v, backend):
    x0 = torch.empty_like(latents, memory_format=torch.contiguous_format) if latents is not None \
        else v_cond.new_empty(0)
    return torch.empty_like(v_cond, memory_format=torch.contiguous_format), x0


def _torch_guidance(v_cond, v_uncond, omega_t, omega_v, s_star, latents, sigma_t, sigma_v, backend):
    """The PyTorch path, with the op's arguments and outputs (differentiable)."""
    omega = omega_t if omega_t is not None else omega_v
    if latents is None:
        return reference.kvlock_guidance(v_cond, v_uncond, omega, s_star=s_star), v_cond.new_empty(0)
    return reference.kvlock_guidance(v_cond, v_uncond, omega, s_star=s_star, latents=latents,
                                     sigma=sigma_t if sigma_t is not None else sigma_v)


register_recompute_backward(_guidance_op, _torch_guidance)  # not fused: the PyTorch path under autograd


# --------------------------------------------------------------------------------------
# gpu_report job protocol (kvlock_kernels.tools.gpu_report)
# --------------------------------------------------------------------------------------
def gpu_report_jobs(arch: int, all_configs: bool) -> list[tuple]:
    """One job per dtype (bf16 by default; fp16 and fp32 with all_configs); no head dim
    (reported as 0)."""
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    return [("kvlock_guidance", __name__, "gpu_report_spec", arch, dt, 0, LAUNCH_CONFIG) for dt in dtypes]


def gpu_report_spec(arch: int, dtype_name: str, head_dim: int, config) -> dict:
    """The fullest variant: device omega, s* and sigma (per-sample strides not assumed
    aligned: a (B,) view may have any stride), and the x0 output."""
    block, warps = config
    ptr = "*" + dtype_name
    types = dict(VC=ptr, VU=ptr, LAT=ptr, GUIDED=ptr, X0=ptr, OMEGA_PTR="*fp32", S_PTR="*fp32",
                 SIGMA_PTR="*fp32", omega_value="fp32", sigma_value="fp32")
    const = dict(OMEGA_IS_TENSOR=True, HAS_S=True, SIGMA_IS_TENSOR=True, WITH_X0=True, BLOCK=block,
                 INTERPRET=False)
    return dict(fn=_guidance_kernel, const=const, types=types, warps=warps, stages=1,
                pointers=("VC", "VU", "LAT", "GUIDED", "X0", "OMEGA_PTR", "S_PTR", "SIGMA_PTR"),
                unit_strides=(), divisible=("numel_per_sample",), config=f"B{block}/w{warps}",
                variant="tensor controls + x0")
