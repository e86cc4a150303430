"""Merge two partial attentions computed over disjoint key sets.

With lse = log(sum exp(scores)) over each key set,

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

which equals attention over the union of the keys.  This is what lets a KV cache be
split (resident + spilled), or keys be sharded across devices (context parallelism).
Both backends compute it relative to the larger lse of each row (exact at any lse
magnitude: two equal lse of 1e8 still give weights 1/2, 1/2).

Non-finite inputs (both backends):
- lse -inf marks an empty partial (weight 0); both -inf give out 0 and lse -inf.
- NaN or +inf in lse_a or lse_b gives NaN for that row's out (all of D) and lse.
- A partial whose weight is 0 (lse -inf, or so far below the other that its weight
  underflows) is not read, as the blending rule's w == 0: NaN/inf in its out do not
  propagate.  Otherwise NaN/inf in out_a / out_b propagate per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from .._autograd import register_recompute_backward
from .._triton_helpers import cast_for_store
from .._utils import device_guard, triton_interpreting, use_triton
from .._validate import (
    check_backend,
    check_choice,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_shape,
    check_tensor,
)
from .configs import block_d

__all__ = ["merge_attention_states"]

# (rows per program, num_warps) on GPUs: also what tools/gpu_report compiles.  8 warps:
# with 4, head dim 72 (tiles padded to 128) needs 255 registers and spills on sm_90;
# with 8 every head dim 64..256 and dtype stays at <= 122 registers, no spills.
LAUNCH_CONFIG = (32, 8)


@triton.jit
def _merge_states_kernel(
    OA, LA, OB, LB, OUT, LOUT,
    stride_ab, stride_as, stride_ah,
    stride_bb, stride_bs, stride_bh,
    stride_ob, stride_os, stride_oh,
    num_heads, seqlen, num_s_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One program: BLOCK_S rows of one (batch, head).  lse tensors are (B, H, S) contiguous.
    # A 1-D grid (B * H * num_s_blocks programs): grid.y would cap B * H at 65535 on CUDA.
    pid = tl.program_id(0)
    pid_bh = pid // num_s_blocks
    pid_s = pid % num_s_blocks
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = pid_bh % num_heads
    row0 = pid_s * BLOCK_S
    offs_s = row0 + tl.arange(0, BLOCK_S)
    # The block's first row in int64 (S x the token stride can pass 2**31), the offsets
    # inside the tile in int32 (BLOCK_S rows).
    rows = tl.arange(0, BLOCK_S)[:, None]
    row0 = row0.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < seqlen
    tile_ok = s_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    lse_off = pid_bh.to(tl.int64) * seqlen + offs_s
    la = tl.load(LA + lse_off, mask=s_ok, other=float("-inf"))
    lb = tl.load(LB + lse_off, mask=s_ok, other=float("-inf"))
    # Weights relative to the larger lse; a row whose two partials are both empty
    # (-inf) gets zero weights and lse -inf instead of NaN.
    # NaN or +inf in either lse: the row is NaN (tl.maximum would drop a NaN).
    invalid = (la != la) | (lb != lb) | (la == float("inf")) | (lb == float("inf"))
    la = tl.where(invalid, 0.0, la)
    lb = tl.where(invalid, 0.0, lb)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    total = wa + wb
    nonempty = total > 0
    safe_total = tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, m_safe + tl.log(safe_total), float("-inf"))
    lse = tl.where(invalid, float("nan"), lse)
    inv = tl.where(nonempty, 1.0 / safe_total, 0.0)
    wa = wa * inv
    wb = wb * inv

    a = tl.load(OA + off_b * stride_ab + off_h * stride_ah + row0 * stride_as + (rows * stride_as + offs_d[None, :]),
                mask=tile_ok, other=0.0).to(tl.float32)
    b = tl.load(OB + off_b * stride_bb + off_h * stride_bh + row0 * stride_bs + (rows * stride_bs + offs_d[None, :]),
                mask=tile_ok, other=0.0).to(tl.float32)
    # A partial of weight 0 is not read (its out may hold NaN/inf: an empty partial).
    out = (tl.where((wa > 0)[:, None], a * wa[:, None], 0.0) + tl.where((wb > 0)[:, None], b * wb[:, None], 0.0))
    out = tl.where(invalid[:, None], float("nan"), out)
    tl.store(OUT + off_b * stride_ob + off_h * stride_oh + row0 * stride_os + (rows * stride_os + offs_d[None, :]),
             cast_for_store(out, OUT, INTERPRET), mask=tile_ok)
    tl.store(LOUT + lse_off, lse, mask=s_ok)


def _dims_of(layout: str) -> str:
    return "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, layout: str = "bshd", backend: str = "auto"):
    """Combine two partial attention results over disjoint key sets.

    Arguments:
        out_a, out_b: (B, S, H, D) (layout "bshd") or (B, H, S, D) ("bhsd"); fp16/bf16/fp32,
            same shape and dtype, any strides.
        lse_a, lse_b: (B, H, S) fp32 natural-log log-sum-exp, as returned by
            ``kv_lock_attention(..., return_lse=True)``.  -inf marks an empty partial;
            NaN or +inf makes the row NaN (module docstring).
        layout: "bshd" or "bhsd".
    Returns:
        (out, lse): out like out_a (same layout, contiguous), lse (B, H, S) fp32.
    Raises TypeError (not a tensor, a dtype, a dtype mismatch, a non-string layout) or
    ValueError (shapes, devices, unknown layout or backend) before anything runs.
    Differentiable (out and lse): the backward recomputes the PyTorch merge under
    autograd (exact, not fused).
    """
    check_choice("layout", layout, ("bshd", "bhsd"))
    check_tensor("out_a", out_a, ndim=4, layout=_dims_of(layout))
    check_tensor("out_b", out_b, ndim=4, layout=_dims_of(layout))
    check_same_dtype("out_b", out_b, "out_a", out_a)
    check_same_shape("out_b", out_b, "out_a", out_a)
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(name, t, dtypes=(torch.float32,), ndim=3, layout="(B, H, S)")
    check_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    a = out_a.transpose(1, 2) if layout == "bhsd" else out_a
    B, S, H, D = a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_shape(name, t, (B, H, S), f"(B, H, S) to match out_a {_dims_of(layout)} = {tuple(out_a.shape)}")
    check_backend(backend)
    use_triton(a.device, backend)  # an impossible backend raises here, before the op
    return _merge_op(out_a, lse_a, out_b, lse_b, layout, backend)


@torch.library.custom_op("kvlock_kernels::merge_attention_states", mutates_args=())
def _merge_op(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, layout: str,
              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(out_a.device, backend):
        return _torch_merge(out_a, lse_a, out_b, lse_b, layout, backend)
    a = out_a.transpose(1, 2) if layout == "bhsd" else out_a
    b = out_b.transpose(1, 2) if layout == "bhsd" else out_b
    B, S, H, D = a.shape
    out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    out_v = out.transpose(1, 2) if layout == "bhsd" else out
    lse = torch.empty(B, H, S, dtype=torch.float32, device=a.device)
    if S == 0 or B * H == 0:
        return out, lse
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    block_s, warps = (64, 1) if triton_interpreting() else LAUNCH_CONFIG
    num_s_blocks = triton.cdiv(S, block_s)
    with device_guard(a.device):
        _launch_merge((B * H * num_s_blocks,), a, lse_a, b, lse_b, out_v, lse, H, S, num_s_blocks, D, block_s, warps)
    return out, lse


def _torch_merge(out_a, lse_a, out_b, lse_b, layout, backend):
    """The PyTorch path (the op's arguments): the reference in bshd, out contiguous in the
    given layout.  Differentiable: the op's backward recomputes it under autograd."""
    a = out_a.transpose(1, 2) if layout == "bhsd" else out_a
    b = out_b.transpose(1, 2) if layout == "bhsd" else out_b
    out, lse = reference.merge_attention_states(a, lse_a, b, lse_b)
    out = out.transpose(1, 2).contiguous() if layout == "bhsd" else out.contiguous()
    return out, lse


@_merge_op.register_fake
def _(out_a, lse_a, out_b, lse_b, layout, backend):
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), torch.empty_like(lse_a)


