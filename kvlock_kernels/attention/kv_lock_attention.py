"""Fused KV-lock attention: the locked keys/values are blended while their tiles are
loaded, inside a flash-style online-softmax attention kernel.

    w_j = lock[b, j]                                # per key token, in [0, 1]
    K_j = k_j + w_j * (k_src_j - k_j)               # same for V
    out = softmax(q K^T * softmax_scale) V

The blended K/V never exist in global memory.  Per KV block the kernel loads the block's
lock weights once, then each K (and V) tile from both tensors with per-row masks: the
fresh rows where ``w != 1``, the source rows where ``w != 0`` (a masked-off row is not
read from memory; its operand is 0).  The tile is blended in fp32 as
``(1 - w) k + w k_src`` and rounded once to the input dtype: that follows the library's
one blending rule (``kvlock_kernels.reference.lock_kv``): ``w == 0`` gives k exactly and
never reads k_src, ``w == 1`` gives k_src exactly and never reads k, NaN/inf in the row
that is not read cannot propagate; other weights propagate IEEE (the fp32 value may differ
from ``k + w (k_src - k)`` by fp32 rounding before the one rounding to the dtype).  The
blended tile feeds ONE QK dot (and the V tile one PV dot): a locked block issues the
tensor-core work of a plain block, whatever its weights (all 0, all 1, constant, mixed).
There is no data-dependent branch: every block of the locked kernel runs the same
straight-line code, and the software pipeliner turns every tile load (lock, k, k_src,
v, v_src) into an asynchronous copy.  The blend costs ALU and shared-memory work per
block (``python -m kvlock_kernels.tools.gpu_report`` counts it), not tensor-core work.

``HAS_LOCK`` is a compile-time switch: the unlocked kernel loads one K and one V tile per
block with no lock and no blend.  The KV loop runs over full blocks without boundary
masks, then one masked tail block when the key length is not a multiple of BLOCK_N.
fp16/bf16 on GPUs (not head dim > 128 on sm_80: no config); fp32 runs through the kernel
under the interpreter only (fp32 CUDA calls blend with ``lock_kv`` and attend with SDPA,
see ``FP32_ON_GPU``).  Which path serves a ``backend="auto"`` call on CUDA (this kernel,
or the blend then the fastest plain attention) is ``select_backend``'s call, from shapes.

Layout of this file: the Triton kernel, the launcher (configs in ``configs.py``), the
torch custom op (fake implementation for torch.compile, recompute backward), and the
public ``kv_lock_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils import flop_counter

from .. import reference
from .._autograd import register_recompute_backward
from .._triton_helpers import cast_for_store, round_to_bf16_rne
from .._utils import device_guard, triton_interpreting, use_triton
from .._validate import (
    LOCK_DTYPES,
    check_backend,
    check_bool,
    check_choice,
    check_lock,
    check_same_device,
    check_same_dtype,
    check_softmax_scale,
    check_tensor,
)
from .configs import (  # noqa: F401  (re-exported: tests and tools read them here)
    DTYPES_BY_NAME,
    INTERPRETER_CONFIG,
    INTERPRETER_CONFIGS,
    KERNEL_CONFIGS,
    block_d,
    configs_for,
    dtype_name,
    head_dim_tier,
)
from .lock_kv import lock_kv
from .routing import _cuda_arch, choose_path, plain_attention  # _cuda_arch: tests patch it here

__all__ = ["kv_lock_attention", "fused_attention_with_config", "KERNEL_CONFIGS", "INTERPRETER_CONFIGS",
           "configs_for", "configs_for_head_dim"]

MAX_HEAD_DIM = 256
# The largest BLOCK_M / BLOCK_N a launch may use: bounds the int32 offsets inside a tile.
MAX_BLOCK = 128
_INT32_LIMIT = 2 ** 31


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 values -> a dot operand in DTYPE, rounded to nearest once.  Under the
    interpreter the rounded values stay fp32: its bf16 dot is wrong (triton#11584) and
    its fp32 -> bf16 cast truncates."""
    if INTERPRET:
        if DTYPE == tl.bfloat16:
            x = round_to_bf16_rne(x)
        elif DTYPE == tl.float16:
            x = x.to(tl.float16).to(tl.float32)
    else:
        x = x.to(DTYPE)
    return x


