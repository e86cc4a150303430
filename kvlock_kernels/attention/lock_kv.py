"""Locked keys/values in one memory-bound pass: the blend of KV-Lock, outside attention.

    w = lock[b, j]                                   per batch entry and key token
    K'[b, j] = k[b, j] + w (k_src[j] - k[b, j])      same for V

Blending once and then calling the best plain attention kernel (FA3, FA2, cuDNN/SDPA)
costs plain attention plus one pass over K and V; blending inside attention costs a
second dot per mixed block (see docs/blend.md).  The rule is ``reference.lock_kv``'s:
fp32 blend rounded once; weight 0 selects k and does not read the source, weight 1
selects the source and does not read k.

One launch covers every batch entry.  A program owns a block of tokens of one head and
walks the batch: the source tile (a batch-stride-0 ``k_src``/``v_src``, or batch entry
``source_index`` of k/v itself) is loaded once and blended into every entry that needs
it.  In place, rows of weight 0 are neither read nor written, rows of weight 1 are
written without reading k, and the source entry is never touched.

Layout of this file: the Triton kernel, the launcher, the torch custom ops
(``kvlock_kernels::lock_kv`` functional, ``kvlock_kernels::lock_kv_`` in place, with
fake implementations and a recompute backward for the functional one), the argument
checks shared with ``qkv_epilogue``, and the public ``lock_kv``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._autograd import register_recompute_backward
from .._triton_helpers import cast_for_store
from .._utils import device_guard, triton_interpreting, use_triton
from .._validate import (
    LOCK_DTYPES,
    check_backend,
    check_bool,
    check_int,
    check_lock,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .configs import block_d, head_dim_tier

__all__ = ["lock_kv", "LAUNCH_CONFIGS", "launch_config", "gpu_report_jobs"]

# Inputs the ops take; fp64 runs the PyTorch path only (gradcheck, oracles).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BSHD = "(B, S, H, D)"

# (BLOCK_S tokens per program, num_warps) by head-dim tier: 4096 elements per tile over
# 8 warps.  A program keeps the source K and V tiles live across the batch loop beside
# the entry's tiles, about 8 registers per tile element per thread: 16 elements per
# thread give ~125 registers (two programs per SM), 32 would hit 255.
LAUNCH_CONFIGS = {"d64": (64, 8), "d128": (32, 8), "d256": (16, 8)}
INTERPRETER_BLOCK_S = 16


def launch_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_S, num_warps) of the GPU launch for a head dim."""
    return LAUNCH_CONFIGS[head_dim_tier(head_dim)]


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _i64(x):
    """A loop index (a Python int under the interpreter, i32 on GPU) as an int64 scalar."""
    return x + tl.zeros([], dtype=tl.int64)


@triton.jit
def _blend_rows(x, xs, w):
    """x + w (xs - x) per row in fp32; w == 0 selects x, w == 1 selects xs (the
    operand not selected may hold anything: it was not loaded, or is NaN)."""
    wb = w[:, None]
    mixed = x + wb * (xs - x)
    return tl.where(wb == 0.0, x, tl.where(wb == 1.0, xs, mixed))


