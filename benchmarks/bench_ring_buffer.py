"""pytest-benchmark: KVRingBuffer put / spill / replay (reduced slots on CPU)."""
import pytest
import torch

from kvlock_kernels import KVRingBuffer
from kvlock_kernels.ring_buffer import extension_available

from .ring_buffer import CPU_SLOT, WAN_SLOT

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SLOT = WAN_SLOT if CUDA else CPU_SLOT
CAPACITY, ENTRIES = 4, 8


@pytest.fixture(scope="module")
def entries():
    if not extension_available():
        pytest.skip("kvlock_kernels._C is not built")
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(SLOT, generator=g).to(DEVICE, torch.bfloat16),
             torch.randn(SLOT, generator=g).to(DEVICE, torch.bfloat16)) for _ in range(ENTRIES)]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("host_spill", [False, True])
def test_put(benchmark, entries, host_spill):
    buf = KVRingBuffer(CAPACITY, SLOT, torch.bfloat16, DEVICE, host_spill=host_spill)

    def run():
        buf.clear()
        for i, (k, v) in enumerate(entries):
            buf.put((i, 0), k, v)
        _sync()

    benchmark.group = f"KVRingBuffer put {SLOT}"
    benchmark.extra_info["bytes"] = ENTRIES * 2 * entries[0][0].nbytes
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_copy_baseline(benchmark, entries):
    dst = [(torch.empty_like(k), torch.empty_like(v)) for k, v in entries]

    def run():
        for (k, v), (dk, dv) in zip(entries, dst):
            dk.copy_(k)
            dv.copy_(v)
        _sync()

    benchmark.group = f"KVRingBuffer put {SLOT}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_reverse_replay(benchmark, entries):
    buf = KVRingBuffer(CAPACITY, SLOT, torch.bfloat16, DEVICE, host_spill=True)
    order = [(i, 0) for i in reversed(range(ENTRIES))]

    def setup():
        buf.clear()
        for i, (k, v) in enumerate(entries):
            buf.put((i, 0), k, v)
        _sync()

    def run():
        for j, key in enumerate(order):
            if j % CAPACITY == 0:
                buf.prefetch(order[j:j + CAPACITY])
            buf.get(key)
            buf.discard(key)
        _sync()

    benchmark.group = f"KVRingBuffer replay {SLOT}"
    benchmark.pedantic(run, setup=setup, rounds=3)