@triton.jit
def _kv_tile(X, XS, offs_x, offs_xs, w, n_ok, d_ok, DTYPE: tl.constexpr, HAS_LOCK: tl.constexpr,
             MASK_N: tl.constexpr, EVEN_D: tl.constexpr, INTERPRET: tl.constexpr):
    """One (BLOCK_N, BLOCK_D) K or V tile, ready for the dot.  X, XS: pointers to the
    block's first row of the fresh and the source tensor; offs_*: int32 tile offsets."""
    if HAS_LOCK:
        # Per-row masks: a row is read from the tensor(s) its weight needs (w == 0: k
        # only, w == 1: k_src only); the other operand of that row is 0, never memory, so
        # NaN/inf there cannot propagate.  (!= rather than < 1 / > 0: a weight outside
        # [0, 1], allowed with check_inputs=False, blends both like the PyTorch path.)
        fresh = w != 1.0
        source = w != 0.0
        if MASK_N:
            fresh = fresh & n_ok
            source = source & n_ok
        fresh_2d = fresh[:, None]
        source_2d = source[:, None]
        if not EVEN_D:
            fresh_2d = fresh_2d & d_ok[None, :]
            source_2d = source_2d & d_ok[None, :]
        x = tl.load(X + offs_x, mask=fresh_2d, other=0.0).to(tl.float32)
        xs = tl.load(XS + offs_xs, mask=source_2d, other=0.0).to(tl.float32)
        # (1 - w) x + w xs in fp32 (one multiply and one fma per element, no select),
        # rounded once: w == 0 gives x exactly (xs is 0, not read), w == 1 gives xs
        # exactly (x is 0), inf included; otherwise NaN/inf of either operand propagate.
        tile = _dot_operand((1.0 - w)[:, None] * x + w[:, None] * xs, DTYPE, INTERPRET)
    else:
        if MASK_N:
            if EVEN_D:
                tile = tl.load(X + offs_x, mask=n_ok[:, None], other=0.0)
            else:
                tile = tl.load(X + offs_x, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                tile = tl.load(X + offs_x)
            else:
                tile = tl.load(X + offs_x, mask=d_ok[None, :], other=0.0)
        if INTERPRET:
            tile = tile.to(tl.float32)
    return tile


@triton.jit
def _attend_block(acc, l_i, m_i, q, start_n, seqlen_kv,
                  K, V, KS, VS, W, offs_k, offs_v, offs_ks, offs_vs, offs_n, d_ok,
                  stride_ks, stride_vs, stride_kss, stride_vss, stride_locks, qk_scale,
                  DTYPE: tl.constexpr, HAS_LOCK: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                  INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One KV block of the online softmax: one QK dot, one PV dot."""
    blk = tl.cast(start_n, tl.int64)  # row offsets of a block can pass 2^31 elements
    n_ok = offs_n < seqlen_kv - start_n
    w = 0.0
    if HAS_LOCK:  # the block's weights, loaded once for K and V
        if MASK_N:
            w = tl.load(W + (start_n + offs_n) * stride_locks, mask=n_ok, other=0.0)
        else:
            w = tl.load(W + (start_n + offs_n) * stride_locks)
    k = _kv_tile(K + blk * stride_ks, KS + blk * stride_kss, offs_k, offs_ks, w, n_ok, d_ok,
                 DTYPE, HAS_LOCK, MASK_N, EVEN_D, INTERPRET)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MASK_N:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
    # Scores in base 2 (exp2 is the native instruction); the scale folds into the max.
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_ij = tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _kv_tile(V + blk * stride_vs, VS + blk * stride_vss, offs_v, offs_vs, w, n_ok, d_ok,
                 DTYPE, HAS_LOCK, MASK_N, EVEN_D, INTERPRET)
    acc = tl.dot(_dot_operand(p, DTYPE, INTERPRET), v, acc, input_precision=INPUT_PRECISION)
    l_i = l_i * alpha + l_ij
    return acc, l_i, m_ij


@triton.jit
def _kv_lock_attn_fwd(
    Q, K, V, KS, VS, LOCK, OUT, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_lockb, stride_locks,
    stride_ob, stride_os, stride_oh,
    num_heads, seqlen_q, seqlen_kv, group_size, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LOCK: tl.constexpr, STORE_LSE: tl.constexpr,
    INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, query head).  The last dim of every
    # tensor is contiguous (the launcher guarantees it).  Per-program and per-block bases
    # are int64 (one batch entry may hold >= 2^31 elements); offsets inside a tile are
    # int32 (the launcher bounds row strides).
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_hkv = off_h // group_size  # GQA: contiguous groups of query heads share a KV head
    row0 = pid_m * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q - row0
    if EVEN_D:
        q_mask = m_ok[:, None]
    else:
        q_mask = m_ok[:, None] & d_ok[None, :]

    # The query tile is loaded once for the whole KV sweep.
    q_base = Q + off_b * stride_qb + off_h * stride_qh + row0.to(tl.int64) * stride_qs
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    K = K + off_b * stride_kb + off_hkv * stride_kh
    V = V + off_b * stride_vb + off_hkv * stride_vh
    offs_k = offs_n[:, None] * stride_ks + offs_d[None, :]
    offs_v = offs_n[:, None] * stride_vs + offs_d[None, :]
    if HAS_LOCK:
        KS = KS + off_b * stride_ksb + off_hkv * stride_ksh
        VS = VS + off_b * stride_vsb + off_hkv * stride_vsh
        W = LOCK + off_b * stride_lockb
        offs_ks = offs_n[:, None] * stride_kss + offs_d[None, :]
        offs_vs = offs_n[:, None] * stride_vss + offs_d[None, :]
    else:  # never dereferenced
        W = LOCK
        offs_ks = offs_k
        offs_vs = offs_v

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full blocks without boundary masks, then the masked tail.  Every block, the tail
    # included, holds at least one real key: with finite inputs the running max is finite
    # from the first block on (exp2(-inf - m) = 0 for the padded keys, never -inf - -inf).
    n_full = seqlen_kv - seqlen_kv % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, start_n, seqlen_kv, K, V, KS, VS, W, offs_k, offs_v, offs_ks, offs_vs, offs_n, d_ok,
            stride_ks, stride_vs, stride_kss, stride_vss, stride_locks, qk_scale_log2,
            DTYPE, HAS_LOCK, False, EVEN_D, INTERPRET, INPUT_PRECISION)
    if n_full < seqlen_kv:
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, n_full, seqlen_kv, K, V, KS, VS, W, offs_k, offs_v, offs_ks, offs_vs, offs_n, d_ok,
            stride_ks, stride_vs, stride_kss, stride_vss, stride_locks, qk_scale_log2,
            DTYPE, HAS_LOCK, True, EVEN_D, INTERPRET, INPUT_PRECISION)

    acc = acc / l_i[:, None]
    o_base = OUT + off_b * stride_ob + off_h * stride_oh + row0.to(tl.int64) * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], cast_for_store(acc, OUT, INTERPRET),
             mask=q_mask)
    if STORE_LSE:  # natural log, as flash-attn
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + row0 + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------
# Autotuning (the table is in configs.py)
# --------------------------------------------------------------------------------------
def configs_for_head_dim(head_dim: int, arch: int | None = None, aligned: bool = True, dtype=torch.bfloat16):
    """Deprecated spelling of ``configs_for(head_dim, dtype, arch, aligned)`` (bf16 default)."""
    return configs_for(head_dim, dtype, arch, aligned)


_ROW_STRIDES = ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
                "stride_vb", "stride_vs", "stride_vh", "stride_ksb", "stride_kss", "stride_ksh",
                "stride_vsb", "stride_vss", "stride_vsh", "stride_ob", "stride_os", "stride_oh")


def _autotune_configs():
    unique = sorted({cfg for family in KERNEL_CONFIGS.values() for per_dtype in family.values()
                     for tier in per_dtype.values() for cfg in tier})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in unique]


def _prune_configs(configs, named_args, **kwargs):
    # Candidates depend on the dtype (fp32 tiles are smaller) and on alignment; Triton's
    # autotuner adds every tensor argument's dtype to the cache key, the strides are in
    # the key below.
    aligned = all(named_args[n] % 16 == 0 for n in _ROW_STRIDES)
    allowed = set(configs_for(kwargs["HEAD_DIM"], named_args["Q"].dtype, aligned=aligned))
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


_kv_lock_attn_fwd_tuned = triton.autotune(
    configs=_autotune_configs(),
    key=["HEAD_DIM", "HAS_LOCK", "STORE_LSE", "seqlen_q", "seqlen_kv", *_ROW_STRIDES],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_kv_lock_attn_fwd)


def kernel_constexprs(dtype: torch.dtype, head_dim: int, *, has_lock: bool, store_lse: bool,
                      interpret: bool = False) -> dict:
    """The non-tiling constexprs of ``_kv_lock_attn_fwd`` (also used by the GPU report)."""
    bd = block_d(head_dim)
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=bd,
        EVEN_D=bd == head_dim,
        HAS_LOCK=has_lock,
        STORE_LSE=store_lse,
        # Under the interpreter dot operands are upcast to fp32 (see _dot_operand).
        INTERPRET=interpret,
        # fp32 (interpreter only, see FP32_ON_GPU) gets IEEE dots; half types tensor cores.
        INPUT_PRECISION="ieee" if (dtype == torch.float32 or interpret) else "tf32",
    )


# --------------------------------------------------------------------------------------
# Launcher (bshd views in, bshd-strided output written in place)
# --------------------------------------------------------------------------------------
def check_offsets(q, k, v, k_src, v_src, lock, out) -> None:
    """Refuse launches whose int32 in-tile offsets could overflow.

    Program and block bases are int64 in the kernel; offsets inside one tile are
    ``row * row_stride + d`` in int32, with row < MAX_BLOCK.  Only a row (sequence)
    stride of about 2^24 elements or more can overflow them (bshd tensors have row
    stride H * D; bhsd views D)."""
    tensors = dict(q=q, k=k, v=v, k_src=k_src, v_src=v_src, out=out)
    for name, t in tensors.items():
        if t is None:
            continue
        reach = MAX_BLOCK * t.stride(1) + t.shape[3]
        if reach >= _INT32_LIMIT:
            raise ValueError(f"{name} has a sequence stride of {t.stride(1)} elements: offsets inside one "
                             f"{MAX_BLOCK}-row tile reach {reach} >= 2^31; make {name} contiguous in (B, S, H, D) "
                             "or (B, H, S, D) order")
    if lock is not None and lock.shape[1] * lock.stride(1) >= _INT32_LIMIT:
        raise ValueError(f"lock's token offsets reach {lock.shape[1] * lock.stride(1)} >= 2^31 elements; "
                         "pass a contiguous lock")


def _launch_triton(q, k, v, k_src, v_src, lock, out, lse, softmax_scale, config=None):
    """config: (BLOCK_M, BLOCK_N, num_warps, num_stages) to force; None autotunes on a GPU
    and uses INTERPRETER_CONFIG under the interpreter."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    has_lock = lock is not None
    interpret = triton_interpreting()
    check_offsets(q, k, v, k_src, v_src, lock, out)
    if not has_lock:  # placeholders, never dereferenced (HAS_LOCK is a constexpr)
        k_src, v_src, lock = k, v, q
        lock_strides = (0, 0)
    else:
        lock_strides = (lock.stride(0) if lock.shape[0] > 1 else 0, lock.stride(1))
    store_lse = lse is not None
    lse_arg = lse if store_lse else out
    args = [
        q, k, v, k_src, v_src, lock, out, lse_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_src.stride(0), k_src.stride(1), k_src.stride(2),
        v_src.stride(0), v_src.stride(1), v_src.stride(2),
        *lock_strides,
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Sq, Skv, Hq // Hkv, softmax_scale * 1.4426950408889634,
    ]
    meta = kernel_constexprs(q.dtype, D, has_lock=has_lock, store_lse=store_lse, interpret=interpret)
    if config is None and interpret:
        config = INTERPRETER_CONFIG
    if config is not None:
        bm, bn, warps, stages = config
        grid = (triton.cdiv(Sq, bm), B * Hq)
        _kv_lock_attn_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * Hq)  # noqa: E731
        _kv_lock_attn_fwd_tuned[grid](*args, **meta)


# --------------------------------------------------------------------------------------
# Routing: which implementation serves a call (shapes, dtype and device only)
# --------------------------------------------------------------------------------------
FP32_ON_GPU = (
    "the fused kernel runs fp16/bf16 on GPUs; fp32 CUDA calls with backend='auto' blend with lock_kv (fp32) "
    "and attend with SDPA: IEEE fp32 dots keep whole operand rows in registers and 3xTF32 dots keep both "
    "halves of q, so every fp32 tile spills at head dim >= 64 on sm_80 and sm_90 (tools/gpu_report, "
    "docs/attention.md)")


def fused_kernel_runs(device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None) -> bool:
    """Whether the fused Triton kernel has configs for these tensors: always under the
    interpreter; on CUDA, fp16/bf16 with a non-empty config list for the GPU and head dim."""
    if device.type != "cuda":
        return True
    if dtype == torch.float32:
        return False
    return head_dim is None or bool(configs_for(head_dim, dtype, _cuda_arch(device)))


def _dims(q, k) -> tuple:
    """(B, Sq, Skv, Hq, Hkv, D) of bshd q, k."""
    return (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])


