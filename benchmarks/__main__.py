"""The main job: verify kv_lock_attention on this machine's device, then time the fused
path against the unfused sequence it replaces (blend in PyTorch, then SDPA).

    python -m benchmarks [--quick]

On a CUDA machine: the Triton kernel is checked at the Wan2.1-1.3B 480p shape against
the fp32 memory-efficient reference, then timed (CUDA events) beside the unfused path,
plain SDPA without blending (the ceiling) and flash-attn when installed.
On a CPU-only machine: the Triton kernel is checked through the Triton interpreter at a
reduced Wan-like shape, and only the PyTorch paths are timed; those are CPU times and
say nothing about GPU speed.  The bytes model printed beside them is the prediction.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the import of kvlock_kernels: kernels read it when decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from kvlock_kernels import kv_lock_attention, reference  # noqa: E402

from .common import (WAN_1_3B, WAN_1_3B_CPU, WAN_1_3B_CPU_QUICK, WAN_INTERP, bytes_model,  # noqa: E402
                     make_attention_inputs, time_fn)
from .ring_buffer import CPU_SLOT, WAN_SLOT, ring_buffer_rows  # noqa: E402
from .control_ops import (SMALL_LATENT, WAN_LATENT, bytes_moved, check_control_ops,  # noqa: E402
                          fused_calls, make_control_inputs)


def check_attention(shape, dtype, device, backend) -> tuple[bool, str]:
    """Flash-attention rule at a large shape: the reference is the memory-efficient torch
    path on fp32 inputs (blend in fp32, SDPA in fp32); the baseline the same in dtype."""
    q, k, v, ks, vs, lock = make_attention_inputs(shape, dtype, device)
    out = kv_lock_attention(q, k, v, ks, vs, lock, backend=backend)
    f32 = [t.float() for t in (q, k, v, ks, vs)]
    ref = reference.kv_lock_attention_torch(*f32, lock)
    same = reference.kv_lock_attention_torch(q, k, v, ks, vs, lock)
    err = (out.float() - ref).abs().max().item()
    base = (same.float() - ref).abs().max().item()
    atol = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}[dtype]
    ok = err <= 2 * base + atol
    return ok, f"max|out-ref| {err:.2e} <= 2 x {base:.2e} + {atol:g}: {'PASS' if ok else 'FAIL'}"


def unfused(q, k, v, ks, vs, lock):
    """What a pipeline does without this library: materialise the blend, then SDPA."""
    w = lock[:, :, None, None].to(k.dtype)
    kb = torch.lerp(k, ks, w)
    vb = torch.lerp(v, vs, w)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)).transpose(1, 2)


def sdpa_ceiling(q, k, v, *_):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def providers(device):
    rows = []
    if device.type == "cuda":
        rows.append(("kvlock (Triton, fused)", lambda *a: kv_lock_attention(*a, backend="triton", check_inputs=False)))
    else:
        rows.append(("kvlock (Triton, fused)", None))
    rows.append(("kvlock backend=torch", lambda *a: kv_lock_attention(*a, backend="torch", check_inputs=False)))
    rows.append(("unfused: lerp + SDPA", unfused))
    rows.append(("SDPA, no blend (ceiling)", sdpa_ceiling))
    try:
        from flash_attn import flash_attn_func
        if device.type == "cuda":
            rows.append(("flash-attn, no blend", lambda q, k, v, *_: flash_attn_func(q, k, v)))
    except Exception:
        rows.append(("flash-attn, no blend", None))
    return rows


def control_ops_section(device, quick) -> bool:
    """Correctness and timing of the per-step control ops at Wan2.1-1.3B latent size."""
    cuda = device.type == "cuda"
    check_shape = WAN_LATENT if cuda else SMALL_LATENT
    print(f"\n## control ops: correctness vs reference (latents {check_shape}, bf16; "
          f"{'Triton' if cuda else 'Triton through the interpreter'})")
    ok = True
    for name, passed, msg in check_control_ops(make_control_inputs(check_shape, device), "triton"):
        print(f"- {name}: {msg}: {'PASS' if passed else 'FAIL'}")
        ok = ok and passed
    unit = "GPU ms (CUDA events)" if cuda else "CPU ms (wall clock; not a GPU prediction)"
    print(f"\n## control ops: timing at Wan2.1-1.3B latent size {WAN_LATENT}, bf16\n")
    t = make_control_inputs(WAN_LATENT, device)
    model = bytes_moved(WAN_LATENT)
    repeats = 3 if (quick or not cuda) else 20
    ours = "Triton kernel" if cuda else "kvlock_kernels, torch path (Triton unavailable on CPU)"
    print(f"{unit}\n")
    print(f"| op | {ours} | eager PyTorch sequence | eager / ours | bytes model: eager / fused kernel |")
    print("|---|---|---|---|---|")
    for name, (fused, eager) in fused_calls("triton" if cuda else "torch").items():
        eager_ms = time_fn(lambda: eager(t), warmup=1, repeats=repeats, device=device)[0]
        fused_ms = time_fn(lambda: fused(t), warmup=1, repeats=repeats, device=device)[0]
        fused_b, eager_b = model[name]
        print(f"| {name} | {fused_ms:.3f} | {eager_ms:.3f} | {eager_ms / fused_ms:.2f}x | {eager_b / fused_b:.2f}x |")
    if not cuda:
        print("\nOn CPU the control kernels run only in the interpreter; the bytes model is the GPU prediction "
              "(these ops are bandwidth-bound).")
    return ok


def ring_buffer_section(device, quick) -> None:
    """Throughput of the KV cache ring buffer (C++ extension) beside plain copies."""
    from kvlock_kernels.ring_buffer import extension_available

    cuda = device.type == "cuda"
    slot = WAN_SLOT if cuda else CPU_SLOT
    print(f"\n## KV ring buffer: slot {slot} bf16 per K and V, 4 device slots, 8 entries")
    if not extension_available():
        print("unavailable: kvlock_kernels._C is not built (pip install --no-build-isolation -e .)")
        return
    rows, pair_bytes = ring_buffer_rows(device, slot, repeats=2 if quick else 5)
    unit = "GB/s" + ("" if cuda else " (CPU memory; not a GPU prediction)")
    print(f"K+V per entry: {pair_bytes / 1e6:.1f} MB\n")
    print(f"| operation | {unit} | baseline | baseline {unit} |")
    print("|---|---|---|---|")
    for name, rate, base_name, base_rate in rows:
        print(f"| {name} | {rate:.2f} | {base_name} | {base_rate:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = torch.bfloat16
    if HAS_CUDA:
        dev_name = torch.cuda.get_device_name()
        check_shape, time_shape, check_backend = WAN_1_3B, WAN_1_3B, "triton"
    else:
        dev_name = f"CPU ({os.cpu_count()} cores); Triton kernels through the interpreter"
        check_shape, check_backend = WAN_INTERP, "triton"
        time_shape = WAN_1_3B_CPU_QUICK if args.quick else WAN_1_3B_CPU
    print(f"# kvlock-kernels main job\n\ndevice: {dev_name}\ntorch {torch.__version__}\n")

    print(f"## correctness: kv_lock_attention vs reference ({check_shape.name}, B={check_shape.batch}, "
          f"S={check_shape.seqlen}, H={check_shape.heads}, D={check_shape.head_dim}, bf16, fg 0.3, alpha 0.7)")
    ok, msg = check_attention(check_shape, dtype, device, check_backend)
    print(f"- backend={check_backend}: {msg}")
    ok_t, msg_t = check_attention(check_shape, dtype, device, "torch")
    print(f"- backend=torch: {msg_t}\n")
    ok = ok and ok_t

    s = time_shape
    unit = "GPU ms (CUDA events)" if HAS_CUDA else "CPU ms (wall clock; not a GPU prediction)"
    print(f"## timing: {s.name}, B={s.batch}, S={s.seqlen}, H={s.heads}, D={s.head_dim}, bf16, fg 0.3\n")
    inputs = make_attention_inputs(s, dtype, device)
    repeats = 3 if (args.quick or not HAS_CUDA) else 20
    print(f"| provider | median {unit} | min | max | TFLOP/s | vs unfused |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, fn in providers(device):
        if fn is None:
            print(f"| {name} | unavailable on this machine | | | | |")
            continue
        med, lo, hi = time_fn(lambda: fn(*inputs), warmup=1, repeats=repeats, device=device)
        results[name] = (med, lo, hi)
    base = results["unfused: lerp + SDPA"][0]
    for name, (med, lo, hi) in results.items():
        tflops = s.flops() / (med * 1e-3) / 1e12
        print(f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} | {tflops:.3f} | {base / med:.2f}x |")
    model = bytes_model(s if HAS_CUDA else WAN_1_3B, 2, 0.3)
    print(f"\nbytes model (bf16, {WAN_1_3B.name if not HAS_CUDA else s.name}): fused reads+writes "
          f"{model['fused'] / 2**30:.2f} GiB, unfused {model['unfused'] / 2**30:.2f} GiB "
          f"({model['ratio']:.2f}x) outside the attention loop itself.")
    if not HAS_CUDA:
        print("On CPU the fused Triton kernel only runs in the interpreter (correctness, not speed); "
              "the bytes model is the only prediction of the GPU gain.")
    ok = control_ops_section(device, args.quick) and ok
    ring_buffer_section(device, args.quick)
    print(f"\nresult: {'all checks passed' if ok else 'CHECK FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
