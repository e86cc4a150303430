"""KVRingBuffer (C++ extension): exact round trips, FIFO eviction, host spill with the
reverse-order replay of an inversion, compaction, the prefetch guarantee, bad input that
leaves the table intact, no leak over 10,000 cycles, threads hammering one buffer, and a
hypothesis state machine against a pure-Python model."""
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvlock_kernels.cache.ring_buffer as rb
from kvlock_kernels import KVRingBuffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOT = (37, 3, 8)


def test_extension_is_built():
    """The README's install command builds kvlock_kernels._C (CI installs from a clean clone),
    with the CUDA copy kernels exactly when torch has CUDA and nvcc is there (setup.py's rule)."""
    from torch.utils.cpp_extension import CUDA_HOME

    assert rb.extension_available()
    assert rb.load_extension() == rb._prebuilt_path()
    expected = torch.version.cuda is not None and CUDA_HOME is not None
    assert torch.ops.kvlock_kernels.ring_buffer_built_with_cuda() is expected


def kv(seed, dtype=torch.bfloat16, shape=SLOT):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).to(dtype), (torch.randn(shape, generator=g) * 100).to(dtype)


def bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def snapshot(buf, store):
    """Every stored key still returns its exact bytes."""
    for key, (k, v) in store.items():
        got = buf.get(key)
        assert bits_equal(got[0], k) and bits_equal(got[1], v), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("host_spill", [False, True])
def test_round_trip_exact(dtype, host_spill):
    buf = KVRingBuffer(3, SLOT, dtype, "cpu", host_spill=host_spill)
    k, v = kv(1, dtype)
    k[0, 0, 0], v[0, 0, 1] = float("nan"), float("-inf")
    buf.put((0, 0), k, v)
    gk, gv = buf.get((0, 0))
    assert bits_equal(gk, k) and bits_equal(gv, v)
    assert (0, 0) in buf and len(buf) == 1 and buf.capacity == 3
    assert buf.device_nbytes == 2 * 3 * k.numel() * k.element_size()


def test_fifo_eviction_without_spill():
    buf = KVRingBuffer(3, SLOT, torch.float32, "cpu")
    store = {(s, 0): kv(s, torch.float32) for s in range(5)}
    for key, (k, v) in store.items():
        buf.put(key, k, v)
    assert buf.keys() == [(2, 0), (3, 0), (4, 0)] and len(buf) == 3
    for evicted in ((0, 0), (1, 0)):
        assert evicted not in buf
        with pytest.raises(KeyError, match=rf"key \({evicted[0]}, 0\) is not in the ring buffer"):
            buf.get(evicted)
    snapshot(buf, {k: store[k] for k in [(2, 0), (3, 0), (4, 0)]})
    assert buf.host_nbytes == 0


def test_put_same_key_replaces_in_place():
    buf = KVRingBuffer(2, SLOT, torch.float32, "cpu")
    buf.put((0, 0), *kv(0, torch.float32))
    buf.put((1, 0), *kv(1, torch.float32))
    new = kv(7, torch.float32)
    buf.put((0, 0), *new)
    assert len(buf) == 2 and buf.keys() == [(0, 0), (1, 0)]  # kept its FIFO position
    snapshot(buf, {(0, 0): new, (1, 0): kv(1, torch.float32)})


def test_reverse_replay_of_inversion_through_six_slots_with_spill():
    """20 steps x 4 layers stored in inversion order, replayed in reverse step order with
    prefetch: every entry comes back exact, and every get finds its key resident."""
    steps, layers = 20, 4
    buf = KVRingBuffer(6, SLOT, torch.bfloat16, "cpu", host_spill=True)
    store = {}
    for s in range(steps):
        for layer in range(layers):
            store[(s, layer)] = kv(s * layers + layer)
            buf.put((s, layer), *store[(s, layer)])
    assert len(buf) == steps * layers and buf.host_nbytes > 0
    order = [(s, layer) for s in reversed(range(steps)) for layer in range(layers)]
    for i, key in enumerate(order):
        if i % 4 == 0:
            buf.prefetch(order[i:i + 4])
        assert buf.is_resident(key)
        k, v = buf.get(key)
        assert bits_equal(k, store[key][0]) and bits_equal(v, store[key][1]), key
    # Host copies are kept: spilled entries evicted again cost no copy, host bytes stay bounded.
    per_entry = 2 * store[(0, 0)][0].numel() * 2
    assert buf.host_nbytes <= steps * layers * per_entry


