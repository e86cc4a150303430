"""The static GPU-readiness report: the default configs compile for sm_80 and sm_90
without spills, within shared memory, and bf16 head-dim-128 uses HGMMA on sm_90."""
import os
import subprocess
import sys

from kvlock_kernels.tools import gpu_report as kinspect


def test_inspect_default_configs_clean():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kvlock_kernels.tools.gpu_report"], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| kv_lock_attention")]
    assert len(rows) == len([j for j in kinspect.default_jobs() if j[0] == "kv_lock_attention"])
    hopper_bf16_128 = [r for r in rows if "| sm_90 | bf16 | 128 |" in r]
    assert hopper_bf16_128 and all("| HGMMA |" in r and r.endswith("| yes |") for r in hopper_bf16_128)


def test_inspect_flags_spills():
    """A deliberately oversized tile must be reported as spilling (the check can fail)."""
    (report,) = kinspect.run([("kv_lock_attention", 90, "bf16", 256, (128, 64, 4, 2))])
    assert not report.ok and "spills" in report.problem
