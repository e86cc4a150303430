"""One argument-checking helper for every op, so that the same mistake raises the same
exception everywhere, before anything is launched or written.

Policy:
- ``TypeError``: the wrong kind of object (a float or a list where a tensor is expected,
  a tensor or a bool where a number is expected) or a tensor of the wrong dtype,
  including two tensors whose dtypes must agree and do not.
- ``ValueError``: the right kind with a wrong value: shape, device, a number out of its
  range or not finite, an unknown option.
Every message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def check_tensor(name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
                 ndim: Optional[int | Iterable[int]] = None, layout: str = "") -> torch.Tensor:
    """A tensor of one of ``dtypes`` (None: any) with ``ndim`` dims (an int or a set).
    ``layout`` (e.g. "(B, S, H, D)") is quoted in the shape error."""
    if not isinstance(t, torch.Tensor):
        want = f" {layout}" if layout else ""
        raise TypeError(f"{name} must be a torch.Tensor{want}, got {_kind(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {_dtype_name(t.dtype)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            dims = " or ".join(f"{n}-D" for n in allowed)
            want = f" {layout}" if layout else ""
            raise ValueError(f"{name} must be {dims}{want}, got shape {tuple(t.shape)}")
    return t


def check_same_dtype(name: str, t: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's dtype (TypeError otherwise)."""
    if t is not None and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {_dtype_name(ref.dtype)}, got {_dtype_name(t.dtype)}")


def check_same_device(**tensors) -> torch.device:
    """All given tensors (None entries ignored) on one device; returns it."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], layout: str) -> None:
    """t's shape equals ``expected`` where an entry is not None (None: any size)."""
    shape = tuple(t.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape {layout} = ({want}), got {shape}")


def check_real(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """A Python real number (not bool, not a tensor) in the given range; returns a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float or int), got {_kind(value)}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """A Python int (not bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_kind(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
        raise ValueError(f"{name} must be an int {rng}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if not isinstance(value, str) and any(isinstance(c, str) for c in choices):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {_kind(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_softmax_scale(value, head_dim: int) -> float:
    """``softmax_scale``: None (1 / sqrt(head_dim)) or a finite positive Python number."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    return check_real("softmax_scale", value, low=0.0, low_open=True)


def check_per_sample(name: str, value, batch: int, device: torch.device, *, low: Optional[float] = None,
                     high: Optional[float] = None):
    """A per-sample control (omega, sigma, alpha): a Python number or a floating tensor of
    shape () or (B,) on ``device``.  Returns ``(tensor or None, float value)``; a tensor
    is returned as is (strides included) and its values are not read here (no sync)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(value.dtype)}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must have shape () or (B,) = ({batch},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")
        return value, 0.0
    return None, check_real(name, value, low=low, high=high)
