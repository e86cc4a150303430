"""pytest-benchmark suite for kv_lock_attention: the fused op against the unfused
blend-then-SDPA sequence and plain SDPA (no blend), side by side in one run.

    pytest benchmarks/bench_kv_lock_attention.py --benchmark-json out.json

On CPU only the PyTorch paths are timed (CPU times); the Triton provider needs CUDA.
"""
import pytest
import torch

from kvlock_kernels import kv_lock_attention

from .attention import sdpa_ceiling, unfused
from .common import CPU_SHAPES, WAN_1_3B, make_attention_inputs, synced

CUDA = torch.cuda.is_available()
SHAPE = WAN_1_3B if CUDA else CPU_SHAPES[1]
DEVICE = "cuda" if CUDA else "cpu"


PROVIDERS = {
    "kvlock_triton": lambda *a: kv_lock_attention(*a, backend="triton", check_inputs=False),
    "kvlock_torch": lambda *a: kv_lock_attention(*a, backend="torch", check_inputs=False),
    "unfused_lerp_sdpa": unfused,
    "sdpa_no_blend": sdpa_ceiling,
}


@pytest.mark.parametrize("fg_fraction", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kv_lock_attention(benchmark, provider, fg_fraction):
    if provider == "kvlock_triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only (the interpreter is not a timing target)")
    inputs = make_attention_inputs(SHAPE, torch.bfloat16, DEVICE, fg_fraction=fg_fraction)
    benchmark.group = f"kv_lock_attention {SHAPE.name} fg={fg_fraction}"
    benchmark.extra_info.update(device=DEVICE, flops=SHAPE.flops())
    benchmark.pedantic(synced(PROVIDERS[provider]), args=inputs, rounds=3, warmup_rounds=1)
