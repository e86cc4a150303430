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
    assert out.count(": PASS") == 2 and "all checks passed" in out
    assert "| kvlock (Triton, fused) | unavailable on this machine" in out  # CPU: listed, not dropped
    assert "| unfused: lerp + SDPA |" in out and "CPU ms" in out