@pytest.mark.parametrize("kind", ["empty", "full", "random"])
@pytest.mark.parametrize("host_spill", [False, True])
def test_compaction(kind, host_spill):
    S = SLOT[0]
    rows = {"empty": torch.empty(0, dtype=torch.long), "full": torch.arange(S),
            "random": torch.randperm(S)[:11].sort().values}[kind]
    buf = KVRingBuffer(2, SLOT, torch.float16, "cpu", host_spill=host_spill, compact=True)
    k, v = kv(3, torch.float16)
    buf.put((0, 0), k, v, rows=rows.to(torch.int32) if kind == "random" else rows)
    rows_before = rows.clone()
    rows.fill_(0) if rows.numel() else None  # the buffer keeps its own index copy
    ck, cv, idx = buf.get((0, 0))
    assert ck.shape == (rows_before.numel(), *SLOT[1:])
    assert bits_equal(ck, k[rows_before]) and bits_equal(cv, v[rows_before])
    assert torch.equal(idx, rows_before)
    if host_spill:  # push it out and bring it back
        buf.put((1, 0), *kv(4, torch.float16), rows=torch.arange(S))
        buf.put((2, 0), *kv(5, torch.float16), rows=torch.arange(S))
        assert not buf.is_resident((0, 0))
        ck, cv, idx = buf.get((0, 0))
        assert bits_equal(ck, k[rows_before]) and torch.equal(idx, rows_before)


def test_compact_without_rows_stores_everything():
    buf = KVRingBuffer(1, SLOT, torch.float32, "cpu", compact=True)
    k, v = kv(2, torch.float32)
    buf.put((0, 0), k, v)
    ck, cv, idx = buf.get((0, 0))
    assert bits_equal(ck, k) and torch.equal(idx, torch.arange(SLOT[0]))


def test_pop_returns_copies_and_frees():
    buf = KVRingBuffer(2, SLOT, torch.float32, "cpu", host_spill=True)
    store = {(s, 1): kv(s, torch.float32) for s in range(3)}
    for key, val in store.items():
        buf.put(key, *val)
    k, v = buf.pop((0, 1))  # spilled entry
    assert bits_equal(k, store[(0, 1)][0]) and (0, 1) not in buf and len(buf) == 2
    k, v = buf.pop((2, 1))
    buf.put((5, 5), *kv(9, torch.float32))
    assert bits_equal(k, store[(2, 1)][0])  # a copy, not a view of the reused slot
    with pytest.raises(KeyError):
        buf.pop((2, 1))


def test_replay_with_discard_never_spills_used_entries():
    """The intended denoising pattern: get, use, discard; prefetch then only fills free slots."""
    buf = KVRingBuffer(4, SLOT, torch.bfloat16, "cpu", host_spill=True)
    store = {(s, 0): kv(s) for s in range(12)}
    for key, val in store.items():
        buf.put(key, *val)
    spilled_bytes = buf.host_nbytes  # 8 entries went to the host during the puts
    order = sorted(store, reverse=True)
    for j, key in enumerate(order):
        if j % 4 == 0:
            buf.prefetch(order[j:j + 4])
        k, v = buf.get(key)
        assert bits_equal(k, store[key][0]) and bits_equal(v, store[key][1])
        buf.discard(key)
    assert len(buf) == 0 and buf.host_nbytes == 0 and spilled_bytes == 8 * 2 * k.numel() * 2
    with pytest.raises(KeyError):
        buf.discard((0, 0))


def test_clear():
    buf = KVRingBuffer(2, SLOT, torch.float32, "cpu", host_spill=True)
    for s in range(3):
        buf.put((s, 0), *kv(s, torch.float32))
    buf.clear()
    assert len(buf) == 0 and buf.host_nbytes == 0 and buf.keys() == []
    with pytest.raises(KeyError, match=r"key \(1, 0\)"):
        buf.get((1, 0))
    buf.put((1, 0), *kv(1, torch.float32))
    snapshot(buf, {(1, 0): kv(1, torch.float32)})


