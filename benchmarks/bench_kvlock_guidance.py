"""pytest-benchmark: kvlock_guidance against the eager s*, CFG and x0-hat sequence (Wan2.1-1.3B latents)."""
import pytest

from .control_ops import PROVIDERS, run_control_benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
def test_kvlock_guidance(benchmark, provider):
    run_control_benchmark(benchmark, "s* + kvlock_guidance + x0", provider)
