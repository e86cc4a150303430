"""Small helpers shared by the ops: backend resolution and launch guards (argument checks
are in ``_validate``)."""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(device: torch.device, backend: str) -> bool:
    """Decide whether an op runs its Triton kernel (True) or its PyTorch path (False).

    "auto" picks Triton for CUDA tensors, and for CPU tensors only under the Triton
    interpreter (that is how CI exercises the kernels).  "triton" insists on it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    runnable = device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    if backend == "triton" and not runnable:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
            f"got tensors on {device}")
    return runnable


def host_checks_allowed() -> bool:
    """Data-dependent checks read tensor values (a host sync).  They are skipped while
    torch.compile traces or a CUDA graph is being captured, where a sync is illegal."""
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def device_guard(device: torch.device):
    """Make `device` current for a kernel launch: Triton launches on the current CUDA
    device's current stream, which need not be the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