def _source_shared(k, k_src) -> bool:
    """The source is one tensor for the whole batch (batch stride 0): a blend pass reads it once."""
    return k_src is None or k_src.shape[0] == 1 or k_src.stride(0) == 0 or k.shape[0] == 1


def select_backend(device: torch.device, dtype: torch.dtype, locked: bool, backend: str,
                   dims: Optional[tuple] = None, *, source_shared: bool = True,
                   return_lse: bool = False) -> tuple[str, Optional[str]]:
    """Which implementation serves a call: ``(impl, plain_backend)`` with impl one of
    "fused" (the Triton kernel), "blend_then_plain" (``lock_kv``, then plain attention
    with ``plain_backend``), "plain" (an unlocked call: plain attention with
    ``plain_backend``) or "torch" (the PyTorch path).

    dims: (B, Sq, Skv, Hq, Hkv, D) with B, Sq, Hq >= 1, needed for "auto" on CUDA, where
    ``routing.choose_path``'s cost model decides from shapes and dtype alone (never from
    lock values: no sync).  One exception to the model: with ``return_lse`` the plain
    route needs a backend that returns the log-sum-exp (FA3/FA2); SDPA does not, and its
    stand-in is the chunked fp32 PyTorch LSE path, so such calls take the fused kernel
    (which returns it) wherever it has a config.  "triton" forces the fused kernel
    (ValueError where it has no config: fp32 on GPUs, head dim > 128 on sm_80); CPU
    tensors run it only under the interpreter.  "torch" is the PyTorch path everywhere.
    """
    if not use_triton(device, backend):
        return "torch", None
    if device.type != "cuda":  # CPU tensors under TRITON_INTERPRET=1
        return "fused", None
    head_dim = dims[-1] if dims is not None else None
    if backend == "triton":
        if not fused_kernel_runs(device, dtype, head_dim):
            why = FP32_ON_GPU if dtype == torch.float32 else (
                f"no fused-kernel config for head dim {head_dim} on sm_{_cuda_arch(device)} "
                "(attention/configs.py)")
            raise ValueError(f"backend='triton' with {str(dtype)[6:]} CUDA tensors: {why}; "
                             "use backend='auto' or 'torch'")
        return "fused", None
    route = choose_path(*dims, dtype, device, source_shared=source_shared)
    fused_runs = fused_kernel_runs(device, dtype, head_dim)
    if return_lse and route.plain_backend == "sdpa" and fused_runs:
        return "fused", None
    if not locked:
        return "plain", route.plain_backend
    if route.path == "fused" and fused_runs:
        return "fused", None
    return "blend_then_plain", route.plain_backend


