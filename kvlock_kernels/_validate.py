"""One argument-checking helper for every op, so that the same mistake raises the same
exception everywhere, before anything is launched or written.

Policy:
- ``TypeError``: the wrong kind of object (a float or a list where a tensor is expected,
  a tensor or a bool where a number is expected, a number where a string option is
  expected) or a tensor of the wrong dtype, including two tensors whose dtypes must
  agree and do not.
- ``ValueError``: the right kind with a wrong value: shape, device, a number out of its
  range or not finite (NaN, inf), tensor values out of their documented range, an
  unknown option.
Every message names the argument, what was expected and what was given.

Values of tensors are read on the host (a device sync) only by the ``check_values``
helpers below, and only where ``host_checks_allowed()`` (never while torch.compile traces
or a CUDA graph is captured) and the caller did not opt out (``check_values=False``).
Everything else looks at types, shapes, dtypes and devices only.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch

from ._utils import BACKENDS, host_checks_allowed

__all__ = [
    "FLOAT_DTYPES", "LOCK_DTYPES", "MASK_DTYPES", "describe",
    "check_tensor", "check_same_dtype", "check_same_device", "check_shape", "check_same_shape",
    "check_real", "check_int", "check_bool", "check_choice", "check_backend", "check_softmax_scale",
    "check_per_sample", "check_values_in_range", "check_lock", "check_mask",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Lock weights: float in [0, 1]; bool selects 0 / 1.
LOCK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)
# Edit masks: bool and uint8 are binary (nonzero = foreground); float lies in [0, 1].
MASK_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe(value) -> str:
    """How a value is named in messages: a tensor's dtype and shape, else its type (and
    the value itself for short scalars and strings)."""
    if isinstance(value, torch.Tensor):
        return f"a {_dtype_name(value.dtype)} tensor of shape {tuple(value.shape)} on {value.device}"
    if value is None:
        return "None"
    if isinstance(value, (bool, numbers.Number, str)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    return type(value).__name__



def _dims(ndims: Sequence[int]) -> str:
    return " or ".join(f"{n}-D" for n in ndims)


def check_tensor(name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
                 ndim: Optional[int | Iterable[int]] = None, min_ndim: Optional[int] = None,
                 layout: str = "") -> torch.Tensor:
    """A tensor of one of ``dtypes`` (None: any) with ``ndim`` dims (an int or a set) or at
    least ``min_ndim``.  ``layout`` (e.g. "(B, S, H, D)") is quoted in the messages."""
    want = f" {layout}" if layout else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{want}, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {_dtype_name(t.dtype)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must be {_dims(allowed)}{want}, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims{want}, got shape {tuple(t.shape)}")
    return t


def check_same_dtype(name: str, t: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's dtype (TypeError otherwise)."""
    if t is not None and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {_dtype_name(ref.dtype)}, got {_dtype_name(t.dtype)}")


def check_same_device(**tensors) -> Optional[torch.device]:
    """All given tensors (None entries ignored) on one device; returns it (None when all
    are None).  A value that is not a tensor is a TypeError naming it (so an op that
    checks devices first still says "lock must be a torch.Tensor" for a float lock)."""
    for n, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor or None, got {describe(t)}")
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if not devices:
        return None
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


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's shape (ValueError otherwise)."""
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_real(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """A Python real number (not bool, not a tensor) in the given range; returns a float.
    NaN is always refused; inf unless ``finite=False``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float or int), got {describe(value)}")
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
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
        raise ValueError(f"{name} must be an int {rng}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A Python bool (a flag such as ``inplace`` or ``return_lse``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    """One of ``choices``; a value of the wrong kind (a number for a string option) is a
    TypeError, an unknown option a ValueError."""
    if any(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_backend(backend) -> str:
    """``backend``: "auto", "triton" or "torch"."""
    check_choice("backend", backend, BACKENDS)
    return backend


def check_softmax_scale(value, head_dim: int) -> float:
    """``softmax_scale``: None (1 / sqrt(head_dim)) or a finite positive Python number
    (a tensor is a TypeError: it would be read on the host)."""
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    return check_real("softmax_scale", value, low=0.0, low_open=True)


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f"in [{low:g}, {high:g}]"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


def check_values_in_range(name: str, t: torch.Tensor, *, low: Optional[float] = None,
                          high: Optional[float] = None, check_values: bool = True) -> None:
    """The values of a floating tensor lie in [low, high] and are not NaN (ValueError).
    Reads the tensor on the host: only where ``check_values`` and ``host_checks_allowed()``;
    integer and bool tensors are not read (their range is their dtype's), nor meta tensors
    (they have no values)."""
    if (not check_values or not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta"
            or not host_checks_allowed()):
        return
    ok = ~torch.isnan(t)
    if low is not None:
        ok &= t >= low
    if high is not None:
        ok &= t <= high
    if not bool(ok.all()):
        finite = t[~torch.isnan(t)]
        seen = (f"min {finite.min().item():g}, max {finite.max().item():g}" if finite.numel() else "no numbers")
        raise ValueError(f"{name} values must be {_range_text(low, high)} (no NaN), got {seen}, "
                         f"{int(torch.isnan(t).sum())} NaN")


def check_per_sample(name: str, value, batch: int, device: torch.device, *, low: Optional[float] = None,
                     high: Optional[float] = None, check_values: bool = False):
    """A per-sample control (omega, sigma, alpha): a Python number or a floating tensor of
    shape () or (B,) on ``device``.  Returns ``(tensor or None, float value)``; a tensor
    is returned as is (strides included).  Its values are read (one host sync) only with
    ``check_values`` where host checks are allowed; a number is always range-checked."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a Python number or a floating-point tensor, "
                            f"got a {_dtype_name(value.dtype)} tensor")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must have shape () or (B,) = ({batch},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} (the inputs' device), got {value.device}")
        check_values_in_range(name, value, low=low, high=high, check_values=check_values)
        return value, 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number or a tensor of shape () or (B,), got {describe(value)}")
    return None, check_real(name, value, low=low, high=high)


def check_lock(lock, batch: int, seqlen: int, *, name: str = "lock", check_values: bool = True) -> torch.Tensor:
    """Per-key-token lock weights: a tensor of shape (S,), (1, S) or (B, S), float in
    [0, 1] or bool.  A float or a list is a TypeError, an int tensor a TypeError, a wrong
    shape or (with ``check_values``, where host checks are allowed) a value outside
    [0, 1] or NaN a ValueError.  Returns a 2-D view (1 | B, S), dtype unchanged."""
    check_tensor(name, lock, dtypes=LOCK_DTYPES, layout="(S,), (1, S) or (B, S)")
    view = lock[None] if lock.dim() == 1 else lock
    if view.dim() != 2 or view.shape[1] != seqlen or view.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (S,), (1, S) or (B, S) with B={batch}, S={seqlen}, "
                         f"got {tuple(lock.shape)}")
    check_values_in_range(name, lock, low=0.0, high=1.0, check_values=check_values)
    return view


def check_mask(name: str, mask, *, ndim: int | Iterable[int], layout: str, check_values: bool = True) -> torch.Tensor:
    """An edit mask: bool or uint8 (nonzero = foreground) or float with values in [0, 1]
    (soft values allowed; read on the host where allowed)."""
    check_tensor(name, mask, dtypes=MASK_DTYPES, ndim=ndim, layout=layout)
    check_values_in_range(name, mask, low=0.0, high=1.0, check_values=check_values)
    return mask