@triton.jit
def _lock_kv_kernel(
    K, V, KS, VS, LOCK, KO, VO,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_lb, stride_ls,
    stride_kob, stride_kos, stride_koh,
    stride_vob, stride_vos, stride_voh,
    batch, seqlen, src_index,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    SHARED_SRC: tl.constexpr, BRANCH: tl.constexpr, IN_PLACE: tl.constexpr, ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program: BLOCK_S tokens of one head, every batch entry.  The last dim of every
    # tensor is contiguous; offsets are 64-bit (a fused qkv chunk of Wan-14B at batch 3
    # spans more than 2**31 elements).  Tensor strides come divided by ALIGN, their
    # common power-of-two factor: multiplied back here, the compiler knows every row
    # starts on an ALIGN-element boundary and vectorises loads and stores (head dim 72:
    # strides are multiples of 8, not of the 16 Triton specialises on).
    stride_kb = tl.cast(stride_kb, tl.int64) * ALIGN
    stride_ks = tl.cast(stride_ks, tl.int64) * ALIGN
    stride_kh = tl.cast(stride_kh, tl.int64) * ALIGN
    stride_vb = tl.cast(stride_vb, tl.int64) * ALIGN
    stride_vs = tl.cast(stride_vs, tl.int64) * ALIGN
    stride_vh = tl.cast(stride_vh, tl.int64) * ALIGN
    stride_ksb = tl.cast(stride_ksb, tl.int64) * ALIGN
    stride_kss = tl.cast(stride_kss, tl.int64) * ALIGN
    stride_ksh = tl.cast(stride_ksh, tl.int64) * ALIGN
    stride_vsb = tl.cast(stride_vsb, tl.int64) * ALIGN
    stride_vss = tl.cast(stride_vss, tl.int64) * ALIGN
    stride_vsh = tl.cast(stride_vsh, tl.int64) * ALIGN
    stride_kob = tl.cast(stride_kob, tl.int64) * ALIGN
    stride_kos = tl.cast(stride_kos, tl.int64) * ALIGN
    stride_koh = tl.cast(stride_koh, tl.int64) * ALIGN
    stride_vob = tl.cast(stride_vob, tl.int64) * ALIGN
    stride_vos = tl.cast(stride_vos, tl.int64) * ALIGN
    stride_voh = tl.cast(stride_voh, tl.int64) * ALIGN
    pid_s = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < seqlen
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    tile_ok = row_ok[:, None] & d_ok

    # Per-row offsets only: full-tile 64-bit offsets kept live across the batch loop
    # would cost two registers per element.
    cols = offs_d[None, :]
    k_row = (rows64 * stride_ks + head * stride_kh)[:, None]
    v_row = (rows64 * stride_vs + head * stride_vh)[:, None]
    ks_row = (rows64 * stride_kss + head * stride_ksh)[:, None]
    vs_row = (rows64 * stride_vss + head * stride_vsh)[:, None]
    ko_row = (rows64 * stride_kos + head * stride_koh)[:, None]
    vo_row = (rows64 * stride_vos + head * stride_voh)[:, None]
    lock_off = rows64 * stride_ls

    ks = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    vs = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    if SHARED_SRC:
        # One source tile for the whole batch.  Rows no entry locks are not read (the
        # source may hold NaN there), except for the functional branch copy.
        if BRANCH and not IN_PLACE:
            need = row_ok
        else:
            need = rows < 0
            for b in range(batch):
                if b != src_index:
                    w = tl.load(LOCK + b * stride_lb + lock_off, mask=row_ok, other=0.0)
                    need = need | (w > 0.0)
        src_ok = tile_ok & need[:, None]
        ks_raw = tl.load(KS + ks_row + cols, mask=src_ok, other=0.0)
        vs_raw = tl.load(VS + vs_row + cols, mask=src_ok, other=0.0)
        if BRANCH and not IN_PLACE:
            # The source entry's own output: its bytes, copied once from the tile.
            src64 = src_index.to(tl.int64)
            tl.store(KO + src64 * stride_kob + ko_row + cols, ks_raw, mask=tile_ok)
            tl.store(VO + src64 * stride_vob + vo_row + cols, vs_raw, mask=tile_ok)
        ks = ks_raw.to(tl.float32)
        vs = vs_raw.to(tl.float32)

    for b in range(batch):
        if b != src_index:
            b64 = _i64(b)
            w = tl.load(LOCK + b64 * stride_lb + lock_off, mask=row_ok, other=0.0)
            if not SHARED_SRC:
                src_ok = tile_ok & (w > 0.0)[:, None]
                ks = tl.load(KS + b64 * stride_ksb + ks_row + cols, mask=src_ok, other=0.0).to(tl.float32)
                vs = tl.load(VS + b64 * stride_vsb + vs_row + cols, mask=src_ok, other=0.0).to(tl.float32)
            # Weight-1 rows do not read k/v; in place, weight-0 rows are left alone.
            fresh_ok = tile_ok & (w < 1.0)[:, None]
            if IN_PLACE:
                out_ok = tile_ok & (w > 0.0)[:, None]
                fresh_ok = fresh_ok & (w > 0.0)[:, None]
            else:
                out_ok = tile_ok
            kx = tl.load(K + b64 * stride_kb + k_row + cols, mask=fresh_ok, other=0.0).to(tl.float32)
            vx = tl.load(V + b64 * stride_vb + v_row + cols, mask=fresh_ok, other=0.0).to(tl.float32)
            kl = _blend_rows(kx, ks, w)
            vl = _blend_rows(vx, vs, w)
            tl.store(KO + b64 * stride_kob + ko_row + cols, cast_for_store(kl, KO, INTERPRET), mask=out_ok)
            tl.store(VO + b64 * stride_vob + vo_row + cols, cast_for_store(vl, VO, INTERPRET), mask=out_ok)


def kernel_constexprs(head_dim: int, *, shared_src: bool, branch: bool, in_place: bool, align: int = 16,
                      interpret: bool = False) -> dict:
    """The non-tiling constexprs of ``_lock_kv_kernel`` (also used by the GPU report)."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), SHARED_SRC=shared_src, BRANCH=branch,
                IN_PLACE=in_place, ALIGN=align, INTERPRET=interpret)


def row_strides(t: torch.Tensor) -> tuple:
    """Strides of every dim but the last, 0 for dims of size 1 (never stepped)."""
    return tuple(0 if n == 1 else st for n, st in zip(t.shape[:-1], t.stride()[:-1]))


def stride_align(strides) -> int:
    """The largest power of two <= 16 dividing every stride (the kernels' ALIGN)."""
    align = 16
    while align > 1 and any(st % align for st in strides):
        align //= 2
    return align


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _launch(k, v, lock, k_src, v_src, source_index, k_out, v_out, in_place):
    """k, v, k_out, v_out: (B, S, H, D) with unit last stride.  lock: fp32 (1|B, S).
    Source: k_src/v_src (1|B, S, H, D), or source_index >= 0 (then k_src is None)."""
    B, S, H, D = k.shape
    branch = source_index >= 0
    if branch:
        k_src, v_src = k[source_index:source_index + 1], v[source_index:source_index + 1]
    src_strides = row_strides(k_src) + row_strides(v_src)
    shared = src_strides[0] == 0 and src_strides[3] == 0
    strides = [*row_strides(k), *row_strides(v), *src_strides, *row_strides(k_out), *row_strides(v_out)]
    align = stride_align(strides)
    strides = [st // align for st in strides]
    interpret = triton_interpreting()
    block_s, warps = (INTERPRETER_BLOCK_S, 1) if interpret else launch_config(D)
    grid = (triton.cdiv(S, block_s), H)
    with device_guard(k.device):
        _lock_kv_kernel[grid](
            k, v, k_src, v_src, lock, k_out, v_out,
            *strides[:12], _batch_stride(lock), lock.stride(1), *strides[12:],
            B, S, source_index,
            **kernel_constexprs(D, shared_src=shared, branch=branch, in_place=in_place, align=align,
                                interpret=interpret),
            BLOCK_S=block_s, num_warps=warps,
        )


def _runs_triton(t: torch.Tensor, backend: str) -> bool:
    return t.dtype in KERNEL_DTYPES and use_triton(t.device, backend)


# --------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------
def _torch_lock_kv(k, v, lock, k_src, v_src, source_index, backend):
    """The PyTorch path with the op's positional arguments (also the op's backward)."""
    return reference.lock_kv(k, v, lock, k_src=k_src, v_src=v_src,
                             source_index=None if source_index < 0 else source_index)


@torch.library.custom_op("kvlock_kernels::lock_kv", mutates_args=())
def _lock_kv_op(k: torch.Tensor, v: torch.Tensor, lock: torch.Tensor, k_src: Optional[torch.Tensor],
                v_src: Optional[torch.Tensor], source_index: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional: new contiguous (B, S, H, D) K', V'.  source_index < 0: k_src/v_src."""
    if not _runs_triton(k, backend) or k.numel() == 0:
        kl, vl = _torch_lock_kv(k, v, lock, k_src, v_src, source_index, backend)
        return kl.contiguous(), vl.contiguous()
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    v_out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _launch(k, v, lock.to(torch.float32), k_src, v_src, source_index, k_out, v_out, in_place=False)
    return k_out, v_out


@_lock_kv_op.register_fake
def _(k, v, lock, k_src, v_src, source_index, backend):
    return torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


register_recompute_backward(_lock_kv_op, _torch_lock_kv)


@torch.library.custom_op("kvlock_kernels::lock_kv_", mutates_args=("k", "v"))
def _lock_kv_inplace_op(k: torch.Tensor, v: torch.Tensor, lock: torch.Tensor, k_src: Optional[torch.Tensor],
                        v_src: Optional[torch.Tensor], source_index: int, backend: str) -> None:
    """In place: K', V' written into k, v for every entry but the source entry."""
    if k.numel() == 0:
        return
    if _runs_triton(k, backend) and k.stride(-1) == 1 and v.stride(-1) == 1:
        _launch(k, v, lock.to(torch.float32), k_src, v_src, source_index, k, v, in_place=True)
        return
    kl, vl = _torch_lock_kv(k, v, lock, k_src, v_src, source_index, backend)
    if source_index < 0:
        k.copy_(kl)
        v.copy_(vl)
        return
    for b in range(k.shape[0]):  # the source entry keeps its bytes (NaN payloads included)
        if b != source_index:
            k[b].copy_(kl[b])
            v[b].copy_(vl[b])


@_lock_kv_inplace_op.register_fake
def _(k, v, lock, k_src, v_src, source_index, backend):
    return None


# --------------------------------------------------------------------------------------
# Argument checks (shared with qkv_epilogue)
# --------------------------------------------------------------------------------------
def lock_weights_2d(lock, batch: int, seqlen: int, check_values: bool) -> torch.Tensor:
    """lock: (S,), (1, S) or (B, S), float in [0, 1] or bool (``_validate.check_lock``).
    Returns a 2-D (1|B, S) floating tensor (bool -> fp32, floats unchanged)."""
    view = check_lock(lock, batch, seqlen, check_values=check_values)
    return view.to(torch.float32) if view.dtype == torch.bool else view


def check_source(k_src, v_src, source_index, batch: int, tail: tuple, ref: torch.Tensor, *, required: bool,
                 ref_name: str = "k"):
    """The source of the blend: ``k_src, v_src`` (B|1, *tail) in ref's dtype, or an int
    ``source_index`` in [0, B).  Returns the source index as an int (-1: k_src/v_src;
    -2: no source given, allowed when not ``required``)."""
    if source_index is not None:
        if k_src is not None or v_src is not None:
            raise ValueError("give the source either as k_src and v_src or as source_index, not both "
                             f"(got source_index={source_index!r} and k_src/v_src tensors)")
        return check_int("source_index", source_index, low=0, high=batch - 1)
    if k_src is None and v_src is None:
        if required:
            raise ValueError("lock needs a source: k_src and v_src (B|1, S, H, D), or source_index (an int)")
        return -2
    if (k_src is None) != (v_src is None):
        raise ValueError(f"k_src and v_src must be given together (got only {'k_src' if v_src is None else 'v_src'})")
    want = ", ".join(map(str, tail))
    for name, t in (("k_src", k_src), ("v_src", v_src)):
        check_tensor(name, t, dtypes=DTYPES, ndim=len(tail) + 1, layout=BSHD)
        check_same_dtype(name, t, ref_name, ref)
        if tuple(t.shape[1:]) != tuple(tail) or t.shape[0] not in (1, batch):
            raise ValueError(f"{name} must have shape {BSHD} = ({batch} or 1, {want}), got {tuple(t.shape)}")
    return -1


def check_kernel_backend(backend, dtype: torch.dtype, device: torch.device) -> None:
    """``backend`` is an option (``_validate.check_backend``) that can run ``dtype`` on ``device``."""
    check_backend(backend)
    if backend == "triton" and dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' needs float16, bfloat16 or float32 inputs, got {dtype} "
                        "(float64 runs with backend='torch')")
    use_triton(device, backend)  # an impossible backend raises here, before any launch


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def lock_kv(k: torch.Tensor, v: torch.Tensor, lock: torch.Tensor, *, k_src: Optional[torch.Tensor] = None,
            v_src: Optional[torch.Tensor] = None, source_index: Optional[int] = None, inplace: bool = False,
            backend: str = "auto", check_inputs: bool = True):
    """Locked keys and values ``K' = k + lock (k_src - k)``, same for v, per batch entry and
    key token, under the one blending rule (``reference.lock_kv``).

    Arguments:
        k, v: (B, S, H, D), fp16 / bf16 / fp32 (fp64: PyTorch path only), same shape,
            dtype and device.  Any strides; a last dim that is not contiguous is copied.
        lock: (S,), (1, S) or (B, S), float in [0, 1] or bool (True = 1): the weight of the
            source per batch entry and token.
        k_src, v_src: (B, S, H, D) or (1, S, H, D) in k's dtype: the source keys/values.
            A batch-stride-0 view (``expand``) is read in place, once per token block.
        source_index: instead of k_src/v_src, batch entry ``source_index`` of k, v is the
            source (an in-batch source branch).  That entry is not locked: in place it is
            not written at all, functionally it is copied once.
        inplace: write K', V' into k, v (only the entries and rows that change) and return
            (k, v); k and v must not overlap each other.  Otherwise new contiguous tensors.
        backend: "auto" (Triton on CUDA, and on CPU under TRITON_INTERPRET=1; else
            PyTorch), "triton" or "torch".
        check_inputs: read the lock on the host to check its values lie in [0, 1] (one
            sync; skipped under torch.compile and CUDA-graph capture).
    Returns:
        (k_locked, v_locked): (B, S, H, D) in k's dtype.
    Raises:
        TypeError for a wrong type or dtype, ValueError for a wrong shape, device, range
        or option; all before anything is written.
    """
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=DTYPES, ndim=4, layout=BSHD)
    check_same_dtype("v", v, "k", k)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {BSHD} = {tuple(k.shape)}, got {tuple(v.shape)}")
    check_bool("inplace", inplace)
    check_bool("check_inputs", check_inputs)
    B, S, H, D = k.shape
    src = check_source(k_src, v_src, source_index, B, (S, H, D), k, required=True)
    check_tensor("lock", lock, dtypes=LOCK_DTYPES, layout="(S,), (1, S) or (B, S)")  # kind first: TypeError
    check_same_device(k=k, v=v, lock=lock, k_src=k_src, v_src=v_src)
    lock2 = lock_weights_2d(lock, B, S, check_inputs)
    check_kernel_backend(backend, k.dtype, k.device)
    if inplace and not torch.compiler.is_compiling() and k.numel() > 0 and k.data_ptr() == v.data_ptr():
        raise ValueError("inplace=True needs k and v in different memory (got the same storage offset)")

    if src == -1:
        k_src = k_src if k_src.stride(-1) == 1 else k_src.contiguous()
        v_src = v_src if v_src.stride(-1) == 1 else v_src.contiguous()
    if inplace:
        if needs_grad(k, v, lock2, k_src, v_src):
            # Through autograd: the op's saved inputs must not be the tensors written.
            kl, vl = _lock_kv_op(k.clone(), v.clone(), lock2, k_src, v_src, src, backend)
            k.copy_(kl)
            v.copy_(vl)
        else:
            _lock_kv_inplace_op(k, v, lock2, k_src, v_src, src, backend)
        return k, v
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    return _lock_kv_op(k, v, lock2, k_src, v_src, src, backend)


# --------------------------------------------------------------------------------------
# GPU report (tools/gpu_report job protocol)
# --------------------------------------------------------------------------------------
GPU_REPORT_HEAD_DIMS = (64, 128)
GPU_REPORT_ALL_HEAD_DIMS = (64, 72, 80, 96, 128, 256)
# (label, shared_src, branch, in_place): the variants an edit runs.
GPU_REPORT_VARIANTS = (("branch", True, True, False), ("branch_inplace", True, True, True),
                       ("cache_shared", True, False, False), ("cache_per_entry", False, False, False))


def gpu_report_jobs(arch: int, all_configs: bool) -> list[tuple]:
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    head_dims = GPU_REPORT_ALL_HEAD_DIMS if all_configs else GPU_REPORT_HEAD_DIMS
    variants = GPU_REPORT_VARIANTS if all_configs else GPU_REPORT_VARIANTS[:1]
    return [("lock_kv", __name__, "gpu_report_build", arch, dt, d, variant)
            for dt in dtypes for d in head_dims for variant in variants]


def gpu_report_build(arch: int, dtype_name: str, head_dim: int, config) -> dict:
    label, shared, branch, in_place = config
    block_s, warps = launch_config(head_dim)
    # What the launcher passes for contiguous (B, S, H, D) tensors.
    const = kernel_constexprs(head_dim, shared_src=shared, branch=branch, in_place=in_place,
                              align=stride_align([head_dim]))
    const["BLOCK_S"] = block_s
    ptr = "*" + dtype_name
    types = {n: ptr for n in ("K", "V", "KS", "VS", "KO", "VO")}
    types["LOCK"] = "*fp32"
    return dict(fn=_lock_kv_kernel, const=const, types=types, warps=warps, stages=1,
                pointers=("K", "V", "KS", "VS", "LOCK", "KO", "VO"), unit_strides=("stride_ls",),
                config=f"{label}/S{block_s}/w{warps}")