@pytest.mark.parametrize("call, exc, msg", [
    (lambda b: b.put((9, 0), torch.zeros(37, 3, 7, dtype=torch.bfloat16), torch.zeros(SLOT, dtype=torch.bfloat16)),
     ValueError, r"k must have the slot shape \(37, 3, 8\), got \(37, 3, 7\)"),
    (lambda b: b.put((9, 0), torch.zeros(SLOT, dtype=torch.bfloat16), torch.zeros(SLOT)),
     TypeError, "v must have the slot dtype BFloat16, got Float"),
    (lambda b: b.put((9, 0), torch.zeros(SLOT, dtype=torch.bfloat16, device="meta"),
                     torch.zeros(SLOT, dtype=torch.bfloat16)), ValueError, "k must be on the slot device cpu"),
    (lambda b: b.put((9, 0), *kv(0), rows=torch.arange(3)), ValueError, "compact=True"),
    (lambda b: b.put([9, 0], *kv(0)), TypeError, r"key must be a \(step, layer\) tuple"),
    (lambda b: b.put((9, "a"), *kv(0)), TypeError, r"key must be a \(step, layer\) tuple"),
    (lambda b: b.put((9, True), *kv(0)), TypeError, r"key must be a \(step, layer\) tuple"),
    (lambda b: b.get((9,)), TypeError, r"key must be a \(step, layer\) tuple"),
    (lambda b: b.get((9, 0)), KeyError, r"key \(9, 0\) is not in the ring buffer"),
    (lambda b: b.prefetch([(0, 0), (9, 0)]), KeyError, r"\(9, 0\)"),
    (lambda b: b.put((9, 0), "k", "v"), TypeError, "k must be a torch.Tensor"),
    (lambda b: b.put((9, 0), kv(0)[0], None), TypeError, "v must be a torch.Tensor"),
    (lambda b: b.put((2 ** 63, 0), *kv(0)), rb.KeyRangeError, r"step must fit in int64"),
    (lambda b: b.get((0, -(2 ** 63) - 1)), KeyError, r"layer must fit in int64"),
    (lambda b: b.prefetch([(0, 0), (1, 2 ** 64)]), TypeError, r"layer must fit in int64"),
    (lambda b: b.prefetch([(0, 0), (1, 0.5)]), TypeError, r"key must be a \(step, layer\) tuple"),
    (lambda b: b.pop((9, 0)), KeyError, r"key \(9, 0\) is not in the ring buffer"),
    (lambda b: b.discard((9, 0)), KeyError, r"key \(9, 0\) is not in the ring buffer"),
    # Layouts the slots cannot take used to fail inside copy_ after the table had changed.
    (lambda b: b.put((9, 0), kv(0)[0].to_sparse(), kv(0)[1]), TypeError, "k must be a dense"),
    (lambda b: b.put((0, 0), kv(0)[0], kv(0)[1].to_sparse()), TypeError, "v must be a dense"),
    (lambda b: b.get((0, 0), copy="no"), TypeError, "copy must be a bool"),
    (lambda b: b.prefetch((0, 0)), TypeError, r"got the single key \(0, 0\): use prefetch\(\[key\]\)"),
    (lambda b: b.prefetch(None), TypeError, r"keys must be an iterable of \(step, layer\) keys, got None"),
    (lambda b: b.prefetch(3), TypeError, "keys must be an iterable"),
])
def test_bad_input_leaves_table_intact(call, exc, msg):
    buf = KVRingBuffer(2, SLOT, torch.bfloat16, "cpu", host_spill=True)
    store = {(s, 0): kv(s) for s in range(3)}
    for key, val in store.items():
        buf.put(key, *val)
    keys_before, host_before = buf.keys(), buf.host_nbytes
    with pytest.raises(exc, match=msg):
        call(buf)
    assert buf.keys() == keys_before and buf.host_nbytes == host_before
    snapshot(buf, store)


@pytest.mark.parametrize("rows, exc, msg", [
    (torch.tensor([0, 37]), ValueError, r"rows must lie in \[0, 37\), got min 0, max 37"),
    (torch.tensor([-1, 3]), ValueError, r"rows must lie in \[0, 37\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "rows must be an int64 or int32 index tensor"),
    (torch.zeros(2, 2, dtype=torch.long), ValueError, "rows must be 1-D"),
    (torch.zeros(38, dtype=torch.long), ValueError, "rows must select at most 37 rows"),
    (torch.tensor([0, 1], device="meta"), ValueError, "rows must be on cpu or the slot device"),
    (torch.tensor([0, 1]).to_sparse(), TypeError, "rows must be a dense"),
])
def test_bad_rows_leave_table_intact(rows, exc, msg):
    buf = KVRingBuffer(2, SLOT, torch.bfloat16, "cpu", host_spill=True, compact=True)
    k, v = kv(0)
    buf.put((0, 0), k, v, rows=torch.arange(5))
    with pytest.raises(exc, match=msg):
        buf.put((0, 0), *kv(1), rows=rows)
    ck, cv, idx = buf.get((0, 0))
    assert bits_equal(ck, k[:5]) and torch.equal(idx, torch.arange(5)) and len(buf) == 1


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(capacity=0), ValueError, "capacity must be an int >= 1"),
    (dict(capacity=1.5), TypeError, "capacity must be an int, got float"),
    (dict(capacity=True), TypeError, "capacity must be an int, got bool"),
    (dict(capacity=2 ** 63), ValueError, r"capacity \* prod\(slot_shape\) must fit in int64"),
    (dict(slot_shape=(4, 0)), ValueError, r"slot_shape\[1\] must be an int >= 1"),
    (dict(slot_shape=()), ValueError, "slot_shape must have at least one dimension"),
    (dict(slot_shape=(4, 3.0)), TypeError, r"slot_shape\[1\] must be an int, got float"),
    (dict(slot_shape=4), TypeError, "slot_shape must be a sequence of ints, got int"),
    (dict(slot_shape="43"), TypeError, "slot_shape must be a sequence of ints, got str"),
    (dict(slot_shape=(2 ** 62, 2 ** 62)), ValueError, "must fit in int64"),
    (dict(dtype="bf16"), TypeError, "dtype must be a torch.dtype"),
    (dict(device="nonsense"), ValueError, "device must name a cpu or cuda device"),
    (dict(device="meta"), ValueError, "device must be cpu or cuda, got meta"),
    (dict(device=None), TypeError, "device must be a torch.device or a string"),
    (dict(device=1.5), TypeError, "device must be a torch.device or a string"),
    pytest.param(dict(device="cuda"), ValueError, "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    (dict(host_spill=1), TypeError, "host_spill must be a bool"),
    (dict(compact="yes"), TypeError, "compact must be a bool"),
])
def test_bad_construction(kwargs, exc, msg):
    args = dict(capacity=2, slot_shape=SLOT, dtype=torch.bfloat16, device="cpu")
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        KVRingBuffer(**args)