def in_batch_source_index(k: torch.Tensor, k_src: torch.Tensor) -> Optional[int]:
    """The batch entry of k that a batch-stride-0 k_src views (an in-batch source branch:
    ``k[i:i+1].expand(B, ...)``), or None.  Metadata only."""
    if k_src.stride(0) != 0 or k_src.stride()[1:] != k.stride()[1:] or k.stride(0) == 0:
        return None
    offset = k_src.data_ptr() - k.data_ptr()
    step = k.stride(0) * k.element_size()
    if offset < 0 or offset % step or offset // step >= k.shape[0]:
        return None
    return offset // step


def _blend_then_plain(q, k, v, k_src, v_src, lock, softmax_scale, return_lse, plain_backend):
    """Path (a): ``lock_kv`` writes K', V' in one memory-bound pass (an in-batch source
    entry is read once and not blended toward itself), then plain attention."""
    src = in_batch_source_index(k, k_src)
    source = dict(source_index=src) if src is not None and in_batch_source_index(v, v_src) == src else \
        dict(k_src=k_src, v_src=v_src)
    k_locked, v_locked = lock_kv(k, v, lock, **source, check_inputs=False)
    return plain_attention(q, k_locked, v_locked, softmax_scale=softmax_scale, return_lse=return_lse,
                           backend=plain_backend)


