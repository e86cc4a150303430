"""pytest-benchmark suite for merge_attention_states against the eager PyTorch merge."""
import pytest
import torch

from kvlock_kernels import merge_attention_states

from .merge import eager_merge

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
B, S, H, D = 2, (32760 if CUDA else 4096), 12, 128


@pytest.mark.parametrize("provider", ["kvlock_triton", "torch_eager"])
def test_merge_attention_states(benchmark, provider):
    if provider == "kvlock_triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(B, S, H, D, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    la, lb = (torch.randn(B, H, S, generator=g).to(DEVICE) for _ in range(2))
    fn = (lambda: merge_attention_states(a, la, b, lb, backend="triton")) if provider == "kvlock_triton" \
        else (lambda: eager_merge(a, la, b, lb))
    benchmark.group = f"merge_attention_states B{B} S{S} H{H} D{D}"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
