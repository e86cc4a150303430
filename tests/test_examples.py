"""The examples under python/ run and show what they claim."""
import os
import subprocess
import sys

import pytest
from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lock_strength_demo():
    env = subprocess_env()  # CPU torch path: fast
    proc = subprocess.run([sys.executable, "python/examples/lock_strength_demo.py", "--frames", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines()
            if line.count("|") == 2 and line.split("|")[0].strip().replace(".", "").isdigit()]
    bg_to_source = [float(r[1].split("/")[0]) for r in rows]
    assert len(rows) == 5 and bg_to_source == sorted(bg_to_source, reverse=True)
    assert bg_to_source[-1] < 1e-3  # alpha = 1: background output is the source's


def test_edit_tiny_wan(tmp_path):
    """The diffusers example measures what is true on a random-weight model: the edit's dependence
    on the source (RMS difference of two edits of different sources, same seed) is exactly zero at
    alpha = 0 and grows strictly with alpha, in the background and the foreground."""
    pytest.importorskip("diffusers")  # brought by the [test] extra
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "python/edit_tiny_wan.py", "--steps", "6", "--quiet",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the output is noise" in proc.stdout  # says plainly what a random model cannot show
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 3 and (cells[0].startswith("alpha ") or cells[0] == "KV-Lock dynamic"):
            bg, fg = (float(v) for v in cells[1].split())
            rows[cells[0]] = (bg, fg, float(cells[2]))
    alphas = [f"alpha {a:.2f}" for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert set(alphas) | {"KV-Lock dynamic"} == set(rows), proc.stdout
    assert rows["alpha 0.00"][:2] == (0.0, 0.0)  # lock weight 0 never reads the source
    for region in (0, 1):
        curve = [rows[a][region] for a in alphas]
        assert all(b > a for a, b in zip(curve, curve[1:])), (region, curve)
    # the dynamic schedule's alpha lies in [0, 1] each step: its sensitivity lies inside the fixed range
    assert 0.0 < rows["KV-Lock dynamic"][0] < rows["alpha 1.00"][0]
    for name in ("strip.png", "schedule.png"):
        assert (tmp_path / name).stat().st_size > 1000