# --------------------------------------------------------------------------------------
# Custom op: opaque to torch.compile, with a fake implementation and a backward
# --------------------------------------------------------------------------------------
def _empty_out(q, layout):
    B, Sq, Hq, D = q.shape
    if layout == "bhsd":  # memory in (B, H, S, D) order, viewed as bshd for the kernel
        return torch.empty(B, Hq, Sq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=q.device)


@torch.library.custom_op("kvlock_kernels::kv_lock_attention", mutates_args=())
def _kv_lock_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_src: Optional[torch.Tensor], v_src: Optional[torch.Tensor],
                          lock: Optional[torch.Tensor], softmax_scale: float, layout: str,
                          return_lse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bshd views in.  Returns (out in `layout` memory order, viewed as given layout;
    lse (B, Hq, Sq) fp32, or an empty tensor when return_lse is False)."""
    B, Sq, Hq, _ = q.shape
    out = _empty_out(q, layout)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device) if return_lse else None
    if q.numel() == 0:  # B, Sq or Hq is 0: nothing to compute (and no shape for the cost model)
        out = out.transpose(1, 2) if layout == "bhsd" else out
        return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))
    impl, plain_backend = select_backend(q.device, q.dtype, lock is not None, backend, _dims(q, k),
                                         source_shared=_source_shared(k, k_src), return_lse=return_lse)
    if impl == "fused":
        with device_guard(q.device):
            _launch_triton(q, k, v, k_src, v_src, lock, out, lse, softmax_scale)
    else:
        if impl == "plain":
            res = plain_attention(q, k, v, softmax_scale=softmax_scale, return_lse=return_lse, backend=plain_backend)
        elif impl == "blend_then_plain":
            res = _blend_then_plain(q, k, v, k_src, v_src, lock, softmax_scale, return_lse, plain_backend)
        else:
            res = reference.kv_lock_attention_torch(q, k, v, k_src, v_src, lock,
                                                    softmax_scale=softmax_scale, return_lse=return_lse)
        if return_lse:
            res, res_lse = res
            lse.copy_(res_lse)
        out.copy_(res)
    out = out.transpose(1, 2) if layout == "bhsd" else out
    return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))


@_kv_lock_attention_op.register_fake
def _(q, k, v, k_src, v_src, lock, softmax_scale, layout, return_lse, backend):
    B, Sq, Hq, _ = q.shape
    out = _empty_out(q, layout)
    out = out.transpose(1, 2) if layout == "bhsd" else out
    lse = (q.new_empty(B, Hq, Sq, dtype=torch.float32) if return_lse
           else q.new_empty(0, dtype=torch.float32))
    return out, lse


def _recompute(q, k, v, k_src, v_src, lock, softmax_scale, layout, return_lse, backend):
    """The op's outputs from its differentiable PyTorch path (the backward recomputes it)."""
    res = reference.kv_lock_attention_torch(q, k, v, k_src, v_src, lock, softmax_scale=softmax_scale,
                                            return_lse=return_lse)
    out, lse = res if return_lse else (res, q.new_empty(0, dtype=torch.float32))
    return (out.transpose(1, 2) if layout == "bhsd" else out), lse


