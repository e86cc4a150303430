"""The fused q/k/v epilogue of a video DiT's self-attention, with KV-Lock's blend in it.

    q, k, v (B, S, heads*D)  projection outputs
    q_out = rope(norm_q(q)),  K = rope(norm_k(k)),  V = v                (B, S, heads, D)
    K' = K + w (K_src - K),   V' = V + w (V_src - V)        the one blending rule

The stock processors already run memory-bound passes over q and k after the projections
(QK norm, RoPE).  This op does them and the blend in one kernel: q, k, v are read once
and attention-ready q, K', V' are written once, so KV-Lock costs the stock layer nothing
but the source reads (docs/blend.md has the bytes model).  The attention that follows is
plain attention, served by whatever backend diffusers dispatches to.

Norm kinds (weights per model family): "none"; "rms_across_heads" (Wan: RMSNorm over the
whole heads*D row); "rms_per_head" (HunyuanVideo: diffusers' RMSNorm(D)); "layer_per_head"
(CogVideoX: LayerNorm(D)).  RoPE kinds: "none"; "interleaved" (pairs (2i, 2i+1), what
diffusers' Wan, CogVideoX and HunyuanVideo use); "half" (pairs (i, i + D/2)).  RoPE covers
tokens ``rope_start .. rope_start + S_rope`` (CogVideoX: video after the text; HunyuanVideo:
video first); other tokens are only normed.

The kernel: one program owns a block of tokens (of one head, or of every head for the
across-heads RMSNorm) for ALL batch entries.  In branch mode (``source_index``) it first
computes the source entry's normed, rotated K and V tile (and writes that entry's
outputs), then blends it into every other entry from registers: no second launch, no
second read.  Across-heads RMSNorm needs the whole heads*D row (5120 values for
Wan-14B): a first pass over head chunks sums squares per token and entry (stored as
1/rms in a small scratch), the second normalises, rotates, blends and stores, head by
head.  All math in fp32, one rounding per output.

The PyTorch path (``reference.qkv_epilogue``) runs the stock processors' own sequence of
torch ops, so with no lock (or weight 0) it equals them bit for bit on CPU.

Layout of this file: the Triton kernel, the launcher, the custom ops (functional
``kvlock_kernels::qkv_epilogue`` with fake and recompute backward; ``qkv_epilogue_out``
writing into given views), the public ``qkv_epilogue``, the GPU report jobs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._autograd import register_recompute_backward
from .._triton_helpers import cast_for_store
from .._utils import device_guard, triton_interpreting
from .._validate import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from ..reference.epilogue import NORMS, ROPES, rope_table
from .configs import DTYPES_BY_NAME, block_d, head_dim_tier
from .lock_kv import (
    DTYPES,
    _batch_stride,
    _blend_rows,
    _i64,
    _runs_triton,
    check_kernel_backend,
    check_source,
    lock_weights_2d,
    needs_grad,
    row_strides,
    stride_align,
)

__all__ = ["qkv_epilogue", "NORMS", "ROPES", "LAUNCH_CONFIGS", "launch_config", "gpu_report_jobs"]

NORM_CODES = {"none": 0, "rms_across_heads": 1, "rms_per_head": 2, "layer_per_head": 3}
ROPE_CODES = {"none": 0, "interleaved": 1, "half": 2}
# 0: no lock; 1: in-batch source entry; 2: one source for the batch (k_src batch 1 or
# stride 0); 3: a source per entry.
LOCK_NONE, LOCK_BRANCH, LOCK_SHARED, LOCK_PER_ENTRY = 0, 1, 2, 3

# (BLOCK_S tokens per program, num_warps) by dtype and head-dim tier: 1024 elements per
# head tile.  In branch mode a program keeps the source K/V tiles and the cos/sin tiles
# live across the batch loop beside the entry's q, k, v: 96-168 registers and no spills on
# sm_80 / sm_90 (`gpu_report --all`); fp32 at d64 to d128 takes 8 warps (with 4, the
# across-heads cache variant at d64 and CogVideoX's branch variant at d72-d96 spilled 8
# bytes on sm_90).  2048-element tiles need 230-255 registers.
LAUNCH_CONFIGS = {
    "half": {"d64": (16, 4), "d128": (8, 4), "d256": (4, 4)},
    "fp32": {"d64": (16, 8), "d128": (8, 8), "d256": (4, 4)},
}
INTERPRETER_BLOCK_S = 16


def launch_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(BLOCK_S, num_warps) of the GPU launch for a head dim and dtype."""
    return LAUNCH_CONFIGS["fp32" if dtype == torch.float32 else "half"][head_dim_tier(head_dim)]


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
# A head's D values are handled as two half tiles (a, b) of BLOCK_D // 2 columns: the
# RoPE pairs.  "interleaved" (and no RoPE): a = even columns, b = odd columns, split in
# registers from one contiguous load (tl.reshape + tl.split; stores join them back);
# "half": a = columns [0, D/2), b = [D/2, D), two contiguous loads.  Either way every
# load and store is a contiguous vector access and the rotation needs no shuffle.
@triton.jit
def _load_pair(P, row, row_ok, offs_d, offs_j, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
               BLOCK_D: tl.constexpr, ROPE: tl.constexpr, other):
    """(a, b) fp32 half tiles of rows ``P + row`` (row: (BLOCK_S, 1) int64 offsets)."""
    if ROPE == 2:
        HALF: tl.constexpr = HEAD_DIM // 2
        ok = row_ok[:, None] & (offs_j < HALF)[None, :]
        a = tl.load(P + row + offs_j[None, :], mask=ok, other=other).to(tl.float32)
        b = tl.load(P + row + HALF + offs_j[None, :], mask=ok, other=other).to(tl.float32)
    else:
        ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        x = tl.load(P + row + offs_d[None, :], mask=ok, other=other).to(tl.float32)
        a, b = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_D // 2, 2)))
    return a, b


