"""pytest-benchmark: branch_variance against the eager var/mean/masked-mean sequence (Wan2.1-1.3B latents)."""
import pytest

from .control_ops import PROVIDERS, run_control_benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
def test_branch_variance(benchmark, provider):
    run_control_benchmark(benchmark, "branch_variance (W=10 window)", provider)