# Not fused: the backward re-runs the forward in PyTorch under autograd (the blend is
# linear, so gradients reach q, k, v, k_src, v_src and the lock), then its backward.
register_recompute_backward(_kv_lock_attention_op, _recompute)


def _attention_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """Tensor-core FLOPs of one call, for torch.utils.flop_counter.FlopCounterMode (the op
    is opaque to it): one QK and one PV matmul, 4 * B * Hq * Sq * Skv * D, as SDPA counts.
    The same with a lock: every backend blends K/V elementwise (not matmul work)."""
    B, Sq, Hq, D = q_shape
    return 4 * B * Hq * Sq * k_shape[1] * D


if torch.ops.kvlock_kernels.kv_lock_attention not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.kvlock_kernels.kv_lock_attention)(_attention_flops)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _check_lock(lock, batch, seqlen_kv, check_values):
    """lock -> fp32 (B|1, Skv), contiguous (``_validate.check_lock`` checks it)."""
    lock = check_lock(lock, batch, seqlen_kv, check_values=check_values)
    return lock.to(torch.float32).contiguous()


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare(q, k, v, k_src, v_src, lock, softmax_scale, layout, check_inputs):
    """Validate everything (before any launch) and normalise to bshd views.
    Returns (q, k, v, k_src, v_src, lock, scale) with k_src = v_src = lock = None for plain
    attention, the source expanded to batch B, lock fp32 (B|1, Skv)."""
    check_choice("layout", layout, ("bshd", "bhsd"))
    dims = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, layout=dims)
    if (k_src is None) != (v_src is None):
        raise ValueError("k_src and v_src must be given together (got only "
                         f"{'k_src' if v_src is None else 'v_src'})")
    for name, t in (("k_src", k_src), ("v_src", v_src)):
        if t is not None:
            check_tensor(name, t, ndim=4, layout=dims)
    for name, t in (("k", k), ("v", v), ("k_src", k_src), ("v_src", v_src)):
        check_same_dtype(name, t, "q", q)
    if lock is not None:  # kind and dtype first (TypeError), its shape below
        check_tensor("lock", lock, dtypes=LOCK_DTYPES, layout="(S,), (1, S) or (B, S)")
    check_same_device(q=q, k=k, v=v, k_src=k_src, v_src=v_src, lock=lock)

    to_bshd = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    q, k, v = to_bshd(q), to_bshd(k), to_bshd(v)
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {dims}={tuple(to_bshd(k).shape)}, got {tuple(to_bshd(v).shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k and v must have q's batch size {B}, got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k and v must have q's head_dim {D}, got {k.shape[3]}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be divisible by number of KV heads ({Hkv})")
    if Skv == 0:
        raise ValueError("k and v must have at least one key token (Skv=0)")
    scale = check_softmax_scale(softmax_scale, D)

    if k_src is not None:
        k_src, v_src = to_bshd(k_src), to_bshd(v_src)
        for name, t in (("k_src", k_src), ("v_src", v_src)):
            if tuple(t.shape[1:]) != (Skv, Hkv, D) or t.shape[0] not in (1, B):
                want = (B, Skv, Hkv, D) if layout == "bshd" else (B, Hkv, Skv, D)
                raise ValueError(f"{name} must have shape {want} (batch may be 1) {dims}, "
                                 f"got {tuple(to_bshd(t).shape)}")
        k_src, v_src = k_src.expand(B, -1, -1, -1), v_src.expand(B, -1, -1, -1)
    if lock is not None:
        lock = _check_lock(lock, B, Skv, check_inputs)
    if lock is None or k_src is None:
        k_src = v_src = lock = None
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if lock is not None:
        k_src, v_src = _last_dim_contiguous(k_src), _last_dim_contiguous(v_src)
    return q, k, v, k_src, v_src, lock, scale


def kv_lock_attention(q, k, v, k_src=None, v_src=None, lock=None, *, softmax_scale=None,
                      layout: str = "bshd", return_lse: bool = False, backend: str = "auto",
                      check_inputs: bool = True):
    """Attention with KV-Lock: keys/values pulled toward the source branch per key token.

    Arguments (layout "bshd"; with layout="bhsd" swap the S and H axes of every 4-D tensor):
        q: (B, Sq, Hq, D), fp16 / bf16 / fp32.
        k, v: (B, Skv, Hkv, D), same dtype and device as q.  Hq must be divisible by
            Hkv (GQA/MQA: query head h reads KV head h // (Hq // Hkv)).
        k_src, v_src: (B, Skv, Hkv, D) or (1, Skv, Hkv, D), q's dtype; the source
            keys/values.  A source branch shared by the CFG branches may be an expanded
            view with batch stride 0: it is read in place, never copied.
        lock: (B, Skv), (1, Skv) or (Skv,) tensor, float in [0, 1] or bool.  The locked
            keys follow the library's blending rule (``kvlock_kernels.reference.lock_kv``):
            ``k + lock * (k_src - k)`` in fp32, rounded once; weight 0 selects k and does
            not read k_src, weight 1 selects k_src and does not read k; same for v.
            lock=None or k_src=None gives plain attention.
        softmax_scale: a finite positive Python number; defaults to 1 / sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores, (B, Hq, Sq) fp32,
            natural log (as flash-attn).
        backend: "auto": on CUDA, ``routing.choose_path``'s cost model decides from
            shapes and dtype alone (no sync): blend once with ``lock_kv`` and attend with
            the fastest plain attention available (FA3 > FA2 > SDPA, as modelled), or the
            fused single-pass kernel where the model says it is faster (short query
            blocks, memory-bound); an unlocked call goes to the fastest plain attention.
            With return_lse and no FA2/FA3 (SDPA returns no LSE) the fused kernel serves
            the call wherever it has a config.  An in-batch source (``k_src`` a
            batch-stride-0 view of one entry of k) is blended as ``lock_kv``'s
            ``source_index``: that entry is read once and not locked toward itself.
            On CPU the PyTorch path, or the fused kernel under TRITON_INTERPRET=1.
            "triton" forces the fused kernel (ValueError where it has no config: fp32 on
            GPUs, head dim > 128 on sm_80); "torch" forces the PyTorch path.
        check_inputs: check lock values lie in [0, 1].  This reads the lock on the host
            (one sync); it is skipped automatically under torch.compile and CUDA-graph
            capture, and can be switched off in a hot loop whose lock is built in range.
    Returns:
        out: (B, Sq, Hq, D) in q's dtype (bhsd memory order for layout="bhsd"), and
        lse when return_lse is True.
    Autograd: differentiable in q, k, v, k_src, v_src and a floating lock.  The backward
    is not fused: it recomputes the forward with the PyTorch path under autograd.
    Raises TypeError for a wrong kind of argument or dtype (including dtype mismatches),
    ValueError for wrong shapes, devices, values, or launches whose offsets would
    overflow (see ``check_offsets``).
    """
    check_bool("return_lse", return_lse)
    check_bool("check_inputs", check_inputs)
    check_backend(backend)
    q, k, v, k_src, v_src, lock, scale = _prepare(q, k, v, k_src, v_src, lock, softmax_scale, layout,
                                                  check_inputs)
    B, Sq, Hq, _ = q.shape
    # An impossible backend ("triton" without a config or off CUDA without the
    # interpreter) and overflowing fused-kernel strides raise here, before anything runs.
    # "auto" on CUDA is routed inside the op at run time, and so is every call under
    # torch.compile: the cost model and the device queries are host code that Dynamo
    # cannot trace (and need not: the op is opaque to it).  The op raises the same errors,
    # and the fused launch checks its strides, before launching.
    if not torch.compiler.is_compiling() and (backend != "auto" or q.device.type != "cuda"):
        impl, _ = select_backend(q.device, q.dtype, lock is not None, backend, _dims(q, k))
        if impl == "fused" and q.numel() > 0:
            check_offsets(q, k, v, k_src, v_src, lock, q)
    if Sq == 0:
        out = _empty_out(q, layout)
        out = out.transpose(1, 2) if layout == "bhsd" else out
        lse = q.new_empty(B, Hq, 0, dtype=torch.float32)
        return (out, lse) if return_lse else out
    out, lse = _kv_lock_attention_op(q, k, v, k_src, v_src, lock, scale, layout, return_lse, backend)
    return (out, lse) if return_lse else out


def fused_attention_with_config(q, k, v, k_src, v_src, lock, config, *, softmax_scale=None, return_lse=False):
    """The fused kernel with a forced ``config = (BLOCK_M, BLOCK_N, num_warps, num_stages)``
    (tests and the GPU tier sweep the config table with it; no autotuning).

    Tensors as ``kv_lock_attention`` with layout "bshd" (k_src/v_src/lock may be None:
    plain attention); fp16/bf16 CUDA tensors, or CPU tensors (fp32 too) under
    TRITON_INTERPRET=1.  Not differentiable.  Returns out (B, Sq, Hq, D), and lse
    (B, Hq, Sq) fp32 if asked.
    """
    if (not isinstance(config, (tuple, list)) or len(config) != 4
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in config)):
        raise TypeError(f"config must be a tuple of 4 ints (BLOCK_M, BLOCK_N, num_warps, num_stages), got {config!r}")
    check_bool("return_lse", return_lse)
    bm, bn, warps, stages = config
    if (bm not in (16, 32, 64, 128) or bn not in (16, 32, 64, 128) or warps not in (1, 2, 4, 8, 16)
            or stages < 1):
        raise ValueError(f"config must have BLOCK_M, BLOCK_N in (16, 32, 64, 128), num_warps a power of 2 <= 16 "
                         f"and num_stages >= 1, got {tuple(config)}")
    q, k, v, k_src, v_src, lock, scale = _prepare(q, k, v, k_src, v_src, lock, softmax_scale, "bshd", True)
    select_backend(q.device, q.dtype, lock is not None, "triton", _dims(q, k))  # raises where the kernel has no config
    B, Sq, Hq, _ = q.shape
    out = _empty_out(q, "bshd")
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device) if return_lse else None
    if Sq > 0:
        with torch.no_grad(), device_guard(q.device):
            _launch_triton(q, k, v, k_src, v_src, lock, out, lse, scale, config=tuple(config))
    return (out, lse) if return_lse else out



