"""The README's main job runs end to end and its correctness checks pass."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_quick():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # attention (Triton, torch) + branch_variance, cfg_zero_star_scale, kvlock_guidance
    assert out.count(": PASS") == 5 and "FAIL" not in out and "all checks passed" in out
    assert "| kvlock (Triton, fused) | unavailable on this machine" in out  # CPU: listed, not dropped
    assert "| unfused: lerp + SDPA |" in out and "CPU ms" in out
    for op in ("branch_variance (W=10 window)", "cfg_zero_star_scale", "s* + kvlock_guidance + x0"):
        assert f"| {op} |" in out
    for row in ("put (resident)", "put with host spill", "reverse replay (prefetch + get)"):
        assert f"| {row} |" in out  # the ring buffer section ran (extension built)