# Ring attention (context parallelism) merges partials inside the model: training through
# it needs a backward.  Not fused: the PyTorch merge is recomputed under autograd.
register_recompute_backward(_merge_op, _torch_merge)


def _launch_merge(grid, a, lse_a, b, lse_b, out_v, lse, H, S, num_s_blocks, D, block_s, warps):
    _merge_states_kernel[grid](
        a, lse_a.contiguous(), b, lse_b.contiguous(), out_v, lse,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        out_v.stride(0), out_v.stride(1), out_v.stride(2),
        H, S, num_s_blocks, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_S=block_s,
        INTERPRET=triton_interpreting(), num_warps=warps,
    )


# --------------------------------------------------------------------------------------
# gpu_report job protocol (kvlock_kernels.tools.gpu_report)
# --------------------------------------------------------------------------------------
def gpu_report_jobs(arch: int, all_configs: bool) -> list[tuple]:
    """Head dims 64 and 128 in bf16 by default; every head dim and dtype with all_configs."""
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    head_dims = (64, 72, 80, 96, 128, 256) if all_configs else (64, 128)
    return [("merge_attention_states", __name__, "gpu_report_spec", arch, dt, d, LAUNCH_CONFIG)
            for dt in dtypes for d in head_dims]


def gpu_report_spec(arch: int, dtype_name: str, head_dim: int, config) -> dict:
    block_s, warps = config
    const = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_S=block_s,
                 INTERPRET=False)
    ptr = "*" + dtype_name
    types = dict(OA=ptr, OB=ptr, OUT=ptr, LA="*fp32", LB="*fp32", LOUT="*fp32")
    # (B, S, H, D) strides: multiples of 16 when H * D and D are.
    divisible = ["stride_ab", "stride_as", "stride_bb", "stride_bs", "stride_ob", "stride_os"]
    if head_dim % 16 == 0:
        divisible += ["stride_ah", "stride_bh", "stride_oh"]
    return dict(fn=_merge_states_kernel, const=const, types=types, warps=warps, stages=1,
                pointers=tuple(types), unit_strides=(), divisible=tuple(divisible),
                config=f"S{block_s}/w{warps}")