# --------------------------------------------------------------------------------------
# GPU report jobs (python -m kvlock_kernels.tools.gpu_report; see its job protocol)
# --------------------------------------------------------------------------------------
GPU_REPORT_NOTES = [f"kv_lock_attention fp32: no GPU configs: {FP32_ON_GPU}"]


def gpu_report_jobs(arch: int, all_configs: bool) -> list:
    """Both variants (HAS_LOCK False / True) of every config: with ``all_configs`` fp16,
    bf16 and fp32 (which has no GPU configs, see GPU_REPORT_NOTES) at head dims 64, 72,
    80, 96, 128, 256 and every table entry; else bf16 at head dims 64 and 128, the first
    (preferred) entry of each."""
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    head_dims = (64, 72, 80, 96, 128, 256) if all_configs else (64, 128)
    jobs = []
    for dt in dtypes:
        for d in head_dims:
            configs = configs_for(d, dt, arch, aligned=d % 16 == 0)
            for cfg in (configs if all_configs else configs[:1]):
                for builder in ("_gpu_report_plain", "_gpu_report_locked"):
                    jobs.append(("kv_lock_attention", __name__, builder, arch, dt, d, tuple(cfg)))
    return jobs


def _gpu_report_spec(dt_name, head_dim, config, has_lock):
    bm, bn, warps, stages = config
    const = kernel_constexprs(DTYPES_BY_NAME[dt_name], head_dim, has_lock=has_lock, store_lse=True)
    const.update(BLOCK_M=bm, BLOCK_N=bn)
    ptr = "*" + dt_name
    types = {n: ptr for n in ("Q", "K", "V", "KS", "VS", "OUT")}
    types.update(LOCK="*fp32", LSE="*fp32", qk_scale_log2="fp32")
    # A contiguous (B, S, H, D) launch: every stride is a multiple of 16 elements except
    # the head strides (= D) when D is not.
    divisible = [n for n in _ROW_STRIDES + ("stride_lockb",) if not n.endswith("h") or head_dim % 16 == 0]
    return dict(fn=_kv_lock_attn_fwd, const=const, types=types, warps=warps, stages=stages,
                pointers=("Q", "K", "V", "KS", "VS", "LOCK", "OUT", "LSE"), unit_strides=("stride_locks",),
                divisible=divisible, config=f"M{bm}/N{bn}/w{warps}/s{stages}",
                block_flops=4 * bm * bn * const["BLOCK_D"],  # one QK and one PV dot per KV block
                variant="locked" if has_lock else "plain",
                classes=("every locked block class (w all 0, all 1, constant, mixed) runs this one code path"
                         if has_lock else "no lock (HAS_LOCK=False)"))


def _gpu_report_plain(arch, dt_name, head_dim, config):
    return _gpu_report_spec(dt_name, head_dim, config, has_lock=False)


def _gpu_report_locked(arch, dt_name, head_dim, config):
    return _gpu_report_spec(dt_name, head_dim, config, has_lock=True)
