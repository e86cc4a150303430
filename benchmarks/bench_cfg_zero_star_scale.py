"""pytest-benchmark: cfg_zero_star_scale against the eager upcast/dot/norm sequence (Wan2.1-1.3B latents)."""
import pytest

from .control_ops import PROVIDERS, run_control_benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cfg_zero_star_scale(benchmark, provider):
    run_control_benchmark(benchmark, "cfg_zero_star_scale", provider)
