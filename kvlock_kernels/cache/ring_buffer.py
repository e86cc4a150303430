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
current stream wait for its copy instead of blocking the host.  Every method is safe to
call from several threads (one mutex in C++ per buffer).

The extension is built ahead of time by ``pip install --no-build-isolation .``; when it is
missing (an isolated ``pip install .`` has no torch to build against), the first
``KVRingBuffer`` compiles it once from the sources shipped in the package into a cache
directory (see ``docs/install.md``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import numbers
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .._validate import check_bool, check_int, describe

__all__ = ["KVRingBuffer", "KeyRangeError", "extension_available", "load_extension", "extension_build_dir"]

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_JIT_NAME = "kvlock_kernels_C"
_SOURCES = ("kv_ring_buffer.cpp", "copy_kernels.cu", "copy_kernels.h")

_NOT_BUILT = ("the C++ extension kvlock_kernels._C (the KV ring buffer) is not built.  Either reinstall with "
              "`pip install --no-build-isolation .` (or `-e .` from a checkout) in an environment that already has "
              "torch and a C++ compiler, which builds it ahead of time, or let it build at first use (unset "
              "KVLOCK_NO_JIT; needs a C++ compiler and ninja)")
_NO_COMPILER = ("kvlock_kernels: {reason}, and no C++ compiler was found to build the KV ring buffer extension at "
                "first use (looked for {cxx!r}; set CXX to use another).  Install one and retry: "
                "Debian/Ubuntu `apt-get install g++`, Fedora/RHEL `dnf install gcc-c++`, conda "
                "`conda install -c conda-forge cxx-compiler`, macOS `xcode-select --install`.  Or install a build "
                "that has it: `pip install --no-build-isolation .` with torch and g++ present")
_NO_NINJA = ("building the KV ring buffer extension at first use needs ninja (torch.utils.cpp_extension.load): "
             "`pip install ninja`, then retry")

_load_lock = threading.Lock()
_library: Optional[str] = None  # path of the loaded shared library
_failure: Optional[str] = None  # why it could not be loaded (not retried in this process)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _prebuilt_path() -> Optional[str]:
    spec = importlib.util.find_spec("kvlock_kernels._C")
    if spec is None or spec.origin is None or not os.path.exists(spec.origin):
        return None
    return spec.origin


def _source_dir() -> Optional[Path]:
    """The C++ sources: shipped in the wheel as kvlock_kernels/_csrc, or csrc/ of a checkout."""
    package = Path(__file__).resolve().parent.parent
    for d in (package / "_csrc", package.parent / "csrc"):
        if (d / "kv_ring_buffer.cpp").is_file():
            return d
    return None


def _with_cuda(src: Path) -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and (src / "copy_kernels.cu").is_file()


def _build_flags(with_cuda: bool):
    cflags = ["-O3", "-std=c++20"]  # torch >= 2.13 headers use C++20 bit-field initialisers
    if with_cuda:
        cflags.append("-DKVLOCK_WITH_CUDA")
    return cflags, (["-O3"] if with_cuda else [])


def extension_build_dir(src: Optional[Path] = None) -> Path:
    """Where the first-use build goes: ``$KVLOCK_EXTENSION_DIR`` (default
    ``$XDG_CACHE_HOME/kvlock_kernels`` or ``~/.cache/kvlock_kernels``), one sub-directory per
    torch version, Python version, CUDA build and source content (a changed source or a
    torch upgrade builds afresh instead of loading a stale library)."""
    base = os.environ.get("KVLOCK_EXTENSION_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "kvlock_kernels")
    src = src if src is not None else _source_dir()
    with_cuda = src is not None and _with_cuda(src)
    digest = hashlib.sha256()
    if src is not None:
        for name in _SOURCES:
            if (src / name).is_file():
                digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    digest.update(repr(_build_flags(with_cuda)).encode())
    tag = (f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{'cu' + str(torch.version.cuda) if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}")
    return Path(base) / "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)


def _jit_build(reason: str) -> str:
    """Compile the extension from its sources into the cache directory (once) and load it."""
    src = _source_dir()
    if src is None:
        raise RuntimeError(f"{_NOT_BUILT} (no C++ sources found next to the package either: reinstall it)")
    build_dir = extension_build_dir(src)
    library = build_dir / f"{_JIT_NAME}.so"
    # A finished earlier build (no build holding the lock): load it, no compiler needed.
    if library.is_file() and not (build_dir / "lock").exists():
        try:
            torch.ops.load_library(str(library))
            return str(library)
        except OSError as exc:  # a damaged file (an interrupted link): build it again below
            reason = f"{reason}; the cached {library} does not load ({exc})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(_NO_COMPILER.format(reason=reason, cxx=cxx))
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"kvlock_kernels: {reason}; {_NO_NINJA}")
    with_cuda = _with_cuda(src)
    cflags, cuda_cflags = _build_flags(with_cuda)
    sources = [str(src / "kv_ring_buffer.cpp")] + ([str(src / "copy_kernels.cu")] if with_cuda else [])
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"kvlock_kernels: {reason}; building the KV ring buffer extension (one time, ~1 min) into {build_dir} ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        # Another process building the same directory holds its lock: load() waits for it.
        cpp_extension.load(name=_JIT_NAME, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                           extra_include_paths=[str(src)], build_directory=str(build_dir), with_cuda=with_cuda,
                           is_python_module=False, verbose=_env_flag("KVLOCK_VERBOSE_BUILD"))
    except Exception as exc:  # compiler errors come as RuntimeError/CalledProcessError with the log
        raise RuntimeError(f"kvlock_kernels: building the KV ring buffer extension in {build_dir} failed "
                           f"(set KVLOCK_VERBOSE_BUILD=1 to see the commands): {exc}") from exc
    print(f"kvlock_kernels: KV ring buffer extension built in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return str(library)


def _load() -> str:
    reason = "the prebuilt kvlock_kernels._C is not installed"
    if _env_flag("KVLOCK_FORCE_JIT"):
        reason = "KVLOCK_FORCE_JIT=1"
    else:
        prebuilt = _prebuilt_path()
        if prebuilt is not None:
            try:
                torch.ops.load_library(prebuilt)  # registers torch.classes.kvlock_kernels.*
                return prebuilt
            except OSError as exc:  # built against another torch: undefined symbols
                reason = f"the prebuilt {prebuilt} does not load with this torch ({exc})"
    if _env_flag("KVLOCK_NO_JIT"):
        raise RuntimeError(f"{_NOT_BUILT} ({reason}; KVLOCK_NO_JIT=1 forbids building it at first use)")
    return _jit_build(reason)


def load_extension() -> str:
    """Load the ring buffer's C++ class and return the library's path: the prebuilt
    ``kvlock_kernels._C``, or else a build at first use (see the module docstring).

    Raises RuntimeError saying what is missing and how to get it; a failure is remembered
    for the rest of the process (no second one-minute attempt)."""
    global _library, _failure
    with _load_lock:
        if _library is not None:
            return _library
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            _library = _load()
        except RuntimeError as exc:
            _failure = str(exc)
            raise
        return _library


def extension_available() -> bool:
    """True when the ring buffer's C++ class is loaded or could be loaded now; this may
    compile it (once) when the prebuilt ``kvlock_kernels._C`` is missing."""
    try:
        load_extension()
    except RuntimeError:
        return False
    return True


class KeyRangeError(KeyError, TypeError):
    """A key whose step or layer does not fit in int64: it can never be stored (a
    TypeError: keys are pairs of int64) and so is never in the buffer (a KeyError)."""


def _check_key(key) -> tuple[int, int]:
    if not isinstance(key, tuple) or len(key) != 2 or any(
            isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in key):
        raise TypeError(f"key must be a (step, layer) tuple of two ints, got {key!r}")
    step, layer = int(key[0]), int(key[1])
    for name, x in (("step", step), ("layer", layer)):
        if not _INT64_MIN <= x <= _INT64_MAX:
            raise KeyRangeError(f"key {(step, layer)}: {name} must fit in int64 ([-2**63, 2**63 - 1]), got {x}")
    return step, layer


def _key_list(keys) -> list:
    """prefetch's ``keys``: an iterable of keys (a single key is a mistake worth naming)."""
    if isinstance(keys, tuple) and len(keys) == 2 and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in keys):
        raise TypeError(f"keys must be an iterable of (step, layer) keys, got the single key {keys!r}: "
                        "use prefetch([key])")
    if isinstance(keys, (str, bytes, torch.Tensor)):
        raise TypeError(f"keys must be an iterable of (step, layer) keys, got {describe(keys)}")
    try:
        return list(keys)
    except TypeError:
        raise TypeError(f"keys must be an iterable of (step, layer) keys, got {describe(keys)}") from None


def _check_slot_shape(slot_shape) -> tuple[int, ...]:
    try:
        if isinstance(slot_shape, (str, bytes, torch.Tensor)):
            raise TypeError
        shape = tuple(slot_shape)
    except TypeError:
        raise TypeError(f"slot_shape must be a sequence of ints, got {describe(slot_shape)}") from None
    if not shape:
        raise ValueError("slot_shape must have at least one dimension, got ()")
    return tuple(check_int(f"slot_shape[{i}]", d, low=1) for i, d in enumerate(shape))


def _check_device(device) -> torch.device:
    """A cpu or cuda device (an available one), with the CUDA index filled in."""
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0', got "
                        f"{describe(device)}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:  # an unknown device string, or an int without an accelerator
        raise ValueError(f"device must name a cpu or cuda device, got {device!r} ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if device.type == "cpu":
        return torch.device("cpu")  # CPU tensors carry no index: "cpu:0" is the same place
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {device} but CUDA is not available in this torch "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device is {device} but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def _key_error(exc: IndexError, fallback: str) -> KeyError:
    lines = str(exc).strip().splitlines()
    return KeyError(lines[0] if lines else fallback)


class KVRingBuffer:
    """A ring of ``capacity`` device slots of (K, V) pairs keyed by (step, layer).

    Arguments:
        capacity: number of device slots (>= 1).
        slot_shape: shape of one K (and one V), e.g. (S, H, D) for one batch entry.
        dtype: element type of the slots.
        device: where the slots live ("cuda", "cuda:1", "cpu"); an available cpu or cuda
            device (ValueError otherwise).
        host_spill: keep evicted entries in host memory (pinned on CUDA) instead of
            dropping them; ``get`` brings them back.
        compact: store only selected token rows: ``put(key, k, v, rows=index)``; ``get``
            returns ``(k_rows, v_rows, index)``.

    Keys are ``(step, layer)`` tuples of two ints that fit in int64.  A malformed key
    raises TypeError; a key outside int64 raises :class:`KeyRangeError` (both a
    TypeError and a KeyError); an absent key raises KeyError.

    Eviction is FIFO over resident entries: putting a new key into a full ring evicts the
    oldest resident entry (dropped without host_spill, so a later ``get`` raises KeyError;
    copied to the host with it).  Putting an existing key replaces it in place and keeps
    its position.  Bringing a host-only entry back (``get``/``prefetch``) appends it.

    Tensors returned by ``get`` are views of a slot, valid until that slot is reused (a
    later ``put``/``get``/``prefetch`` that evicts it, from any thread); ``get(copy=True)``
    and ``pop`` return copies.  Slots are plain storage: they never require grad.

    Every method is thread-safe and atomic (one C++ call under the buffer's mutex): e.g.
    ``get`` either returns the entry or raises KeyError, never a half-updated state.
    """

    def __init__(self, capacity: int, slot_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str, *, host_spill: bool = False, compact: bool = False):
        capacity = check_int("capacity", capacity, low=1)
        slot_shape = _check_slot_shape(slot_shape)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {describe(dtype)}")
        if capacity * math.prod(slot_shape) > _INT64_MAX:
            raise ValueError(f"capacity * prod(slot_shape) must fit in int64 (the slots are one tensor), got "
                             f"capacity={capacity}, slot_shape={slot_shape}")
        device = _check_device(device)
        host_spill, compact = check_bool("host_spill", host_spill), check_bool("compact", compact)
        load_extension()  # RuntimeError saying how to get the extension
        self.slot_shape, self.dtype, self.device = slot_shape, dtype, device
        self.host_spill, self.compact = host_spill, compact
        self._impl = torch.classes.kvlock_kernels.KVRingBuffer(capacity, list(slot_shape), dtype, device,
                                                               host_spill, compact)

    def put(self, key, k: torch.Tensor, v: torch.Tensor, *, rows: Optional[torch.Tensor] = None) -> None:
        """Store a copy of k, v under key.

        k, v: ``slot_shape``, the slot dtype and device (dense, any strides).
        rows (compact only): (n,) int64/int32 index of the token rows (dim 0) to keep, on
        the CPU or the slot device, n <= slot_shape[0], values in [0, slot_shape[0]);
        default: all rows."""
        step, layer = _check_key(key)
        for name, t in (("k", k), ("v", v), ("rows", rows)):
            if (t is not None or name != "rows") and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        self._impl.put(step, layer, k, v, rows)

    def get(self, key, *, copy: bool = False):
        """(k, v) of key, or (k, v, rows) for a compact buffer; KeyError if absent.

        Views of the slot unless ``copy=True`` (copies taken atomically, safe to keep
        while other threads use the buffer).  A host-only entry is brought back first."""
        step, layer = _check_key(key)
        copy = check_bool("copy", copy)
        try:
            return tuple(self._impl.get(step, layer, copy))
        except IndexError as exc:
            raise KeyError(f"key {(step, layer)} is not in the ring buffer (never stored, evicted without "
                           "host_spill, popped, discarded or cleared)") from exc

    def prefetch(self, keys: Iterable) -> None:
        """Bring keys back into device slots ahead of their ``get``.

        Guarantee: let K be the distinct keys in the given order and n = min(len(K),
        capacity).  Afterwards the first n keys of K are all resident; the ones that were
        not are brought in in that order (appended to the eviction order).  Room is made
        by evicting the oldest resident entries that are not among those n, so prefetch
        never evicts a key it brings in or one of them that was already resident.  Keys
        past the first n are ignored.  KeyError (and no change) if any key is absent."""
        checked = [_check_key(k) for k in _key_list(keys)]
        try:
            self._impl.prefetch([k[0] for k in checked], [k[1] for k in checked])
        except IndexError as exc:
            raise _key_error(exc, "prefetch: a key is not in the ring buffer") from exc

    def pop(self, key):
        """Remove key and return copies of its tensors (as ``get``); KeyError if absent."""
        step, layer = _check_key(key)
        try:
            return tuple(self._impl.pop(step, layer))
        except IndexError as exc:
            raise _key_error(exc, f"key {(step, layer)} is not in the ring buffer") from exc

    def discard(self, key) -> None:
        """Remove key without returning anything (no copy): after the last use of an
        entry, so that its slot is free for the next prefetch and it is never spilled.
        KeyError if absent."""
        step, layer = _check_key(key)
        try:
            self._impl.discard(step, layer)
        except IndexError as exc:
            raise _key_error(exc, f"key {(step, layer)} is not in the ring buffer") from exc

    def is_resident(self, key) -> bool:
        """True when key currently holds a device slot."""
        return self._impl.is_resident(*_check_key(key))

    def keys(self) -> list[tuple[int, int]]:
        """Resident keys in eviction order (oldest first), then host-only keys sorted."""
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
    def resident_count(self) -> int:
        """Number of entries holding a device slot (<= capacity)."""
        return self._impl.resident_count()

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
