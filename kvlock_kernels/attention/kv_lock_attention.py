"""Fused KV-lock attention: blend background keys/values toward the source while
they are loaded, inside a flash-style online-softmax attention kernel.

    w_j = lock[b, j]                                # per key token, in [0, 1]
    K_j = k_j + w_j * (k_src_j - k_j)               # same for V
    out = softmax(q K^T * softmax_scale) V

The blended K/V never exist in global memory.  Per KV block the kernel loads the
lock weights first; when they are all 0 the source tile is not read, when they are
all 1 the fresh tile is not read (foreground masks are mostly uniform over a block
of 64-128 tokens, so most blocks read one tile, not two).  The skip is a
block-uniform load predicate rather than a branch, so the software pipeliner sees
one straight-line loop body, and the blend ``k + w (k_src - k)`` reproduces k or
k_src exactly when w is 0 or 1.

Layout of this file (Liger-Kernel style): the Triton kernel, its autotune configs,
the launcher, the torch custom op (with fake implementation, for torch.compile),
and the public ``kv_lock_attention``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._triton_helpers import cast_for_store
from .._utils import device_guard, host_checks_allowed, triton_interpreting, use_triton
from .._validate import check_same_device, check_tensor

__all__ = ["kv_lock_attention", "KERNEL_CONFIGS", "configs_for_head_dim"]

MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LOCK: tl.constexpr, STORE_LSE: tl.constexpr,
    INTERPRET: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, query head); the last dim of
    # every tensor is contiguous (the launcher guarantees it).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = pid_bh % num_heads
    off_hkv = off_h // group_size  # GQA: contiguous groups of query heads share a KV head

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q

    # Stage 1: the query tile stays in registers for the whole KV sweep.
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)

    # Row-independent base pointers; tiles are addressed as base + row * stride + d.
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    if HAS_LOCK:
        ks_base = KS + off_b * stride_ksb + off_hkv * stride_ksh
        vs_base = VS + off_b * stride_vsb + off_hkv * stride_vsh
        lock_base = LOCK + off_b * stride_lockb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen_kv, BLOCK_N):
        rows = start_n + offs_n
        n_ok = rows < seqlen_kv
        kv_ok = n_ok[:, None] & d_ok[None, :]

        # Stage 2: classify the block by its lock weights.  Since w is per key row,
        #   q . (k + w (k_src - k)) = s_new + w (s_src - s_new)
        #   P (v + w (v_src - v))   = (P (1 - w)) v + (P w) v_src,
        # so the blend moves onto the tensor cores: a uniform block (w all 0 or all 1,
        # the common case) is one plain flash-attention step on the tensor it needs,
        # and only a mixed block reads both tiles and issues two dots each.
        k_blk = k_base
        v_blk = v_base
        stride_kn = stride_ks
        stride_vn = stride_vs
        mixed = False
        if HAS_LOCK:
            w = tl.load(lock_base + rows * stride_locks, mask=n_ok, other=0.0)
            w_max = tl.max(w, axis=0)
            w_min = tl.min(tl.where(n_ok, w, 1.0), axis=0)
            mixed = (w_max > 0.0) & (w_min < 1.0)
            if w_min >= 1.0:  # fully locked block: read the source only
                k_blk = ks_base
                v_blk = vs_base
                stride_kn = stride_kss
                stride_vn = stride_vss

        # Stage 3: scores in base 2 (exp2 is the native instruction), padded keys -inf.
        k = tl.load(k_blk + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if HAS_LOCK:
            if mixed:
                k_src = tl.load(ks_base + rows[:, None] * stride_kss + offs_d[None, :], mask=kv_ok, other=0.0)
                if INTERPRET:
                    k_src = k_src.to(tl.float32)
                qk_src = tl.dot(q, tl.trans(k_src), input_precision=INPUT_PRECISION)
                qk = qk + w[None, :] * (qk_src - qk)
        qk = qk * qk_scale_log2
        qk = tl.where(n_ok[None, :], qk, float("-inf"))

        # Stage 4: online softmax update, then accumulate P @ V in fp32.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        correction = tl.math.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None]
        v = tl.load(v_blk + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if INTERPRET:
            v = v.to(tl.float32)
        if HAS_LOCK:
            if mixed:
                v_src = tl.load(vs_base + rows[:, None] * stride_vss + offs_d[None, :], mask=kv_ok, other=0.0)
                if INTERPRET:
                    v_src = v_src.to(tl.float32)
                acc = tl.dot((p * (1.0 - w)[None, :]).to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
                acc = tl.dot((p * w[None, :]).to(v.dtype), v_src, acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    # Stage 5: normalise and write; lse back to natural log.
    acc = acc / l_i[:, None]
    o_ptrs = OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, cast_for_store(acc, OUT, INTERPRET), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU family and head-dim tier.  Every
# entry compiles without register spills (``python -m kvlock_kernels.inspect --all``).
# A mixed block keeps two score tiles and two P tiles live at once, which rules out
# FlashAttention-2's 128x128 tile at head dim 128 and most tiles at head dim 256.
KERNEL_CONFIGS = {
    "sm90": {
        "d64": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        "d128": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        "d256": [(64, 16, 4, 2), (32, 32, 4, 2)],
        # Row strides not multiples of 16 elements (head dim 72 contiguous, say): loads
        # cannot be vectorised or made asynchronous, so tiles must stay small.
        "unaligned": [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
    },
    "sm80": {
        "d64": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        "d128": [(64, 64, 4, 2), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
        "d256": [(64, 64, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2)],
        "unaligned": [(64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
    },
}
# One config under the interpreter: autotuning there would only multiply test time.
INTERPRETER_CONFIG = (64, 64, 4, 1)


def head_dim_tier(head_dim: int, aligned: bool = True) -> str:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d > 128:
        return "d256"
    if not aligned:
        return "unaligned"
    return "d64" if block_d <= 64 else "d128"


def configs_for_head_dim(head_dim: int, arch: int | None = None, aligned: bool = True):
    """Autotune candidates for a head dim on an sm_<arch> GPU (default: the current one).
    ``aligned``: every row stride of the launch is a multiple of 16 elements."""
    if arch is None:
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        arch = 10 * major + minor
    return KERNEL_CONFIGS["sm90" if arch >= 90 else "sm80"][head_dim_tier(head_dim, aligned)]


_ROW_STRIDES = ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
                "stride_vb", "stride_vs", "stride_vh", "stride_ksb", "stride_kss", "stride_ksh",
                "stride_vsb", "stride_vss", "stride_vsh", "stride_ob", "stride_os", "stride_oh")


def _autotune_configs():
    unique = sorted({cfg for family in KERNEL_CONFIGS.values() for tier in family.values() for cfg in tier})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in unique]


def _prune_configs(configs, named_args, **kwargs):
    aligned = all(named_args[n] % 16 == 0 for n in _ROW_STRIDES)
    allowed = set(configs_for_head_dim(kwargs["HEAD_DIM"], aligned=aligned))
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


_kv_lock_attn_fwd_tuned = triton.autotune(
    configs=_autotune_configs(),
    # The strides decide alignment, hence the candidate set: all of them are in the key.
    key=["HEAD_DIM", "HAS_LOCK", "STORE_LSE", "seqlen_q", "seqlen_kv", *_ROW_STRIDES],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_kv_lock_attn_fwd)


def kernel_constexprs(dtype: torch.dtype, head_dim: int, *, has_lock: bool, store_lse: bool,
                      interpret: bool = False) -> dict:
    """The non-tiling constexprs of ``_kv_lock_attn_fwd`` (also used by ``inspect``)."""
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_LOCK=has_lock,
        STORE_LSE=store_lse,
        # Under the interpreter bf16 tl.dot is wrong (triton#11584) and fp32 -> bf16
        # casts truncate: the kernel then upcasts dot operands and rounds bf16 stores
        # itself.  GPU builds keep bf16 tensor-core dots and hardware rounding.
        INTERPRET=interpret,
        # fp32 inputs get true fp32 dots; half types use tensor cores.
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


# --------------------------------------------------------------------------------------
# Launcher (bshd views in, bshd-strided output written in place)
# --------------------------------------------------------------------------------------
def _launch_triton(q, k, v, k_src, v_src, lock, out, lse, softmax_scale):
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    has_lock = lock is not None
    interpret = triton_interpreting()
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
    if interpret:  # one fixed config: autotuning under the interpreter only costs time
        bm, bn, warps, stages = INTERPRETER_CONFIG
        grid = (triton.cdiv(Sq, bm), B * Hq)
        _kv_lock_attn_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:
        grid = lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * Hq)  # noqa: E731
        _kv_lock_attn_fwd_tuned[grid](*args, **meta)


# --------------------------------------------------------------------------------------
# Routing: flash-attn for plain attention on CUDA when installed
# --------------------------------------------------------------------------------------
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a broken CUDA build
        return None
    return flash_attn_func


def select_backend(device: torch.device, dtype: torch.dtype, locked: bool, backend: str) -> str:
    """Which implementation runs: "flash" (flash_attn_func), "triton" or "torch"."""
    if use_triton(device, backend):
        if (backend == "auto" and device.type == "cuda" and not locked
                and dtype in (torch.float16, torch.bfloat16) and _flash_attn_func() is not None):
            return "flash"
        return "triton"
    return "torch"


def _run_flash(q, k, v, softmax_scale, return_lse):
    fn = _flash_attn_func()
    if return_lse:
        out, lse, _ = fn(q, k, v, softmax_scale=softmax_scale, return_attn_probs=True)
        return out, lse
    return fn(q, k, v, softmax_scale=softmax_scale), None


# --------------------------------------------------------------------------------------
# Custom op: opaque to torch.compile, with a fake implementation for tracing
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
    impl = select_backend(q.device, q.dtype, lock is not None, backend)
    if impl == "triton":
        with device_guard(q.device):
            _launch_triton(q, k, v, k_src, v_src, lock, out, lse, softmax_scale)
    elif impl == "flash":
        res, res_lse = _run_flash(q, k, v, softmax_scale, return_lse)
        out.copy_(res)
        if return_lse:
            lse.copy_(res_lse)
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


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _check_lock(lock, batch, seqlen_kv, check_values):
    check_tensor("lock", lock, dtypes=(torch.float16, torch.bfloat16, torch.float32,
                                       torch.float64, torch.bool))
    given = tuple(lock.shape)
    if lock.dim() == 1:
        lock = lock[None]
    if lock.dim() != 2 or lock.shape[1] != seqlen_kv or lock.shape[0] not in (1, batch):
        raise ValueError(f"lock must have shape (B, Skv), (1, Skv) or (Skv,) with B={batch}, "
                         f"Skv={seqlen_kv}; got {given}")
    if lock.dtype == torch.bool:
        return lock.to(torch.float32)
    if check_values and host_checks_allowed():
        bad = ~((lock >= 0) & (lock <= 1))  # NaN fails both comparisons
        if bool(bad.any()):
            raise ValueError("lock values must lie in [0, 1] (no NaN); got min "
                             f"{lock.min().item():g}, max {lock.max().item():g}, "
                             f"{int(torch.isnan(lock).sum())} NaN")
    return lock.to(torch.float32)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def kv_lock_attention(q, k, v, k_src=None, v_src=None, lock=None, *, softmax_scale=None,
                      layout: str = "bshd", return_lse: bool = False, backend: str = "auto",
                      check_inputs: bool = True):
    """Attention with KV-Lock: keys/values pulled toward the source branch per key token.

    Arguments (layout "bshd"; with layout="bhsd" swap the S and H axes of every 4-D tensor):
        q: (B, Sq, Hq, D), fp16 / bf16 / fp32.
        k, v: (B, Skv, Hkv, D), same dtype and device as q.  Hq must be divisible by
            Hkv (GQA/MQA: query head h reads KV head h // (Hq // Hkv)).
        k_src, v_src: (B, Skv, Hkv, D) or (1, Skv, Hkv, D); the source keys/values.  A
            source branch shared by the CFG branches may be an expanded view with batch
            stride 0: it is read in place, never copied.
        lock: (B, Skv), (1, Skv) or (Skv,), float in [0, 1] or bool.  The locked keys are
            ``k + lock * (k_src - k)``, same for v.  lock=None or k_src=None gives plain
            attention.
        softmax_scale: defaults to 1 / sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores, (B, Hq, Sq) fp32,
            natural log (as flash-attn).
        backend: "auto" (Triton on CUDA; on CPU the PyTorch path, or the Triton kernel
            under TRITON_INTERPRET=1; flash-attn for unlocked fp16/bf16 CUDA calls when
            installed), "triton" or "torch".
        check_inputs: check lock values lie in [0, 1].  This reads the lock on the host
            (one sync); it is skipped automatically under torch.compile and CUDA-graph
            capture, and can be switched off in a hot loop whose lock is built in range.
    Returns:
        out: (B, Sq, Hq, D) in q's dtype (bhsd memory order for layout="bhsd"), and
        lse when return_lse is True.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if (k_src is None) != (v_src is None):
        raise ValueError("k_src and v_src must be given together (got only "
                         f"{'k_src' if v_src is None else 'v_src'})")
    for name, t in (("k_src", k_src), ("v_src", v_src)):
        if t is not None:
            check_tensor(name, t, ndim=4)
    check_same_device(q=q, k=k, v=v, k_src=k_src, v_src=v_src, lock=lock)
    for name, t in (("k", k), ("v", v), ("k_src", k_src), ("v_src", v_src)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")

    to_bshd = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    q, k, v = to_bshd(q), to_bshd(k), to_bshd(v)
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    dims = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
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
    locked = lock is not None and k_src is not None
    if not locked:
        k_src = v_src = lock = None

    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if Sq == 0:
        out = _empty_out(q, layout)
        out = out.transpose(1, 2) if layout == "bhsd" else out
        lse = q.new_empty(B, Hq, 0, dtype=torch.float32)
        return (out, lse) if return_lse else out

    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if locked:
        k_src, v_src = _last_dim_contiguous(k_src), _last_dim_contiguous(v_src)
    use_triton(q.device, backend)  # raise on an impossible backend before anything runs
    out, lse = _kv_lock_attention_op(q, k, v, k_src, v_src, lock, scale, layout, return_lse, backend)
    return (out, lse) if return_lse else out
