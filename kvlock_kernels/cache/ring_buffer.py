"""KV cache ring buffer: Python front of the C++ extension ``kvlock_kernels._C``.

KV-Lock's inversion mode stores the source keys/values of every (step, layer) during
inversion and replays them in reverse order while denoising.  For Wan2.1-1.3B at
480x832x81 that is 201 MB per layer per step in bf16 (121 GB for 20 steps), so the cache
lives in a fixed window of device slots backed by host memory::

    buf = KVRingBuffer(capacity=6, slot_shape=(S, H, D), dtype=torch.bfloat16,
                       device="cuda", host_spill=True)
    buf.put((step, layer), k, v)        # inversion pass
    buf.prefetch([(s, l) for ...])      # start bringing the next keys back
    k, v = buf.get((step, layer))       # denoising pass: views into a slot
    buf.discard((step, layer))          # after its last use: frees the slot, no spill

The slot table, the eviction order and the host store live in C++; on CUDA, spills and
bring-backs run on a dedicated copy stream ordered with events, and ``get`` makes the
current stream wait for its copy instead of blocking the host.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["KVRingBuffer", "extension_available"]

_BUILD_HINT = ("the C++ extension kvlock_kernels._C is not built: install with "
               "`pip install --no-build-isolation -e .` from the repository root (needs g++, and torch "
               "installed first)")
_loaded: Optional[bool] = None


def extension_available() -> bool:
    """Load ``kvlock_kernels._C`` (the ring buffer's C++ class) if it was built."""
    global _loaded
    if _loaded is None:
        spec = importlib.util.find_spec("kvlock_kernels._C")
        if spec is None or spec.origin is None or not os.path.exists(spec.origin):
            _loaded = False
        else:
            torch.ops.load_library(spec.origin)  # registers torch.classes.kvlock_kernels.*
            _loaded = True
    return _loaded


def _check_key(key):
    if (not isinstance(key, tuple) or len(key) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in key)):
        raise TypeError(f"key must be a (step, layer) tuple of two ints, got {key!r}")
    return key


class KVRingBuffer:
    """A ring of ``capacity`` device slots of (K, V) pairs keyed by (step, layer).

    Arguments:
        capacity: number of device slots (>= 1).
        slot_shape: shape of one K (and one V), e.g. (S, H, D) for one batch entry.
        dtype: element type of the slots.
        device: where the slots live ("cuda", "cuda:1", "cpu").
        host_spill: keep evicted entries in host memory (pinned on CUDA) instead of
            dropping them; ``get`` brings them back.
        compact: store only selected token rows: ``put(key, k, v, rows=index)``; ``get``
            returns ``(k_rows, v_rows, index)``.

    Without host_spill, putting into a full ring evicts the oldest resident entry (FIFO)
    and a later ``get`` of it raises KeyError.  Putting an existing key replaces it in
    place.  Tensors returned by ``get`` are views of a slot, valid until that slot is
    reused (a later ``put``/``get``/``prefetch`` that evicts it); ``pop`` returns copies.
    """

    def __init__(self, capacity: int, slot_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str, *, host_spill: bool = False, compact: bool = False):
        if not extension_available():
            raise RuntimeError(_BUILD_HINT)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        slot_shape = tuple(slot_shape)
        if not slot_shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in slot_shape):
            raise ValueError(f"slot_shape must be a non-empty sequence of ints >= 1, got {slot_shape!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.slot_shape, self.dtype, self.device = slot_shape, dtype, device
        self.host_spill, self.compact = bool(host_spill), bool(compact)
        self._impl = torch.classes.kvlock_kernels.KVRingBuffer(capacity, list(slot_shape), dtype, device,
                                                               self.host_spill, self.compact)

    def put(self, key, k: torch.Tensor, v: torch.Tensor, *, rows: Optional[torch.Tensor] = None) -> None:
        """Store k, v (each ``slot_shape``, the slot dtype and device) under key.
        rows (compact only): int64/int32 index of the token rows (dim 0) to keep."""
        step, layer = _check_key(key)
        for name, t in (("k", k), ("v", v), ("rows", rows)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        self._impl.put(step, layer, k, v, rows)

    def get(self, key):
        """(k, v) of key, or (k, v, rows) for a compact buffer.  KeyError if absent."""
        step, layer = _check_key(key)
        if not self._impl.contains(step, layer):
            raise KeyError(f"key {key} is not in the ring buffer (never stored, evicted, popped or cleared)")
        return tuple(self._impl.get(step, layer))

    def prefetch(self, keys: Iterable) -> None:
        """Start bringing spilled keys back into slots, in the given order (at most
        ``capacity`` of them), so that the following ``get`` finds them resident."""
        keys = [_check_key(k) for k in keys]
        missing = [k for k in keys if not self._impl.contains(*k)]
        if missing:
            raise KeyError(f"keys {missing} are not in the ring buffer")
        self._impl.prefetch([k[0] for k in keys], [k[1] for k in keys])

    def pop(self, key):
        """Remove key and return copies of its tensors (as ``get``)."""
        step, layer = _check_key(key)
        if not self._impl.contains(step, layer):
            raise KeyError(f"key {key} is not in the ring buffer")
        return tuple(self._impl.pop(step, layer))

    def discard(self, key) -> None:
        """Remove key without returning anything (no copy): after the last use of an
        entry, so that its slot is free for the next prefetch and it is never spilled."""
        step, layer = _check_key(key)
        if not self._impl.contains(step, layer):
            raise KeyError(f"key {key} is not in the ring buffer")
        self._impl.discard(step, layer)

    def is_resident(self, key) -> bool:
        """True when key currently holds a device slot."""
        return self._impl.is_resident(*_check_key(key))

    def keys(self):
        """Keys in eviction order (oldest resident first), then host-only keys."""
        return [tuple(k) for k in self._impl.keys()]

    def clear(self) -> None:
        """Forget every entry; the device slots stay allocated."""
        self._impl.clear()

    def __contains__(self, key) -> bool:
        return self._impl.contains(*_check_key(key))

    def __len__(self) -> int:
        return self._impl.size()

    @property
    def capacity(self) -> int:
        return self._impl.capacity()

    @property
    def device_nbytes(self) -> int:
        """Bytes of the device slots (K and V)."""
        return self._impl.device_nbytes()

    @property
    def host_nbytes(self) -> int:
        """Bytes of host copies currently held."""
        return self._impl.host_nbytes()

    def __repr__(self) -> str:
        return (f"KVRingBuffer(capacity={self.capacity}, slot_shape={self.slot_shape}, dtype={self.dtype}, "
                f"device={self.device}, host_spill={self.host_spill}, compact={self.compact}, len={len(self)})")