def test_cpu_device_with_an_index_is_the_cpu():
    """CPU tensors carry no index: a buffer built with "cpu:0" takes ordinary CPU tensors."""
    buf = KVRingBuffer(1, (4,), torch.float32, "cpu:0")
    assert buf.device == torch.device("cpu")
    buf.put((0, 0), *_filled(2))
    assert torch.equal(buf.get((0, 0))[0], _filled(2)[0])


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader as in a process that has not loaded the extension yet, with no prebuilt
    library and a private build cache (the class stays registered in this process: these
    tests check what the loader decides and says, not a second load)."""
    monkeypatch.setattr(rb, "_library", None)
    monkeypatch.setattr(rb, "_failure", None)
    monkeypatch.setattr(rb, "_prebuilt_path", lambda: None)
    monkeypatch.setenv("KVLOCK_EXTENSION_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KVLOCK_FORCE_JIT", raising=False)
    monkeypatch.delenv("KVLOCK_NO_JIT", raising=False)
    return tmp_path


def test_missing_extension_without_first_use_build_says_how_to_build(fresh_loader, monkeypatch):
    monkeypatch.setenv("KVLOCK_NO_JIT", "1")
    assert not rb.extension_available()
    with pytest.raises(RuntimeError, match=r"not built.*pip install --no-build-isolation .*KVLOCK_NO_JIT=1"):
        KVRingBuffer(2, SLOT, torch.bfloat16, "cpu")


def test_first_use_build_without_a_compiler_says_how_to_get_one(fresh_loader, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_loader / "no-such-c++"))
    with pytest.raises(RuntimeError, match=r"not installed, and no C\+\+ compiler was found.*apt-get install g\+\+"):
        KVRingBuffer(2, SLOT, torch.bfloat16, "cpu")
    monkeypatch.delenv("CXX")
    # Remembered for the process: no second (one-minute) attempt, the same message.
    assert not rb.extension_available()
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler was found"):
        rb.load_extension()
    assert not (fresh_loader / "cache").exists()  # nothing was half-built


def test_prebuilt_library_that_does_not_load_falls_back_to_a_build(fresh_loader, monkeypatch):
    """A _C built against another torch (undefined symbols) is not a dead end: the loader
    says so and goes to the first-use build (here stopped by a missing compiler)."""
    broken = fresh_loader / "_C.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setattr(rb, "_prebuilt_path", lambda: str(broken))
    monkeypatch.setenv("CXX", str(fresh_loader / "no-such-c++"))
    with pytest.raises(RuntimeError, match=r"does not load with this torch.*no C\+\+ compiler"):
        rb.load_extension()


def test_build_dir_follows_env_and_source_content(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLOCK_EXTENSION_DIR", str(tmp_path))
    d = rb.extension_build_dir()
    assert d.parent == tmp_path and torch.__version__.split("+")[0] in d.name
    assert rb.extension_build_dir() == d  # stable
    src = tmp_path / "src"
    src.mkdir()
    for name in ("kv_ring_buffer.cpp", "copy_kernels.cu", "copy_kernels.h"):
        shutil.copy(os.path.join(ROOT, "csrc", name), src / name)
    assert rb.extension_build_dir(src) == d
    with open(src / "kv_ring_buffer.cpp", "a") as f:
        f.write("\n// changed\n")
    assert rb.extension_build_dir(src) != d  # a changed source never loads a stale library


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_over_10000_cycles():
    buf = KVRingBuffer(4, (64, 2, 16), torch.bfloat16, "cpu", host_spill=True, compact=False)
    k, v = torch.randn(64, 2, 16).bfloat16(), torch.randn(64, 2, 16).bfloat16()

    def cycles(n, start):
        for i in range(start, start + n):
            buf.put((i, 0), k, v)
            buf.get((i - 3 if i >= 3 else i, 0))
            if i >= 8:
                buf.pop((i - 8, 0))  # host copies are released too

    cycles(1000, 0)
    before = _rss_bytes()
    cycles(10000, 1000)
    grown = _rss_bytes() - before
    assert len(buf) == 8
    assert grown < 4 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.1f} MiB over 10,000 cycles"


def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:  # the project's machines and CI have nvcc; elsewhere nothing to check
        pytest.skip("nvcc not found")
    for arch in ("80", "90"):
        out = tmp_path / f"copy_kernels_sm{arch}.o"
        proc = subprocess.run([nvcc, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                               os.path.join(ROOT, "csrc", "copy_kernels.cu"), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0


def test_cuda_branch_of_the_extension_compiles(tmp_path):
    """The CUDA-only lines of kv_ring_buffer.cpp (gather kernel launch on the current
    stream) are compiled here too, against this torch's headers, so a CPU-only CI still
    catches their errors."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    gxx = shutil.which("g++")
    if gxx is None:  # the README install needs g++ anyway; without it there is no extension
        pytest.skip("g++ not found")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    proc = subprocess.run([gxx, "-std=c++20", "-fsyntax-only", "-DKVLOCK_WITH_CUDA", abi, *includes,
                           os.path.join(ROOT, "csrc", "kv_ring_buffer.cpp")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------
# Issue 12 regressions: prefetch guarantee, slots never require grad, int64 keys.


def _filled(value, shape=(4,), dtype=torch.float32):
    return torch.full(shape, float(value), dtype=dtype), torch.full(shape, float(-value), dtype=dtype)


def test_prefetch_never_evicts_a_key_it_names():
    """The issue's reproducer: capacity 2, resident [(0, 1), (0, 2)], (0, 0) on the host;
    prefetch([(0, 1), (0, 0)]) must leave both resident (it used to evict (0, 1))."""
    buf = KVRingBuffer(2, (4,), torch.float32, "cpu", host_spill=True)
    for layer in (0, 1, 2):
        buf.put((0, layer), *_filled(layer))
    assert buf.keys() == [(0, 1), (0, 2), (0, 0)]
    buf.prefetch([(0, 1), (0, 0)])
    assert buf.is_resident((0, 1)) and buf.is_resident((0, 0)) and not buf.is_resident((0, 2))
    # (0, 1) kept its place, (0, 0) was appended, (0, 2) (not named) made the room.
    assert buf.keys() == [(0, 1), (0, 0), (0, 2)]
    for layer in (0, 1, 2):
        k, v = buf.get((0, layer))
        assert torch.equal(k, _filled(layer)[0]) and torch.equal(v, _filled(layer)[1])


@pytest.mark.parametrize("compact", [False, True])
def test_prefetch_more_keys_than_capacity(compact):
    """Only the first `capacity` distinct keys are brought in (duplicates count once), in
    order; later keys are ignored, so they cannot push out the earlier ones."""
    buf = KVRingBuffer(3, (4,), torch.float32, "cpu", host_spill=True, compact=compact)
    for s in range(8):
        buf.put((s, 0), *_filled(s))
    assert buf.keys() == [(5, 0), (6, 0), (7, 0), (0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]
    buf.prefetch([(1, 0), (1, 0), (6, 0), (1, 0), (2, 0), (3, 0), (4, 0)])
    assert buf.keys()[:3] == [(6, 0), (1, 0), (2, 0)] and buf.resident_count == 3
    assert not buf.is_resident((3, 0)) and not buf.is_resident((4, 0))
    for s in range(8):
        assert torch.equal(buf.get((s, 0))[0], _filled(s)[0])


def test_prefetch_with_a_missing_key_changes_nothing():
    buf = KVRingBuffer(2, (4,), torch.float32, "cpu", host_spill=True)
    for s in range(4):
        buf.put((s, 0), *_filled(s))
    before, host = buf.keys(), buf.host_nbytes
    with pytest.raises(KeyError, match=r"keys \[\(9, 0\), \(8, 1\)\] are not in the ring buffer"):
        buf.prefetch([(0, 0), (9, 0), (1, 0), (8, 1), (9, 0)])
    assert buf.keys() == before and buf.host_nbytes == host


def test_put_of_a_tensor_that_requires_grad_leaves_slots_plain():
    buf = KVRingBuffer(3, (4,), torch.float32, "cpu", host_spill=True, compact=True)
    buf.put((0, 0), *_filled(1))
    w = torch.randn(4, requires_grad=True)
    k = w * 2  # part of a graph
    buf.put((1, 0), k, w, rows=torch.tensor([0, 2]))
    with torch.enable_grad():
        buf.put((2, 0), w, k)
    for key in ((0, 0), (1, 0), (2, 0)):
        for t in buf.get(key) + buf.get(key, copy=True) + buf.pop(key):
            assert not t.requires_grad and t.grad_fn is None, key
    assert torch.equal(k.detach(), w.detach() * 2) and w.grad is None  # the inputs are untouched


@pytest.mark.parametrize("key", [(2 ** 63, 0), (0, 2 ** 63), (-(2 ** 63) - 1, 0), (2 ** 80, -(2 ** 70))])
def test_keys_outside_int64_are_a_clear_type_and_key_error(key):
    buf = KVRingBuffer(2, (4,), torch.float32, "cpu")
    buf.put((2 ** 63 - 1, -(2 ** 63)), *_filled(3))  # the int64 extremes are fine
    calls = [lambda: buf.put(key, *_filled(1)), lambda: buf.get(key), lambda: buf.pop(key),
             lambda: buf.discard(key), lambda: buf.prefetch([key]), lambda: key in buf,
             lambda: buf.is_resident(key)]
    for call in calls:
        with pytest.raises(rb.KeyRangeError, match=r"must fit in int64") as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, KeyError)
    assert buf.keys() == [(2 ** 63 - 1, -(2 ** 63))]
    assert torch.equal(buf.get((2 ** 63 - 1, -(2 ** 63)))[0], _filled(3)[0])


def test_numpy_integer_keys_are_the_same_keys():
    np = pytest.importorskip("numpy")
    buf = KVRingBuffer(2, (4,), torch.float32, "cpu")
    buf.put((np.int64(3), np.int32(1)), *_filled(5))
    assert buf.keys() == [(3, 1)] and (3, 1) in buf and type(buf.keys()[0][0]) is int
    assert torch.equal(buf.get((3, 1))[0], _filled(5)[0])
    with pytest.raises(TypeError, match=r"key must be a \(step, layer\) tuple"):
        buf.get((np.float64(3), 1))
    with pytest.raises(TypeError, match=r"key must be a \(step, layer\) tuple"):
        buf.get((torch.tensor(3), 1))


def test_get_copy_is_independent_of_the_slot():
    buf = KVRingBuffer(1, (4,), torch.float32, "cpu")
    buf.put((0, 0), *_filled(1))
    view, copy = buf.get((0, 0))[0], buf.get((0, 0), copy=True)[0]
    buf.put((1, 0), *_filled(2))  # evicts (0, 0) and reuses its slot
    assert torch.equal(view, _filled(2)[0])  # what "valid until the slot is reused" means
    assert torch.equal(copy, _filled(1)[0])


@pytest.mark.parametrize("compact", [False, True])
def test_put_of_a_view_returned_by_get(compact):
    """get() then put() of those views under another key while the ring is full: the put
    may evict the very slot it reads from; the stored bytes are still the view's bytes."""
    buf = KVRingBuffer(2, SLOT, torch.float32, "cpu", host_spill=True, compact=compact)
    store = {(s, 0): kv(s, torch.float32) for s in range(2)}
    for key, val in store.items():
        buf.put(key, *val)
    got = buf.get((0, 0))  # (0, 0) is the oldest: the next put evicts it
    rows = torch.arange(SLOT[0]).flip(0) if compact else None
    buf.put((5, 0), got[0], got[1], rows=rows)
    k5, v5 = buf.get((5, 0))[:2]
    expected = store[(0, 0)] if not compact else (store[(0, 0)][0].flip(0), store[(0, 0)][1].flip(0))
    assert bits_equal(k5, expected[0]) and bits_equal(v5, expected[1])
    assert bits_equal(buf.get((0, 0))[0], store[(0, 0)][0])


def test_host_only_keys_are_listed_sorted():
    buf = KVRingBuffer(1, (4,), torch.float32, "cpu", host_spill=True)
    for key in [(3, 1), (0, 2), (3, 0), (-1, 5), (2, 2)]:
        buf.put(key, *_filled(1))
    assert buf.keys() == [(2, 2), (-1, 5), (0, 2), (3, 0), (3, 1)]


# ---------------------------------------------------------------------------------------
# Threads.  Calls into the C++ class release the GIL; before the mutex this segfaulted in
# most runs within a second.


def _value(t, s, version, rows_of):
    """Deterministic bytes of thread t's key (s, t) at a version: a stale or torn read
    cannot match."""
    base = torch.arange(8 * 2 * 4, dtype=torch.float32).reshape(8, 2, 4)
    k = base + (t * 10000 + s * 100 + version)
    rows = rows_of(version)
    return k, -k, rows


@pytest.mark.parametrize("host_spill, compact", [(True, False), (True, True), (False, False), (False, True)])
def test_threads_hammering_one_buffer_match_per_thread_models(host_spill, compact):
    """Four threads put/get/get(copy)/prefetch/pop/discard/keys/len/in on one buffer of 3
    slots.  Thread t only writes keys (s, t), so it keeps an exact sequential model of
    them: with host_spill every answer about its own keys must match the model (presence,
    bytes of the latest version); without it, evictions by others may drop a key, so a
    read is either KeyError or the latest bytes.  After the threads, the buffer must equal
    the union of the models."""
    n_threads, n_keys, seconds = 4, 6, 0.7
    buf = KVRingBuffer(3, (8, 2, 4), torch.float32, "cpu", host_spill=host_spill, compact=compact)
    rows_of = (lambda version: torch.arange(8)[version % 3::2]) if compact else (lambda version: None)
    models = [dict() for _ in range(n_threads)]  # key -> version
    errors = []
    ops_done = [0] * n_threads
    deadline = time.monotonic() + seconds
    start = threading.Barrier(n_threads)

    def expect(t, key, got):
        k, v, rows = _value(t, key[0], models[t][key], rows_of)
        if rows is not None:
            assert torch.equal(got[2], rows), (key, got[2], rows)
            k, v = k[rows], v[rows]
        assert torch.equal(got[0], k) and torch.equal(got[1], v), key

    def worker(t):
        r = random.Random(1000 * t + int(host_spill) * 10 + int(compact))
        model = models[t]
        start.wait()
        try:
            while time.monotonic() < deadline:
                key = (r.randrange(n_keys), t)
                op = r.randrange(10)
                if op <= 2:
                    version = model.get(key, 0) + 1
                    k, v, rows = _value(t, key[0], version, rows_of)
                    buf.put(key, k, v, rows=rows) if compact else buf.put(key, k, v)
                    model[key] = version
                elif op <= 4:  # pop/get(copy) are atomic copies: exact or KeyError
                    pop = op == 4
                    try:
                        got = buf.pop(key) if pop else buf.get(key, copy=True)
                    except KeyError:
                        assert not (host_spill and key in model), f"{key} lost"
                        model.pop(key, None)
                    else:
                        assert key in model, f"{key} returned but never stored"
                        expect(t, key, got)
                        if pop:
                            del model[key]
                elif op == 5:
                    try:
                        buf.discard(key)
                    except KeyError:
                        assert not (host_spill and key in model), f"{key} lost"
                    model.pop(key, None)
                elif op == 6:  # prefetch own keys, or anyone's (racy: KeyError allowed)
                    mine = r.random() < 0.5
                    keys = [(r.randrange(n_keys), t if mine else r.randrange(n_threads)) for _ in range(4)]
                    try:
                        buf.prefetch(keys)
                    except KeyError:
                        assert not (mine and host_spill and all(k in model for k in keys))
                elif op == 7:  # views: their bytes may change under us, their shape not
                    try:
                        got = buf.get(key)
                    except KeyError:
                        assert not (host_spill and key in model), f"{key} lost"
                    else:
                        assert key in model and got[0].shape[1:] == (2, 4) and len(got) == (3 if compact else 2)
                elif op == 8:
                    snapshot = buf.keys()
                    assert len(set(snapshot)) == len(snapshot)
                    own = {k for k in snapshot if k[1] == t}
                    assert own == set(model) if host_spill else own <= set(model), (own, set(model))
                else:
                    n = len(buf)
                    assert 0 <= n <= n_threads * n_keys
                    assert (key in buf) == (key in model) or not host_spill
                ops_done[t] += 1
        except Exception as exc:  # reported below with the thread
            errors.append((t, repr(exc)))

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors, errors
    assert min(ops_done) > 200, ops_done
    # Sequential check of the final state against the union of the models.
    union = {key for m in models for key in m}
    if host_spill:
        assert set(buf.keys()) == union and len(buf) == len(union)
    else:
        assert set(buf.keys()) <= union and len(buf) <= 3
    assert buf.resident_count <= 3
    for t, model in enumerate(models):
        for key in model:
            if key in buf:
                expect(t, key, buf.get(key, copy=True))


# ---------------------------------------------------------------------------------------
# A state machine against a pure-Python model of the ring buffer.

M_SLOT = (5, 2, 3)
# Shrinking a failing run of this machine can take minutes: off unless asked for.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate) + ((Phase.shrink,) if os.environ.get("KVLOCK_TEST_SHRINK")
                                                           else ())
M_KEYS = st.tuples(st.integers(0, 3), st.integers(0, 1))


class _Model:
    """What the ring buffer must do: FIFO over resident keys, put of a resident key in
    place, bring-backs appended, prefetch protecting the keys it names, host copies kept
    until overwritten."""

    def __init__(self, capacity, host_spill):
        self.capacity, self.host_spill = capacity, host_spill
        self.data = {}  # key -> tuple of expected tensors (k, v[, rows])
        self.resident = []  # eviction order
        self.host = set()  # keys holding a valid host copy

    def _make_room(self, protect=()):
        if len(self.resident) < self.capacity:
            return
        victim = next(k for k in self.resident if k not in protect)
        self.resident.remove(victim)
        if self.host_spill:
            self.host.add(victim)
        else:
            del self.data[victim]

    def _bring(self, key, protect=()):
        if key not in self.resident:
            self._make_room(protect)
            self.resident.append(key)

    def put(self, key, expected):
        self.host.discard(key)
        if key not in self.resident:
            self._make_room()
            self.resident.append(key)
        self.data[key] = expected

    def get(self, key):
        self._bring(key)
        return self.data[key]

    def prefetch(self, keys):
        wanted = list(dict.fromkeys(keys))[:self.capacity]
        for key in wanted:
            self._bring(key, set(wanted))

    def remove(self, key):
        del self.data[key]
        if key in self.resident:
            self.resident.remove(key)
        self.host.discard(key)

    def keys(self):
        return self.resident + sorted(k for k in self.data if k not in self.resident)

    def host_nbytes(self):
        per_row = M_SLOT[1] * M_SLOT[2] * 4
        return sum(2 * self.data[k][0].shape[0] * per_row for k in self.host)


class _RingBufferMachine(RuleBasedStateMachine):
    host_spill = False
    compact = False

    @initialize(capacity=st.integers(1, 3))
    def build(self, capacity):
        self.buf = KVRingBuffer(capacity, M_SLOT, torch.float32, "cpu", host_spill=self.host_spill,
                                compact=self.compact)
        self.model = _Model(capacity, self.host_spill)

    def check(self, got, expected):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert bits_equal(g, e) and not g.requires_grad

    @rule(key=M_KEYS, seed=st.integers(0, 2 ** 16), grad=st.booleans(),
          rows=st.none() | st.lists(st.integers(0, M_SLOT[0] - 1), max_size=M_SLOT[0]))
    def put(self, key, seed, grad, rows):
        g = torch.Generator().manual_seed(seed)
        k, v = torch.randn(M_SLOT, generator=g), torch.randn(M_SLOT, generator=g)
        k.requires_grad_(grad)
        if self.compact:
            index = None if rows is None else torch.tensor(rows, dtype=torch.long)
            full = torch.arange(M_SLOT[0]) if index is None else index
            expected = (k.detach()[full], v[full], full)
            self.buf.put(key, k, v, rows=index)
        else:
            expected = (k.detach().clone(), v.clone())
            self.buf.put(key, k, v)
        self.model.put(key, expected)

    @rule(key=M_KEYS, copy=st.booleans())
    def get(self, key, copy):
        if key not in self.model.data:
            with pytest.raises(KeyError):
                self.buf.get(key, copy=copy)
            return
        self.check(self.buf.get(key, copy=copy), self.model.get(key))

    @rule(keys=st.lists(M_KEYS, max_size=5))
    def prefetch(self, keys):
        if any(k not in self.model.data for k in keys):
            with pytest.raises(KeyError):
                self.buf.prefetch(keys)
            return
        self.buf.prefetch(keys)
        self.model.prefetch(keys)
        for key in list(dict.fromkeys(keys))[:self.model.capacity]:
            assert self.buf.is_resident(key)

    @rule(key=M_KEYS)
    def pop(self, key):
        if key not in self.model.data:
            with pytest.raises(KeyError):
                self.buf.pop(key)
            return
        # pop is get (a host-only entry comes back into a slot first) then remove.
        self.check(self.buf.pop(key), self.model.get(key))
        self.model.remove(key)

    @rule(key=M_KEYS)
    def discard(self, key):
        if key not in self.model.data:
            with pytest.raises(KeyError):
                self.buf.discard(key)
            return
        self.buf.discard(key)
        self.model.remove(key)

    @precondition(lambda self: len(self.model.data) > 2)
    @rule()
    def clear(self):
        self.buf.clear()
        self.model = _Model(self.model.capacity, self.host_spill)

    @invariant()
    def same_state(self):
        assert self.buf.keys() == self.model.keys()
        assert len(self.buf) == len(self.model.data) and self.buf.resident_count == len(self.model.resident)
        assert self.buf.host_nbytes == self.model.host_nbytes()
        for key in self.model.resident:  # reading a resident entry changes nothing
            assert self.buf.is_resident(key) and key in self.buf
            self.check(self.buf.get(key), self.model.data[key])


# About 1,800 steps per variant (60 runs of up to 30 steps).
_MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None, database=None,
                             suppress_health_check=[HealthCheck.too_slow], phases=_PHASES)


@pytest.mark.parametrize("host_spill", [False, True])
@pytest.mark.parametrize("compact", [False, True])
def test_state_machine_against_model(host_spill, compact):
    machine = type("Machine", (_RingBufferMachine,), {"host_spill": host_spill, "compact": compact})
    machine.TestCase.settings = _MACHINE_SETTINGS
    machine.TestCase().runTest()
