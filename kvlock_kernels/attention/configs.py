"""Launch configurations of the fused KV-lock attention kernel.

``KERNEL_CONFIGS[arch][dtype][tier]`` lists ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``
autotune candidates, best first:

- ``arch``: ``"sm90"`` (Hopper and newer) or ``"sm80"`` (Ampere, Ada);
- ``dtype``: ``"bf16"``, ``"fp16"`` or ``"fp32"``.  fp32 runs IEEE fp32 dots on the CUDA
  cores (no tensor cores), whose operand tiles live in registers: its tiles are smaller
  so that no entry spills;
- ``tier``: ``"d64"`` (head dim <= 64), ``"d128"`` (<= 128), ``"d256"`` (<= 256), and
  ``"unaligned"`` (head dim <= 128 with a row stride that is not a multiple of 16
  elements, e.g. a contiguous head dim 72: the loads cannot be vectorised, so they are
  not asynchronous copies and the tiles stay small).

Every entry compiles for its arch without register spills and within shared memory:
``python -m kvlock_kernels.tools.gpu_report --all`` checks the whole table (it exits 1
otherwise) and reports the tensor-core instructions per KV block of each entry.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["KERNEL_CONFIGS", "INTERPRETER_CONFIG", "INTERPRETER_CONFIGS", "DTYPE_NAMES", "arch_family",
           "configs_for", "dtype_name", "head_dim_tier", "block_d"]

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_HALF_SM90 = {
    "d64": [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2)],
    "d128": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2)],
    "d256": [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    "unaligned": [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
}
_HALF_SM80 = {
    "d64": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    "d128": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
    "d256": [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    "unaligned": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)],
}
_FP32 = {
    "d64": [(64, 32, 4, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
    "d128": [(32, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 2)],
    "d256": [(32, 16, 4, 2), (16, 16, 4, 2)],
    "unaligned": [(32, 32, 4, 2), (32, 16, 4, 2)],
}

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
