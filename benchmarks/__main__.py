"""The benchmark and verification harness (the README's main job).

    python -m benchmarks [--quick] [--op NAME] [--out DIR]

Every op is checked against its reference, then timed beside its alternatives:
kv_lock_attention against the unfused blend + SDPA, SDPA without blending (the
ceiling), flash-attn and FlexAttention; the two routed paths of a locked call (the
blend pass then FA3 / FA2 / SDPA, or the fused kernel) at alpha 0 / 0.5 / 1 with the
cost model's prediction and route printed beside the measurements; the blend
ops (``lock_kv``, ``qkv_epilogue``: ``benchmarks/blend.py``); the control ops and
merge_attention_states against the eager PyTorch they replace; the KV ring buffer
against plain copies.  Rows report median and spread, TFLOP/s, effective GB/s from a
bytes model, percent of the device roofline and peak memory.

The model section (``benchmarks/model.py``) computes every design from the real lock at
SPEC's shapes (block classes, modelled time per path, the route, a 50-step edit) and
checks that the route stays within 1.03x of plain attention.  Output: markdown on
stdout, results.json and PNG plots under --out.

On a CUDA machine: SPEC's shapes (Wan2.1-1.3B/14B, CogVideoX-5B with text, HunyuanVideo),
batch 2 and 3, foreground 0.1 / 0.3 / 1.0.  On a CPU-only machine: a reduced sweep of the
PyTorch paths, labelled as CPU times; correctness through the Triton interpreter at small
shapes; the model as the only GPU prediction; and the static GPU report of
``kvlock_kernels.tools.gpu_report`` (registers, spills, shared memory, HGMMA per kernel config).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the import of kvlock_kernels: kernels read it when decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from . import attention, control_ops, merge  # noqa: E402
from . import model as perf_model  # noqa: E402
from .common import (  # noqa: E402
    COGVIDEOX_5B,
    CPU_PATH_SHAPES,
    CPU_SHAPES,
    CPU_SHAPES_QUICK,
    GPU_SHAPES,
    INTERP_SHAPES,
    WAN_1_3B,
    device_peaks,
)
from .ring_buffer import CPU_SLOT, WAN_SLOT, ring_buffer_rows  # noqa: E402

OPS = ("attention", "paths", "blend", "model", "merge", "control", "ring_buffer", "inspect")


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def print_rows(title, rows, unit, columns):
    print(f"\n### {title}\n")
    print("| " + " | ".join(["shape", "provider", f"median {unit}", "min", "max"] + [c[0] for c in columns]) + " |")
    print("|" + "---|" * (5 + len(columns)))
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['shape']} | {r['provider']} | {r['status']} |" + " |" * (2 + len(columns)))
            continue
        extra = [fmt(r.get(key), spec) for _, key, spec in columns]
        print(f"| {r['shape']} | {r['provider']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['max_ms']:.3f} | "
              + " | ".join(extra) + " |")


def run_checks(device, ops):
    """Correctness of every op on this device (through the interpreter on CPU)."""
    from kvlock_kernels.ring_buffer import extension_available

    checks = []
    if "attention" in ops:
        shapes = INTERP_SHAPES if device.type == "cpu" else GPU_SHAPES[:1]
        for shape in shapes:
            for backend in ("triton", "torch"):
                ok, msg = attention.check(shape, torch.bfloat16, device, backend)
                checks.append(dict(op="kv_lock_attention", case=f"{shape.name} S={shape.seqlen} backend={backend}",
                                   ok=ok, detail=msg))
    if "attention" in ops or "paths" in ops:
        for backend, ok, msg in attention.check_plain(device):
            checks.append(dict(op="plain_attention", case=f"backend={backend} B2 Sq77 Skv91 H4/2 D64 bf16 +lse",
                               ok=ok, detail=msg))
    if "merge" in ops:
        ok, msg = merge.check(device)
        checks.append(dict(op="merge_attention_states", case="B2 S70 H3 D80 bf16", ok=ok, detail=msg))
    if "control" in ops:
        shape = control_ops.WAN_LATENT if device.type == "cuda" else control_ops.SMALL_LATENT
        for name, ok, msg in control_ops.check_control_ops(control_ops.make_control_inputs(shape, device), "triton"):
            checks.append(dict(op=name, case=f"latents {shape} bf16", ok=ok, detail=msg))
    if "ring_buffer" in ops and extension_available():
        from kvlock_kernels import KVRingBuffer

        buf = KVRingBuffer(2, (64, 2, 16), torch.bfloat16, device, host_spill=True)
        data = {(s, 0): (torch.randn(64, 2, 16, device=device).bfloat16(),
                         torch.randn(64, 2, 16, device=device).bfloat16()) for s in range(5)}
        for key, (k, v) in data.items():
            buf.put(key, k, v)
        ok = all(torch.equal(buf.get(key)[0], k) and torch.equal(buf.get(key)[1], v) for key, (k, v) in data.items())
        checks.append(dict(op="KVRingBuffer", case="5 entries through 2 slots with host spill", ok=ok,
                           detail="bit-exact round trips" if ok else "MISMATCH"))
    return checks


def blend_section(device, peaks, repeats, quick):
    """``benchmarks/blend.py``'s section (lock_kv and qkv_epilogue): dict(checks, rows,
    model, text).  A section that raises is a failed check, not a crash of the harness."""
    from . import blend

    try:
        return blend.section(device, peaks, repeats, quick)
    except Exception as e:
        why = f"benchmarks.blend.section failed: {type(e).__name__}: {e}"[:300]
        return dict(checks=[dict(op="blend", case="section", ok=False, detail=why)], rows=[], model=[], text=why)


def print_paths(rows, notes, unit, cuda):
    print("\n## locked attention: the routed paths side by side (bf16, moving-rectangle mask, fg 0.3)")
    if not cuda:
        print("\nCPU times of the PyTorch paths (FA2/FA3 and the Triton kernel need a GPU); the modelled column is "
              "GPU-only.")
    for n in notes:
        model = f", modelled {n['modelled_ms']:.3f} ms" if n["modelled_ms"] is not None else ""
        print(f"\n### {n['shape']}, batch {n['batch']}\n\nroute (`choose_path` on this device): **{n['route']}** "
              f"with {n['plain_backend']}{model}: {n['why']}.  Blend: {n['blend']}.\n")
        print(f"| alpha | provider | median {unit} | min | max | TFLOP/s | % of plain | modelled ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["shape"] != n["shape"] or r["batch"] != n["batch"]:
                continue
            if r["status"] != "ok":
                print(f"| {r['alpha']:g} | {r['provider']} | {r['status']} | | | | | |")
                continue
            print(f"| {r['alpha']:g} | {r['provider']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                  f"{r['max_ms']:.3f} | {fmt(r.get('tflops'))} | {fmt(r.get('pct_of_plain'), '.1f')} | "
                  f"{fmt(r.get('model_ms'))} |")


def save_plots(report, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in report["rows"] if r["op"] == "kv_lock_attention" and r["status"] == "ok"
            and r["fg"] == 0.3 and r["batch"] == 2]
    fig, ax = plt.subplots(figsize=(7, 4))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((r["seqlen"], r["tflops"]) for r in rows if r["provider"] == provider)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"kv_lock_attention, batch 2, fg 0.3 ({report['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "attention_tflops.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    edits = [e for e in report.get("model", {}).get("edit", []) if e["fg"] == 0.3 and e["batch"] == 3]
    if edits:
        fig, ax = plt.subplots(figsize=(8, 4))
        designs = perf_model.EDIT_DESIGNS
        width = 0.8 / len(edits)
        for i, e in enumerate(edits):
            ax.bar([j + i * width for j in range(len(designs))], [e["ratio"][d] for d in designs], width,
                   label=e["shape"])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(designs))])
        ax.set_xticklabels(designs, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("modelled time / plain FA3")
        ax.set_title("50-step edit, batch 3, fg 0.3 (model, H100 SXM, bf16)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "model_edit.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    ring = report.get("ring_buffer", [])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [r["operation"] for r in ring] + [f"baseline: {r['baseline']}" for r in ring[:2]]
    values = [r["gbps"] for r in ring] + [r["baseline_gbps"] for r in ring[:2]]
    ax.barh(labels, values)
    ax.set_xlabel("GB/s")
    ax.set_title(f"KVRingBuffer throughput ({report['device']})", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ring_buffer_gbps.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced sweep (under 2 minutes on 2 CPU cores)")
    ap.add_argument("--op", choices=OPS + ("all",), default="all", help="run one section only")
    ap.add_argument("--out", default="bench_out", help="directory for results.json and the PNG plots")
    args = ap.parse_args(argv)
    ops = OPS if args.op == "all" else (args.op,)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dev_name = torch.cuda.get_device_name() if HAS_CUDA else f"CPU ({platform.processor() or 'x86_64'}, " \
                                                                f"{os.cpu_count()} cores)"
    peaks = device_peaks(dev_name) if HAS_CUDA else None
    unit = "GPU ms (CUDA events)" if HAS_CUDA else "CPU ms"
    repeats = (3 if args.quick else 10) if HAS_CUDA else (2 if args.quick else 3)
    report = dict(device=dev_name, cpu_only=not HAS_CUDA, torch=torch.__version__, triton=triton.__version__,
                  git_commit=git_commit(), quick=args.quick, time_unit=unit, rows=[], checks=[], ring_buffer=[],
                  inspect=[], paths=[], blend={}, model={})

    print(f"# kvlock-kernels benchmark harness\n\ndevice: {dev_name}\ntorch {torch.__version__}, "
          f"triton {triton.__version__}, commit {report['git_commit'][:12]}")
    if not HAS_CUDA:
        print("\nNo GPU: times below are CPU times of the PyTorch paths and say nothing about GPU speed. The Triton "
              "kernels are checked through the interpreter; the model section and the static report are the GPU "
              "prediction.")
    elif peaks is None:
        print(f"\n(no roofline entry for {dev_name}: percent of roofline is left out)")

    report["checks"] = run_checks(device, ops)
    print("\n## correctness (against the references)\n")
    for c in report["checks"]:
        print(f"- {c['op']} [{c['case']}]: {c['detail']}: {'PASS' if c['ok'] else 'FAIL'}")

    if "attention" in ops:
        all_shapes, quick_shapes = (GPU_SHAPES, GPU_SHAPES[:1]) if HAS_CUDA else (CPU_SHAPES, CPU_SHAPES_QUICK)
        shapes, batches, fgs = (quick_shapes, (2,), (0.3,)) if args.quick else (all_shapes, (2, 3), (0.1, 0.3, 1.0))
        rows = attention.run(shapes, batches, fgs, device, peaks, repeats)
        report["rows"] += rows
        print("\n## kv_lock_attention (bf16)")
        for fg in fgs:
            for batch in batches:
                sel = [r for r in rows if r["fg"] == fg and r["batch"] == batch]
                print_rows(f"batch {batch}, foreground {fg}", sel, unit,
                           [("TFLOP/s", "tflops", ".3f"), ("GB/s (model)", "gbps", ".1f"),
                            ("% roofline", "roofline_pct", ".1f"), ("peak MiB", "peak_mem_mb", ".0f"),
                            ("vs unfused", "vs_unfused", ".2f")])
        print("\nThe fused row above is the Triton kernel forced (backend='triton'); which path a locked call "
              "should take, and what each costs at SPEC shapes, is in the paths and model sections.")

    if "paths" in ops:
        if HAS_CUDA:
            shapes = (WAN_1_3B,) if args.quick else (WAN_1_3B, COGVIDEOX_5B)
        else:
            shapes = CPU_PATH_SHAPES[:1] if args.quick else CPU_PATH_SHAPES
        rows, notes = attention.path_rows(shapes, attention.PATH_ALPHAS, device, peaks, repeats)
        report["paths"] = dict(rows=rows, routes=notes)
        report["rows"] += [r for r in rows if r["status"] == "ok"]
        print_paths(rows, notes, unit, HAS_CUDA)

    if "blend" in ops:
        blend = blend_section(device, peaks, repeats, args.quick)
        report["blend"] = blend
        report["checks"] += blend["checks"]
        report["rows"] += [r for r in blend["rows"] if isinstance(r, dict) and {"op", "status"} <= set(r)]
        print("\n## blend ops: lock_kv and qkv_epilogue (benchmarks/blend.py)\n")
        print(blend["text"])  # the section formats its own checks and tables

    if "model" in ops:
        result = perf_model.run()
        report["model"] = result
        report["attention_model"] = result["rows"]
        print("\n" + perf_model.format_markdown(result))
        report["checks"].append(dict(op="model", case=f"auto <= {result['bound']:g}x plain at every SPEC shape, "
                                     "batch, alpha, fg and backend set", ok=result["bound_ok"],
                                     detail=f"worst {result['worst_auto_ratio']:.3f}x"))
        if HAS_CUDA:
            print("\nThe measured counterpart of the model is the paths section above (same cost model on this "
                  "device, its route printed beside the measurements).")
        else:
            print("\nNo GPU: this model is the only prediction of GPU time here.")

    if "merge" in ops:
        shape = (2, 32760, 12, 128) if HAS_CUDA else (2, 4096, 12, 128)
        rows, ratio = merge.run(shape, device, peaks, repeats)
        report["rows"] += rows
        print("\n## merge_attention_states (bf16)")
        print_rows(f"bytes model: eager / fused = {ratio:.2f}x", rows, unit,
                   [("GB/s (model)", "gbps", ".1f"), ("% roofline", "roofline_pct", ".1f")])

    if "control" in ops:
        rows = control_ops.run(device, peaks, repeats)
        report["rows"] += rows
        print(f"\n## control ops at Wan2.1-1.3B latent size {control_ops.WAN_LATENT} (bf16)")
        print_rows("branch_variance, cfg_zero_star_scale, s* + kvlock_guidance + x0", rows, unit,
                   [("GB/s (model)", "gbps", ".1f"), ("% roofline", "roofline_pct", ".1f"),
                    ("vs eager", "vs_eager", ".2f"), ("bytes model eager/fused", "model_ratio", ".2f")])
        if not HAS_CUDA:
            print("\nThese ops are bandwidth-bound: on a GPU the fused kernels should approach the bytes-model "
                  "ratio over the eager sequence.")

    if "ring_buffer" in ops:
        from kvlock_kernels.ring_buffer import extension_available

        slot = WAN_SLOT if HAS_CUDA else CPU_SLOT
        print(f"\n## KVRingBuffer: slot {slot} bf16 per K and V, 4 device slots, 8 entries")
        if not extension_available():
            print("unavailable: kvlock_kernels._C is not built (pip install --no-build-isolation -e .)")
        else:
            ring, pair_bytes = ring_buffer_rows(device, slot, repeats=2 if args.quick else 5)
            report["ring_buffer"] = [dict(operation=n, gbps=g, baseline=b, baseline_gbps=bg) for n, g, b, bg in ring]
            print(f"K+V per entry: {pair_bytes / 1e6:.1f} MB; GB/s{'' if HAS_CUDA else ' (CPU memory)'}\n")
            print("| operation | GB/s | baseline | baseline GB/s |\n|---|---|---|---|")
            for n, g, b, bg in ring:
                print(f"| {n} | {g:.2f} | {b} | {bg:.2f} |")

    if "inspect" in ops:
        from kvlock_kernels.tools import gpu_report as kinspect

        jobs = kinspect.default_jobs(all_configs=not args.quick)
        reports = kinspect.run(jobs)
        report["inspect"] = [vars(r) for r in reports]
        bad = [r for r in reports if not r.ok]
        print(f"\n## static GPU report (kvlock_kernels.tools.gpu_report{'' if args.quick else ' --all'}): "
              f"{len(reports) - len(bad)}/{len(reports)} configs clean\n")
        print(kinspect.format_table(reports))
        report["checks"].append(dict(op="inspect", case=f"{len(reports)} configs", ok=not bad,
                                     detail=f"{len(bad)} with spills or shared memory over the limit"))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    plots = save_plots(report, args.out) if ({"attention", "ring_buffer", "model"} & set(ops)) else []
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + "".join(f", {p}" for p in plots))
    ok = all(c["ok"] for c in report["checks"])
    print(f"\nresult: {'all checks passed' if ok else 'CHECK FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