@triton.jit
def _store_pair(P, row, row_ok, a, b, offs_d, offs_j, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_D: tl.constexpr, ROPE: tl.constexpr, INTERPRET: tl.constexpr):
    if ROPE == 2:
        HALF: tl.constexpr = HEAD_DIM // 2
        ok = row_ok[:, None] & (offs_j < HALF)[None, :]
        tl.store(P + row + offs_j[None, :], cast_for_store(a, P, INTERPRET), mask=ok)
        tl.store(P + row + HALF + offs_j[None, :], cast_for_store(b, P, INTERPRET), mask=ok)
    else:
        ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        x = tl.reshape(tl.join(a, b), (BLOCK_S, BLOCK_D))
        tl.store(P + row + offs_d[None, :], cast_for_store(x, P, INTERPRET), mask=ok)


@triton.jit
def _load_vec_pair(P, offs_d, offs_j, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
                   ENABLED: tl.constexpr):
    """(a, b) halves of a (D,) vector (norm weight or bias), fp32; zeros when absent."""
    if ENABLED:
        if ROPE == 2:
            HALF: tl.constexpr = HEAD_DIM // 2
            ok = offs_j < HALF
            a = tl.load(P + offs_j, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(P + HALF + offs_j, mask=ok, other=0.0).to(tl.float32)
        else:
            x = tl.load(P + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
            a, b = tl.split(tl.reshape(x, (BLOCK_D // 2, 2)))
    else:
        a = tl.zeros([BLOCK_D // 2], dtype=tl.float32)
        b = tl.zeros([BLOCK_D // 2], dtype=tl.float32)
    return a, b


@triton.jit
def _norm_rope(a, b, ok_a, ok_b, rstd, wa, wb, ba, bb, cos_a, cos_b, sin_a, sin_b, in_rope, eps,
               HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Norm and RoPE of one head's (a, b) half tiles, fp32."""
    if NORM == 1:  # across heads: 1/rms from the first pass
        r = rstd
    elif NORM == 2:
        r = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)
    elif NORM == 3:
        mean = (tl.sum(a, axis=1) + tl.sum(b, axis=1)) / HEAD_DIM
        a = tl.where(ok_a[None, :], a - mean[:, None], 0.0)
        b = tl.where(ok_b[None, :], b - mean[:, None], 0.0)
        r = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)
    if NORM != 0:
        a = a * r[:, None]
        b = b * r[:, None]
        if HAS_W:
            a = a * wa[None, :]
            b = b * wb[None, :]
        if HAS_B:
            a = a + ba[None, :]
            b = b + bb[None, :]
    if ROPE != 0:
        ra = a * cos_a - b * sin_a
        rb = b * cos_b + a * sin_b
        a = tl.where(in_rope[:, None], ra, a)
        b = tl.where(in_rope[:, None], rb, b)
    return a, b


@triton.jit
def _entry_rstd(RSTD, b64, batch, seqlen, rows64, row_ok, BLOCK_S: tl.constexpr, NORM: tl.constexpr):
    """1/rms of entry b's q and k rows for the across-heads norm (pass 1's scratch); the
    per-head norms compute their own in ``_norm_rope`` and get zeros."""
    rq = tl.zeros([BLOCK_S], dtype=tl.float32)
    rk = rq
    if NORM == 1:
        rq = tl.load(RSTD + b64 * seqlen + rows64, mask=row_ok, other=0.0)
        rk = tl.load(RSTD + (batch + b64) * seqlen + rows64, mask=row_ok, other=0.0)
    return rq, rk


@triton.jit
def _entry_lock(LOCK, b, stride_lb, lock_off, row_ok, src_index, BLOCK_S: tl.constexpr, LOCK_MODE: tl.constexpr):
    """Lock weights of batch entry b for the block's tokens (0 for the source entry)."""
    w = tl.zeros([BLOCK_S], dtype=tl.float32)
    if LOCK_MODE != 0:
        if b != src_index:
            w = tl.load(LOCK + _i64(b) * stride_lb + lock_off, mask=row_ok, other=0.0)
    return w


@triton.jit
def _qkv_epilogue_kernel(
    Q, K, V, QW, QB, KW, KB, COS, SIN, LOCK, KS, VS, QO, KO, VO, RSTD,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_lb, stride_ls,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    stride_vob, stride_vos, stride_voh,
    stride_cs,
    batch, seqlen, num_heads, heads_per_prog, rope_start, rope_len, src_index, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    NORM: tl.constexpr, ROPE: tl.constexpr, LOCK_MODE: tl.constexpr,
    HAS_QW: tl.constexpr, HAS_QB: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
    ALIGN: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One program: BLOCK_S tokens of `heads_per_prog` heads, for every batch entry.
    # Offsets are 64-bit (a fused qkv chunk of Wan-14B at batch 3 spans > 2**31 elements)
    # and kept per row: full-tile 64-bit offsets would cost two registers per element.
    # Tensor strides come divided by ALIGN (their common power-of-two factor, <= 16) and
    # are multiplied back here so that loads and stores vectorise (see lock_kv).
    stride_qb = tl.cast(stride_qb, tl.int64) * ALIGN
    stride_qs = tl.cast(stride_qs, tl.int64) * ALIGN
    stride_qh = tl.cast(stride_qh, tl.int64) * ALIGN
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
    stride_qob = tl.cast(stride_qob, tl.int64) * ALIGN
    stride_qos = tl.cast(stride_qos, tl.int64) * ALIGN
    stride_qoh = tl.cast(stride_qoh, tl.int64) * ALIGN
    stride_kob = tl.cast(stride_kob, tl.int64) * ALIGN
    stride_kos = tl.cast(stride_kos, tl.int64) * ALIGN
    stride_koh = tl.cast(stride_koh, tl.int64) * ALIGN
    stride_vob = tl.cast(stride_vob, tl.int64) * ALIGN
    stride_vos = tl.cast(stride_vos, tl.int64) * ALIGN
    stride_voh = tl.cast(stride_voh, tl.int64) * ALIGN
    stride_cs = tl.cast(stride_cs, tl.int64) * ALIGN
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < seqlen
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_D // 2)
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    lock_off = rows64 * stride_ls
    # Columns of the a / b halves that exist (padding of head dims such as 72).
    if ROPE == 2:
        ok_a = offs_j < HEAD_DIM // 2
        ok_b = ok_a
    else:
        ok_a = 2 * offs_j < HEAD_DIM
        ok_b = 2 * offs_j + 1 < HEAD_DIM

    # RoPE tables of the block's tokens, shared by every head and entry.
    in_rope = row_ok & (rows >= rope_start) & (rows < rope_start + rope_len)
    cos_a = tl.zeros([BLOCK_S, BLOCK_D // 2], dtype=tl.float32)
    cos_b = cos_a
    sin_a = cos_a
    sin_b = cos_a
    if ROPE != 0:
        t_row = ((rows64 - rope_start) * stride_cs)[:, None]
        cos_a, cos_b = _load_pair(COS, t_row, in_rope, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 1.0)
        sin_a, sin_b = _load_pair(SIN, t_row, in_rope, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 0.0)

    # Pass 1 (across-heads RMSNorm): 1/rms of every entry's q and k rows over all heads,
    # kept in a (2, B, S) fp32 scratch that pass 2 reads back.
    if NORM == 1:
        inv_n = 1.0 / (num_heads * HEAD_DIM)
        for b in range(batch):
            b64 = _i64(b)
            w = _entry_lock(LOCK, b, stride_lb, lock_off, row_ok, src_index, BLOCK_S, LOCK_MODE)
            k_ok = tile_ok & (w < 1.0)[:, None]  # weight-1 rows do not read k
            q_row = (b64 * stride_qb + rows64 * stride_qs)[:, None] + offs_d[None, :]
            k_row = (b64 * stride_kb + rows64 * stride_ks)[:, None] + offs_d[None, :]
            ssq_q = tl.zeros([BLOCK_S], dtype=tl.float32)
            ssq_k = tl.zeros([BLOCK_S], dtype=tl.float32)
            for h in range(num_heads):
                h64 = _i64(h)
                xq = tl.load(Q + q_row + h64 * stride_qh, mask=tile_ok, other=0.0).to(tl.float32)
                xk = tl.load(K + k_row + h64 * stride_kh, mask=k_ok, other=0.0).to(tl.float32)
                ssq_q += tl.sum(xq * xq, axis=1)
                ssq_k += tl.sum(xk * xk, axis=1)
            tl.store(RSTD + b64 * seqlen + rows64, tl.rsqrt(ssq_q * inv_n + eps), mask=row_ok)
            tl.store(RSTD + (batch + b64) * seqlen + rows64, tl.rsqrt(ssq_k * inv_n + eps), mask=row_ok)
        tl.debug_barrier()

    # Rows some entry locks (one shared cache source: the rest of it is never read).
    need = row_ok
    if LOCK_MODE == 2:
        need = rows < 0
        for b in range(batch):
            w = _entry_lock(LOCK, b, stride_lb, lock_off, row_ok, src_index, BLOCK_S, LOCK_MODE)
            need = need | (w > 0.0)

    # Pass 2, head by head: the source tile first, then every entry.
    for hh in range(heads_per_prog):
        h64 = (pid_h * heads_per_prog + hh).to(tl.int64)
        # Norm weights of this head (across heads: its slice of the heads*D vector).
        w_off = h64 * HEAD_DIM if NORM == 1 else 0
        wqa, wqb = _load_vec_pair(QW + w_off, offs_d, offs_j, HEAD_DIM, BLOCK_D, ROPE, HAS_QW)
        bqa, bqb = _load_vec_pair(QB + w_off, offs_d, offs_j, HEAD_DIM, BLOCK_D, ROPE, HAS_QB)
        wka, wkb = _load_vec_pair(KW + w_off, offs_d, offs_j, HEAD_DIM, BLOCK_D, ROPE, HAS_KW)
        bka, bkb = _load_vec_pair(KB + w_off, offs_d, offs_j, HEAD_DIM, BLOCK_D, ROPE, HAS_KB)

        ks_a = tl.zeros([BLOCK_S, BLOCK_D // 2], dtype=tl.float32)
        ks_b = ks_a
        vs = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        if LOCK_MODE == 1:
            # The source entry: its own (unlocked) outputs, and its K/V kept for the others.
            s64 = src_index.to(tl.int64)
            rq, rk = _entry_rstd(RSTD, s64, batch, seqlen, rows64, row_ok, BLOCK_S, NORM)
            q_row = (s64 * stride_qb + rows64 * stride_qs + h64 * stride_qh)[:, None]
            qa, qb = _load_pair(Q, q_row, row_ok, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 0.0)
            qa, qb = _norm_rope(qa, qb, ok_a, ok_b, rq, wqa, wqb, bqa, bqb, cos_a, cos_b, sin_a, sin_b, in_rope,
                                eps, HEAD_DIM, NORM, ROPE, HAS_QW, HAS_QB)
            o_row = (s64 * stride_qob + rows64 * stride_qos + h64 * stride_qoh)[:, None]
            _store_pair(QO, o_row, row_ok, qa, qb, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, INTERPRET)
            k_row = (s64 * stride_kb + rows64 * stride_ks + h64 * stride_kh)[:, None]
            ks_a, ks_b = _load_pair(K, k_row, row_ok, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 0.0)
            ks_a, ks_b = _norm_rope(ks_a, ks_b, ok_a, ok_b, rk, wka, wkb, bka, bkb, cos_a, cos_b, sin_a, sin_b,
                                    in_rope, eps, HEAD_DIM, NORM, ROPE, HAS_KW, HAS_KB)
            o_row = (s64 * stride_kob + rows64 * stride_kos + h64 * stride_koh)[:, None]
            _store_pair(KO, o_row, row_ok, ks_a, ks_b, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE,
                        INTERPRET)
            v_row = (s64 * stride_vb + rows64 * stride_vs + h64 * stride_vh)[:, None]
            vs = tl.load(V + v_row + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            o_row = (s64 * stride_vob + rows64 * stride_vos + h64 * stride_voh)[:, None]
            tl.store(VO + o_row + offs_d[None, :], cast_for_store(vs, VO, INTERPRET), mask=tile_ok)
        elif LOCK_MODE == 2:
            ks_row = (rows64 * stride_kss + h64 * stride_ksh)[:, None]
            ks_a, ks_b = _load_pair(KS, ks_row, need, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 0.0)
            vs_row = (rows64 * stride_vss + h64 * stride_vsh)[:, None]
            vs = tl.load(VS + vs_row + offs_d[None, :], mask=tile_ok & need[:, None], other=0.0).to(tl.float32)

        for b in range(batch):
            if b != src_index:
                b64 = _i64(b)
                w = _entry_lock(LOCK, b, stride_lb, lock_off, row_ok, src_index, BLOCK_S, LOCK_MODE)
                rq, rk = _entry_rstd(RSTD, b64, batch, seqlen, rows64, row_ok, BLOCK_S, NORM)
                q_row = (b64 * stride_qb + rows64 * stride_qs + h64 * stride_qh)[:, None]
                qa, qb = _load_pair(Q, q_row, row_ok, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 0.0)
                qa, qb = _norm_rope(qa, qb, ok_a, ok_b, rq, wqa, wqb, bqa, bqb, cos_a, cos_b, sin_a, sin_b,
                                    in_rope, eps, HEAD_DIM, NORM, ROPE, HAS_QW, HAS_QB)
                o_row = (b64 * stride_qob + rows64 * stride_qos + h64 * stride_qoh)[:, None]
                _store_pair(QO, o_row, row_ok, qa, qb, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, INTERPRET)

                fresh = row_ok & (w < 1.0)  # weight-1 rows do not read k, v
                k_row = (b64 * stride_kb + rows64 * stride_ks + h64 * stride_kh)[:, None]
                ka, kb = _load_pair(K, k_row, fresh, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, 0.0)
                ka, kb = _norm_rope(ka, kb, ok_a, ok_b, rk, wka, wkb, bka, bkb, cos_a, cos_b, sin_a, sin_b,
                                    in_rope, eps, HEAD_DIM, NORM, ROPE, HAS_KW, HAS_KB)
                v_row = (b64 * stride_vb + rows64 * stride_vs + h64 * stride_vh)[:, None]
                vv = tl.load(V + v_row + offs_d[None, :], mask=tile_ok & fresh[:, None], other=0.0).to(tl.float32)
                if LOCK_MODE == 3:
                    used = row_ok & (w > 0.0)
                    ks_row = (b64 * stride_ksb + rows64 * stride_kss + h64 * stride_ksh)[:, None]
                    ks_a, ks_b = _load_pair(KS, ks_row, used, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE,
                                            0.0)
                    vs_row = (b64 * stride_vsb + rows64 * stride_vss + h64 * stride_vsh)[:, None]
                    vs = tl.load(VS + vs_row + offs_d[None, :], mask=tile_ok & used[:, None],
                                 other=0.0).to(tl.float32)
                if LOCK_MODE != 0:
                    ka = _blend_rows(ka, ks_a, w)
                    kb = _blend_rows(kb, ks_b, w)
                    vv = _blend_rows(vv, vs, w)
                o_row = (b64 * stride_kob + rows64 * stride_kos + h64 * stride_koh)[:, None]
                _store_pair(KO, o_row, row_ok, ka, kb, offs_d, offs_j, HEAD_DIM, BLOCK_S, BLOCK_D, ROPE, INTERPRET)
                o_row = (b64 * stride_vob + rows64 * stride_vos + h64 * stride_voh)[:, None]
                tl.store(VO + o_row + offs_d[None, :], cast_for_store(vv, VO, INTERPRET), mask=tile_ok)


def kernel_constexprs(head_dim: int, *, norm: str, rope: str, lock_mode: int, has_qw: bool, has_qb: bool,
                      has_kw: bool, has_kb: bool, align: int = 16, interpret: bool = False) -> dict:
    """The non-tiling constexprs of ``_qkv_epilogue_kernel`` (also used by the GPU report)."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), NORM=NORM_CODES[norm], ROPE=ROPE_CODES[rope],
                LOCK_MODE=lock_mode, HAS_QW=has_qw, HAS_QB=has_qb, HAS_KW=has_kw, HAS_KB=has_kb,
                ALIGN=align, INTERPRET=interpret)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _bshd(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1)) if x.dim() == 3 else x


def _launch(q, k, v, heads, norm, wq, bq, wk, bk, eps, rope, cos, sin, rope_start, lock, k_src, v_src,
            source_index, q_out, k_out, v_out):
    """q, k, v: (B, S, heads*D) or (B, S, heads, D) with unit last stride; outputs
    (B, S, heads, D) views with unit last stride.  lock: (1|B, S) or None."""
    q, k, v = _bshd(q, heads), _bshd(k, heads), _bshd(v, heads)
    B, S, H, D = q.shape
    if lock is None:
        mode = LOCK_NONE
    elif source_index >= 0:
        mode = LOCK_BRANCH
    elif _batch_stride(k_src) == 0 and _batch_stride(v_src) == 0:
        mode = LOCK_SHARED
    else:
        mode = LOCK_PER_ENTRY
    dummy = q
    if mode in (LOCK_SHARED, LOCK_PER_ENTRY):
        src_strides = row_strides(k_src) + row_strides(v_src)
    else:
        k_src = v_src = dummy
        src_strides = (0,) * 6
    if lock is None:
        lock, lock_strides = dummy, (0, 0)
    else:
        lock = lock.to(torch.float32)
        lock_strides = (_batch_stride(lock), lock.stride(1))
    if rope != "none":
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
        rope_len, stride_cs = cos.shape[0], (cos.stride(0) if cos.shape[0] > 1 else 0)
    else:
        cos = sin = dummy
        rope_len, stride_cs = 0, 0
    strides = [*row_strides(q), *row_strides(k), *row_strides(v), *src_strides, *row_strides(q_out),
               *row_strides(k_out), *row_strides(v_out), stride_cs]
    align = stride_align(strides)
    strides = [st // align for st in strides]
    across = norm == "rms_across_heads"
    rstd = torch.empty(2 * B * S if across else 1, dtype=torch.float32, device=q.device)
    interpret = triton_interpreting()
    block_s, warps = (INTERPRETER_BLOCK_S, 1) if interpret else launch_config(D, q.dtype)
    heads_per_prog = H if across else 1
    grid = (triton.cdiv(S, block_s), H // heads_per_prog)
    with device_guard(q.device):
        _qkv_epilogue_kernel[grid](
            q, k, v,
            wq if wq is not None else dummy, bq if bq is not None else dummy,
            wk if wk is not None else dummy, bk if bk is not None else dummy,
            cos, sin, lock, k_src, v_src, q_out, k_out, v_out, rstd,
            *strides[:15], *lock_strides, *strides[15:],
            B, S, H, heads_per_prog, rope_start, rope_len, source_index if mode == LOCK_BRANCH else -1, eps,
            **kernel_constexprs(D, norm=norm, rope=rope, lock_mode=mode, has_qw=wq is not None,
                                has_qb=bq is not None, has_kw=wk is not None, has_kb=bk is not None,
                                align=align, interpret=interpret),
            BLOCK_S=block_s, num_warps=warps,
        )


# --------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------
def _torch_epilogue(q, k, v, heads, norm, wq, bq, wk, bk, eps, rope, cos, sin, rope_start, lock, k_src, v_src,
                    source_index, backend):
    """The PyTorch path with the op's positional arguments (also the op's backward)."""
    return reference.qkv_epilogue(
        q, k, v, heads=heads, norm=norm, norm_q_weight=wq, norm_q_bias=bq, norm_k_weight=wk, norm_k_bias=bk,
        norm_eps=eps, rope=rope, rope_cos=cos, rope_sin=sin, rope_start=rope_start, lock=lock,
        k_src=k_src if source_index < 0 else None, v_src=v_src if source_index < 0 else None,
        source_index=source_index if source_index >= 0 else None)


def _fresh(t: torch.Tensor, inputs) -> torch.Tensor:
    """t as a contiguous tensor that shares no memory with the inputs (the outputs of a
    custom op may not alias its inputs; v without a lock is a view of v)."""
    shared = any(t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr() for i in inputs)
    return t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()


def _out_shape(q, heads):
    return (q.shape[0], q.shape[1], heads, q.shape[-1] // heads) if q.dim() == 3 else tuple(q.shape)


@torch.library.custom_op("kvlock_kernels::qkv_epilogue", mutates_args=())
def _qkv_epilogue_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, norm: str,
                     norm_q_weight: Optional[torch.Tensor], norm_q_bias: Optional[torch.Tensor],
                     norm_k_weight: Optional[torch.Tensor], norm_k_bias: Optional[torch.Tensor], norm_eps: float,
                     rope: str, rope_cos: Optional[torch.Tensor], rope_sin: Optional[torch.Tensor], rope_start: int,
                     lock: Optional[torch.Tensor], k_src: Optional[torch.Tensor], v_src: Optional[torch.Tensor],
                     source_index: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New contiguous (B, S, heads, D) q, K', V'.  source_index < 0: no in-batch source."""
    args = (q, k, v, heads, norm, norm_q_weight, norm_q_bias, norm_k_weight, norm_k_bias, norm_eps, rope,
            rope_cos, rope_sin, rope_start, lock, k_src, v_src, source_index)
    if not _runs_triton(q, backend) or q.numel() == 0:
        return tuple(_fresh(t, (q, k, v)) for t in _torch_epilogue(*args, backend))
    outs = tuple(torch.empty(_out_shape(q, heads), dtype=q.dtype, device=q.device) for _ in range(3))
    _launch(*args, *outs)
    return outs


@_qkv_epilogue_op.register_fake
def _(q, k, v, heads, norm, wq, bq, wk, bk, eps, rope, cos, sin, rope_start, lock, k_src, v_src, source_index,
      backend):
    shape = _out_shape(q, heads)
    return tuple(q.new_empty(shape) for _ in range(3))


register_recompute_backward(_qkv_epilogue_op, _torch_epilogue)


@torch.library.custom_op("kvlock_kernels::qkv_epilogue_out", mutates_args=("q_out", "k_out", "v_out"))
def _qkv_epilogue_out_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, norm: str,
                         norm_q_weight: Optional[torch.Tensor], norm_q_bias: Optional[torch.Tensor],
                         norm_k_weight: Optional[torch.Tensor], norm_k_bias: Optional[torch.Tensor],
                         norm_eps: float, rope: str, rope_cos: Optional[torch.Tensor],
                         rope_sin: Optional[torch.Tensor], rope_start: int, lock: Optional[torch.Tensor],
                         k_src: Optional[torch.Tensor], v_src: Optional[torch.Tensor], source_index: int,
                         backend: str, q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Writes q, K', V' into the given (B, S, heads, D) views."""
    args = (q, k, v, heads, norm, norm_q_weight, norm_q_bias, norm_k_weight, norm_k_bias, norm_eps, rope,
            rope_cos, rope_sin, rope_start, lock, k_src, v_src, source_index)
    if not _runs_triton(q, backend) or q.numel() == 0:
        for o, r in zip((q_out, k_out, v_out), _torch_epilogue(*args, backend)):
            o.copy_(r)
        return
    _launch(*args, q_out, k_out, v_out)


@_qkv_epilogue_out_op.register_fake
def _(q, k, v, heads, norm, wq, bq, wk, bk, eps, rope, cos, sin, rope_start, lock, k_src, v_src, source_index,
      backend, q_out, k_out, v_out):
    return None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _check_norm_weight(name, t, norm, size):
    if t is None:
        return None
    if norm == "none":
        raise ValueError(f"{name} is given but norm='none' (pick the norm kind the weight belongs to)")
    check_tensor(name, t, dtypes=DTYPES, ndim=1)
    if t.shape[0] != size:
        what = "heads*D" if norm == "rms_across_heads" else "D"
        raise ValueError(f"{name} must have shape ({what},) = ({size},) for norm={norm!r}, got {tuple(t.shape)}")
    return t if t.stride(0) == 1 else t.contiguous()


def _check_rope(rope, rope_cos, rope_sin, rope_start, S, D):
    rope_start = check_int("rope_start", rope_start, low=0)
    if rope == "none":
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            if t is not None:
                raise ValueError(f"{name} is given but rope='none' (pick 'interleaved' or 'half')")
        return None, None, rope_start
    tables = []
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t is None:
            raise ValueError(f"rope={rope!r} needs {name}: a (S_rope, D) float tensor")
        check_tensor(name, t, dtypes=DTYPES, ndim=(2, 4), layout="(S_rope, D) or (1, S_rope, 1, D)")
        ok = t.shape[-1] == D and (t.dim() == 2 or (t.shape[0] == 1 and t.shape[2] == 1))
        if not ok:
            raise ValueError(f"{name} must have shape (S_rope, D) or (1, S_rope, 1, D) with D={D}, "
                             f"got {tuple(t.shape)}")
        tables.append(rope_table(t))
    if tables[0].shape != tables[1].shape:
        raise ValueError(f"rope_sin must have rope_cos's shape {tuple(rope_cos.shape)}, got {tuple(rope_sin.shape)}")
    if D % 2:
        raise ValueError(f"rope={rope!r} needs an even head dim, got D={D}")
    if rope_start + tables[0].shape[0] > S:
        raise ValueError(f"rope_start + S_rope must be <= S={S} (RoPE covers tokens rope_start .. "
                         f"rope_start + S_rope - 1), got rope_start={rope_start}, S_rope={tables[0].shape[0]}")
    return tables[0], tables[1], rope_start


def _check_out(out, shape, q):
    if not isinstance(out, (tuple, list)):
        raise TypeError(f"out must be a tuple (q_out, k_out, v_out) of tensors, got {type(out).__name__}")
    if len(out) != 3:
        raise ValueError(f"out must hold 3 tensors (q_out, k_out, v_out), got {len(out)}")
    for name, t in zip(("out[0] (q_out)", "out[1] (k_out)", "out[2] (v_out)"), out):
        check_tensor(name, t, dtypes=DTYPES, ndim=4, layout="(B, S, heads, D)")
        check_same_dtype(name, t, "q", q)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape (B, S, heads, D) = {tuple(shape)}, got {tuple(t.shape)}")
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    return tuple(out)


def qkv_epilogue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, norm: str = "none",
                 norm_q_weight: Optional[torch.Tensor] = None, norm_q_bias: Optional[torch.Tensor] = None,
                 norm_k_weight: Optional[torch.Tensor] = None, norm_k_bias: Optional[torch.Tensor] = None,
                 norm_eps: Optional[float] = 1e-6, rope: str = "none", rope_cos: Optional[torch.Tensor] = None,
                 rope_sin: Optional[torch.Tensor] = None, rope_start: int = 0, lock: Optional[torch.Tensor] = None,
                 k_src: Optional[torch.Tensor] = None, v_src: Optional[torch.Tensor] = None,
                 source_index: Optional[int] = None, out=None, backend: str = "auto", check_inputs: bool = True):
    """Attention-ready q, K', V' from a self-attention's projections: QK norm, RoPE and the
    KV-Lock blend in one pass.

    Arguments:
        q, k, v: (B, S, heads*D) projection outputs (or (B, S, heads, D)), fp16 / bf16 /
            fp32 (fp64: PyTorch path only), same shape, dtype and device.  Any batch and
            token strides (chunks of a fused qkv projection are read in place).
        heads: number of attention heads.
        norm: "none", "rms_across_heads" (Wan: ``torch.nn.RMSNorm(heads*D)``, weights
            (heads*D,), no bias), "rms_per_head" (HunyuanVideo: diffusers' ``RMSNorm(D)``,
            weights (D,)), "layer_per_head" (CogVideoX: ``nn.LayerNorm(D)``, weight and
            bias (D,)).  q is normed with norm_q_*, k with norm_k_*; v never.  A weight
            may be None (no affine).
        norm_eps: the norm's epsilon; None: torch's default (machine epsilon of fp32).
        rope: "none", "interleaved" (pairs (2i, 2i+1)) or "half" (pairs (i, i + D/2)).
        rope_cos, rope_sin: (S_rope, D) (or diffusers' Wan layout (1, S_rope, 1, D)),
            float, one value per element of D as diffusers builds them; fp32 math:
            ``out = x * cos + rotate(x) * sin``.  fp16/bf16 tables are upcast and still
            rotate in fp32 (a stock processor that casts its tables to q's dtype rotates
            in that dtype: pass fp32 tables, or the stock path, for bit-equality).  Applied to q and k of tokens
            ``rope_start .. rope_start + S_rope - 1`` (CogVideoX: rope_start = text tokens;
            HunyuanVideo: 0, text last); the other tokens get no RoPE.
        lock: (S,), (1, S) or (B, S), float in [0, 1] or bool: weight of the source per
            entry and token, applied to the normed, rotated K and to V (text tokens carry
            weight 0).  None: no lock (a source given with it is ignored).
        k_src, v_src: (B|1, S, heads, D) (or (B|1, S, heads*D)) in q's dtype, the cached
            source K/V, already normed and rotated (batch-stride-0 views are read in
            place), or
        source_index: batch entry of q/k/v that is the source branch (its outputs are
            its own, unlocked; its K/V tile is blended into every other entry).
        out: optional (q_out, k_out, v_out), (B, S, heads, D) tensors or views (unit last
            stride) to write into, e.g. slices of a joint text+video buffer.
        backend: "auto" (Triton on CUDA, and on CPU under TRITON_INTERPRET=1; else
            PyTorch), "triton" or "torch" (bit-exact with the stock processors).
        check_inputs: read the lock on the host to check its values (skipped under
            torch.compile and CUDA-graph capture).
    Returns:
        (q_out, k_out, v_out): (B, S, heads, D) in q's dtype, attention-ready for
        ``dispatch_attention_fn`` (bshd); the ``out`` tensors when given.
    Raises:
        TypeError for a wrong type or dtype, ValueError for a wrong shape, device, range
        or option; all before anything is written.
    """
    layout = "(B, S, heads*D) or (B, S, heads, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=DTYPES, ndim=(3, 4), layout=layout)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    heads = check_int("heads", heads, low=1)
    B, S = q.shape[0], q.shape[1]
    if q.dim() == 3:
        if q.shape[2] % heads:
            raise ValueError(f"the last dim of q (heads*D = {q.shape[2]}) must be divisible by heads={heads}")
        D = q.shape[2] // heads
    else:
        if q.shape[2] != heads:
            raise ValueError(f"q of shape (B, S, heads, D) must have heads={heads} at dim 2, got {tuple(q.shape)}")
        D = q.shape[3]
    check_choice("norm", norm, NORMS)
    check_choice("rope", rope, ROPES)
    if norm == "rms_across_heads" and (norm_q_bias is not None or norm_k_bias is not None):
        raise ValueError("norm='rms_across_heads' has no bias (torch.nn.RMSNorm); got norm_q_bias/norm_k_bias")
    w_size = heads * D if norm == "rms_across_heads" else D
    wq = _check_norm_weight("norm_q_weight", norm_q_weight, norm, w_size)
    wk = _check_norm_weight("norm_k_weight", norm_k_weight, norm, w_size)
    bq = _check_norm_weight("norm_q_bias", norm_q_bias, norm, w_size)
    bk = _check_norm_weight("norm_k_bias", norm_k_bias, norm, w_size)
    if norm_eps is None:
        eps = torch.finfo(torch.promote_types(q.dtype, torch.float32)).eps
    else:
        eps = check_real("norm_eps", norm_eps, low=0.0)
    cos, sin, rope_start = _check_rope(rope, rope_cos, rope_sin, rope_start, S, D)
    # A cache source may also come as projections-shaped (B|1, S, heads*D) tensors.
    k_src, v_src = (t.unflatten(-1, (heads, D)) if isinstance(t, torch.Tensor) and t.dim() == 3
                    and t.shape[-1] == heads * D else t for t in (k_src, v_src))
    src = check_source(k_src, v_src, source_index, B, (S, heads, D), q, required=lock is not None, ref_name="q")
    check_bool("check_inputs", check_inputs)
    shape = (B, S, heads, D)
    outs = _check_out(out, shape, q) if out is not None else None
    check_same_device(q=q, k=k, v=v, norm_q_weight=wq, norm_q_bias=bq, norm_k_weight=wk, norm_k_bias=bk,
                      rope_cos=cos, rope_sin=sin, lock=lock, k_src=k_src, v_src=v_src,
                      **({} if outs is None else dict(q_out=outs[0], k_out=outs[1], v_out=outs[2])))
    lock2 = lock_weights_2d(lock, B, S, check_inputs) if lock is not None else None
    check_kernel_backend(backend, q.dtype, q.device)

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if lock2 is None:
        k_src = v_src = None
        src = -1
    elif src == -1:
        k_src = k_src if k_src.stride(-1) == 1 else k_src.contiguous()
        v_src = v_src if v_src.stride(-1) == 1 else v_src.contiguous()
    args = (q, k, v, heads, norm, wq, bq, wk, bk, eps, rope, cos, sin, rope_start, lock2, k_src, v_src, src,
            backend)
    if outs is None:
        return _qkv_epilogue_op(*args)
    if needs_grad(q, k, v, wq, bq, wk, bk, lock2, k_src, v_src, cos, sin):
        for o, r in zip(outs, _qkv_epilogue_op(*args)):
            o.copy_(r)
    else:
        _qkv_epilogue_out_op(*args, *outs)
    return outs


# --------------------------------------------------------------------------------------
# GPU report (tools/gpu_report job protocol)
# --------------------------------------------------------------------------------------
# (label, norm, rope, lock_mode, has_bias): the model families' configurations.
GPU_REPORT_VARIANTS = (
    ("wan_branch", "rms_across_heads", "interleaved", LOCK_BRANCH, False),
    ("cogvideox_branch", "layer_per_head", "interleaved", LOCK_BRANCH, True),
    ("hunyuan_branch", "rms_per_head", "interleaved", LOCK_BRANCH, False),
    ("wan_cache", "rms_across_heads", "interleaved", LOCK_SHARED, False),
    ("half_rope_per_entry", "rms_per_head", "half", LOCK_PER_ENTRY, False),
    ("plain", "none", "none", LOCK_NONE, False),
)


def gpu_report_jobs(arch: int, all_configs: bool) -> list[tuple]:
    dtypes = ("bf16", "fp16", "fp32") if all_configs else ("bf16",)
    head_dims = (64, 72, 80, 96, 128, 256) if all_configs else (64, 128)
    variants = GPU_REPORT_VARIANTS if all_configs else GPU_REPORT_VARIANTS[:3]
    return [("qkv_epilogue", __name__, "gpu_report_build", arch, dt, d, variant)
            for dt in dtypes for d in head_dims for variant in variants]


def gpu_report_build(arch: int, dtype_name: str, head_dim: int, config) -> dict:
    label, norm, rope, lock_mode, has_bias = config
    block_s, warps = launch_config(head_dim, DTYPES_BY_NAME[dtype_name])
    has_w = norm != "none"
    # What the launcher passes for contiguous tensors (strides multiples of head_dim).
    const = kernel_constexprs(head_dim, norm=norm, rope=rope, lock_mode=lock_mode, has_qw=has_w,
                              has_qb=has_bias, has_kw=has_w, has_kb=has_bias, align=stride_align([head_dim]))
    const["BLOCK_S"] = block_s
    ptr = "*" + dtype_name
    types = {n: ptr for n in ("Q", "K", "V", "QW", "QB", "KW", "KB", "KS", "VS", "QO", "KO", "VO")}
    types.update(COS="*fp32", SIN="*fp32", LOCK="*fp32", RSTD="*fp32", eps="fp32")
    return dict(fn=_qkv_epilogue_kernel, const=const, types=types, warps=warps, stages=1,
                pointers=("Q", "K", "V", "QW", "QB", "KW", "KB", "COS", "SIN", "LOCK", "KS", "VS", "QO", "KO",
                          "VO", "RSTD"),
                unit_strides=("stride_ls",), config=f"{label}/S{block_s}/w{warps}")
