"""The README's main job (the benchmark harness) runs end to end on this machine: table,
JSON and plots written, every correctness check passed, unavailable providers listed, the
routed paths timed with the route printed, and the model's rows keeping auto within 1.03x
of plain attention at every SPEC shape and alpha."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_harness_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "all checks passed" in out and ": FAIL" not in out
    assert "| shape | provider | median CPU ms |" in out  # the markdown table, labelled CPU
    # Unavailable providers are listed as such, never dropped.
    for provider in ("kvlock (Triton, fused)", "flash-attn, no blend", "FlexAttention (blend materialised)"):
        assert f"| {provider} | unavailable:" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["cpu_only"] is True and report["torch"] and report["triton"] and report["git_commit"]
    checks = {c["op"] for c in report["checks"]}
    assert {"kv_lock_attention", "merge_attention_states", "branch_variance", "cfg_zero_star_scale",
            "kvlock_guidance", "KVRingBuffer", "inspect"} <= checks
    assert all(c["ok"] for c in report["checks"])
    ops = {r["op"] for r in report["rows"] if r["status"] == "ok"}
    assert {"kv_lock_attention", "merge_attention_states", "branch_variance (W=10 window)"} <= ops
    assert len(report["ring_buffer"]) == 3 and report["inspect"] and report["attention_model"]
    for png in ("attention_tflops.png", "ring_buffer_gbps.png", "model_edit.png"):
        assert (tmp_path / png).stat().st_size > 5000

    # The routed paths: plain SDPA and blend + SDPA timed (CPU times), the GPU-only
    # providers listed as unavailable, the route printed beside them.
    assert "## locked attention: the routed paths side by side" in out
    assert "route (`choose_path` on this device): **blend_then_plain** with sdpa" in out
    paths = report["paths"]["rows"]
    assert {r["alpha"] for r in paths} == {0.0, 0.5, 1.0}
    ok = {r["provider"] for r in paths if r["status"] == "ok"}
    assert {"plain sdpa (no lock)", "kv_lock_attention backend=torch"} <= ok
    assert any(p.startswith("blend + sdpa") for p in ok)
    for provider in ("plain fa3 (no lock)", "fused (Triton)"):
        assert f"| {provider} | unavailable:" in out
    assert "plain_attention" in checks

    # The blend section: lock_kv and qkv_epilogue checked (interpreter) and timed (CPU times).
    assert "## blend ops: lock_kv and qkv_epilogue" in out
    blend = report["blend"]
    assert {c["op"] for c in blend["checks"]} == {"lock_kv", "qkv_epilogue"} and all(c["ok"] for c in blend["checks"])
    assert {r["op"] for r in blend["rows"] if r["status"] == "ok"} == {"lock_kv", "qkv_epilogue"}
    assert blend["model"]

    # The model, computed from the real lock: every SPEC shape x batch x alpha x fg, and
    # the route within 1.03x of the best plain attention everywhere (any backend set).
    model = report["model"]
    rows = model["rows"]
    shapes = {"wan2.1-1.3B 480p", "wan2.1-14B 720p", "cogvideox-5B 480p", "hunyuanvideo 720p"}
    assert {(r["shape"], r["batch"], r["alpha"], r["fg"]) for r in rows} == \
        {(s, b, a, f) for s in shapes for b in (2, 3) for a in (0.0, 0.5, 1.0) for f in (0.1, 0.3)}
    for r in rows:
        assert r["auto_ms"] <= 1.03 * r["best_plain_ms"], r
        assert all(sc["ratio"] <= 1.03 for sc in r["scenarios"].values()), r
        fractions = r["locked_classes"]
        assert sum(fractions.values()) == pytest.approx(1.0)
        if r["alpha"] == 0.0:
            assert fractions["zero"] == 1.0
        else:  # a moving rectangle in (t, h, w) order: blocks straddle its edges
            assert fractions["mixed"] > 0.2
        assert r["tensor_work"]["fused_new"] == 1.0 and r["tensor_work"]["blend_then_plain"] == 1.0
    assert model["bound_ok"] and "model" in checks
    assert len(model["edit"]) == 16 and len(model["epilogue"]) == 8
    assert "## model: locked attention per layer call" in out and "a 50-step edit" in out


def test_harness_single_op(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--op", "merge", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {r["op"] for r in report["rows"]} == {"merge_attention_states"}
