"""pytest-benchmark suite for the fused qkv_epilogue (norm + RoPE + lock, batch 3 with the
in-batch source) against the eager sequence of separate ops, per model family.  CUDA:
the SPEC shapes; CPU: small stand-ins with the same head layouts (CPU times)."""
import pytest
import torch

from benchmarks.blend import CPU_SHAPES, FAMILIES, eager_epilogue, make_epilogue_inputs
from benchmarks.common import synced
from kvlock_kernels.attention.epilogue import qkv_epilogue

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("provider", ["kvlock_triton", "kvlock_torch", "eager"])
def test_qkv_epilogue(benchmark, family, provider):
    if provider == "kvlock_triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only")
    shape = FAMILIES[family]["shape"].with_batch(3) if CUDA else CPU_SHAPES[family]
    q, k, v, kw = make_epilogue_inputs(family, shape, DEVICE)
    calls = {
        "kvlock_triton": lambda: qkv_epilogue(q, k, v, **kw, backend="triton", check_inputs=False),
        "kvlock_torch": lambda: qkv_epilogue(q, k, v, **kw, backend="torch", check_inputs=False),
        "eager": lambda: eager_epilogue(q, k, v, **kw),
    }
    run = synced(calls[provider])

    benchmark.group = (f"qkv_epilogue {family} B{shape.batch} S{shape.seqlen} H{shape.heads} D{shape.head_dim} "
                       f"({DEVICE})")
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
