"""pytest-benchmark suite for lock_kv (batch 3 with the in-batch source) against the eager
``torch.lerp`` blend.  CUDA: Wan2.1-1.3B 480p; CPU: a 15x26-token stand-in (CPU times)."""
import pytest
import torch

from benchmarks.blend import CPU_SHAPES, FAMILIES, SOURCE_INDEX, eager_lerp, make_lock_inputs
from benchmarks.common import synced
from kvlock_kernels.attention.lock_kv import lock_kv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = FAMILIES["wan"]["shape"].with_batch(3) if CUDA else CPU_SHAPES["wan"]


@pytest.mark.parametrize("provider", ["kvlock_triton", "kvlock_triton_inplace", "kvlock_torch", "torch_lerp"])
def test_lock_kv(benchmark, provider):
    if provider.startswith("kvlock_triton") and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only")
    k, v, lock = make_lock_inputs(SHAPE, DEVICE)
    calls = {
        "kvlock_triton": lambda: lock_kv(k, v, lock, source_index=SOURCE_INDEX, backend="triton", check_inputs=False),
        "kvlock_triton_inplace": lambda: lock_kv(k, v, lock, source_index=SOURCE_INDEX, inplace=True,
                                                 backend="triton", check_inputs=False),
        "kvlock_torch": lambda: lock_kv(k, v, lock, source_index=SOURCE_INDEX, backend="torch", check_inputs=False),
        "torch_lerp": lambda: eager_lerp(k, v, lock, SOURCE_INDEX),
    }
    run = synced(calls[provider])

    benchmark.group = f"lock_kv B{SHAPE.batch} S{SHAPE.seqlen} H{SHAPE.heads} D{SHAPE.head_dim} ({DEVICE})"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
