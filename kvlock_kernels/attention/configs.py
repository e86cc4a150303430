"""Launch configurations of the fused KV-lock attention kernel.

``KERNEL_CONFIGS[arch][dtype][tier]`` lists ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``
autotune candidates, best first:

- ``arch``: ``"sm90"`` (Hopper and newer) or ``"sm80"`` (Ampere, Ada);
- ``dtype``: ``"bf16"``, ``"fp16"`` or ``"fp32"``.  fp32 has no GPU entries: IEEE fp32
  dots keep whole operand rows (all of the head dim) in registers and 3xTF32 dots keep
  both halves of the query tile, so every fp32 tile from 16x16 up spilled at head dim
  >= 64 on sm_80 and sm_90.  fp32 CUDA calls blend with lock_kv and attend with SDPA;
  fp32 runs through the kernel under the interpreter only (with the (BLOCK_M, BLOCK_N)
  pairs of INTERPRETER_CONFIGS);
- ``tier``: ``"d64"`` (head dim <= 64), ``"d128"`` (<= 128), ``"d256"`` (<= 256), and
  ``"unaligned"`` (head dim <= 128 with a row stride that is not a multiple of 16
  elements, e.g. a contiguous head dim 72: the loads cannot be vectorised, so they are
  not asynchronous copies and the tiles stay small).

Every entry compiles for its arch without register spills, within shared memory and
without tensor-core work duplicated across warps: ``python -m kvlock_kernels.tools.gpu_report
--all`` checks the whole table (it exits 1 otherwise) and reports the tensor-core
instructions per KV block of each entry.  An empty list (fp32 everywhere, head dim > 128
on sm_80) means the fused kernel does not run there on GPUs: ``kv_lock_attention`` blends
with ``lock_kv`` then runs plain attention (backend "auto") or raises (backend "triton").
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["KERNEL_CONFIGS", "INTERPRETER_CONFIG", "INTERPRETER_CONFIGS", "DTYPE_NAMES", "DTYPES_BY_NAME",
           "arch_family", "configs_for", "dtype_name", "head_dim_tier", "block_d"]

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# Every entry is clean for both kernel variants (no lock / locked) and issues no
# duplicated tensor-core work (the report compares the MMA FLOPs of one loop iteration
# with the block's: e.g. 64-row tiles on 8 warps computed a dot twice).  The locked kernel
# holds the fp32 blend of a K or V tile in registers, which is what bounds the tiles (the
# plain kernel alone would take larger ones).
_HALF_SM90 = {
    "d64": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    "d128": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
    "d256": [(128, 16, 8, 2)],
    "unaligned": [(128, 16, 8, 2)],
}
# sm_80's mma.sync keeps both dot operands in registers: smaller tiles than sm_90.  At
# head dim 256 no tile was both spill-free in the locked kernel and free of duplicated
# dots (16x16 on 4 warps computes QK twice), so sm_80 has no d256 entry: "auto" blends
# then runs plain attention there (an empty list means exactly that, see kv_lock_attention).
_HALF_SM80 = {
    "d64": [(128, 32, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2), (64, 16, 4, 2)],
    "d128": [(128, 16, 8, 2), (32, 32, 4, 2)],
    "d256": [],
    "unaligned": [(128, 16, 8, 2)],
}
_FP32 = {"d64": [], "d128": [], "d256": [], "unaligned": []}

KERNEL_CONFIGS = {
    "sm90": {"bf16": _HALF_SM90, "fp16": _HALF_SM90, "fp32": _FP32},
    "sm80": {"bf16": _HALF_SM80, "fp16": _HALF_SM80, "fp32": _FP32},
}

# Under the interpreter one fixed config runs the public function (autotuning there would
# only multiply test time); the tests sweep every (BLOCK_M, BLOCK_N) pair of the table
# through ``fused_attention_with_config``: warps and stages do not change interpreter results.
INTERPRETER_CONFIG = (64, 64, 4, 1)
INTERPRETER_CONFIGS = sorted({(bm, bn, 4, 1) for family in KERNEL_CONFIGS.values() for per_dtype in family.values()
                              for tier in per_dtype.values() for bm, bn, _, _ in tier})


def dtype_name(dtype: Union[torch.dtype, str]) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype must be one of {tuple(DTYPE_NAMES.values())}, got {dtype!r}")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {tuple(DTYPE_NAMES)}, got {dtype}")
    return DTYPE_NAMES[dtype]


def block_d(head_dim: int) -> int:
    """The padded head dim of the kernel's tiles (a power of two, at least 16)."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def head_dim_tier(head_dim: int, aligned: bool = True) -> str:
    bd = block_d(head_dim)
    if bd > 128:
        return "d256"
    if not aligned:
        return "unaligned"
    return "d64" if bd <= 64 else "d128"


def arch_family(arch: Optional[int] = None) -> str:
    """"sm90" or "sm80" for sm_<arch> (default: the current CUDA device, else sm_90)."""
    if arch is None:
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        arch = 10 * major + minor
    return "sm90" if arch >= 90 else "sm80"


def configs_for(head_dim: int, dtype: Union[torch.dtype, str], arch: Optional[int] = None,
                aligned: bool = True) -> list:
    """Autotune candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for a head dim and
    dtype (torch dtype or "bf16"/"fp16"/"fp32") on sm_<arch> (default: the current GPU).
    ``aligned``: every row stride of the launch is a multiple of 16 elements."""
    return KERNEL_CONFIGS[arch_family(arch)][dtype_name(dtype)][head_dim_tier(head_dim, aligned)]
