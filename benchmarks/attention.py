"""Attention section of the harness: kv_lock_attention against its alternatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlock_kernels import kv_lock_attention, reference

from .common import attention_bytes, make_attention_inputs, roofline_percent, time_fn

ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def unfused(q, k, v, ks, vs, lock):
    """What a pipeline does without this library: materialise the blend, then SDPA."""
    w = lock[:, :, None, None].to(k.dtype)
    kb, vb = torch.lerp(k, ks, w), torch.lerp(v, vs, w)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)).transpose(1, 2)


def sdpa_ceiling(q, k, v, *_):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def providers(device):
    """[(name, bytes kind, callable or None, why unavailable)] in report order."""
    cuda = device.type == "cuda"
    rows = [("kvlock (Triton, fused)", "fused",
             (lambda *a: kv_lock_attention(*a, backend="triton", check_inputs=False)) if cuda else None,
             "" if cuda else "Triton needs a GPU (the interpreter checks correctness only)")]
    rows.append(("kvlock backend=torch", "unfused", lambda *a: kv_lock_attention(*a, backend="torch",
                                                                                 check_inputs=False), ""))
    rows.append(("unfused: lerp + SDPA", "unfused", unfused, ""))
    rows.append(("SDPA, no blend (ceiling)", "plain", sdpa_ceiling, ""))
    try:
        from flash_attn import flash_attn_func
        flash = (lambda q, k, v, *_: flash_attn_func(q, k, v)) if cuda else None
        why = "" if cuda else "flash-attn needs a GPU"
    except Exception:
        flash, why = None, "flash-attn not installed"
    rows.append(("flash-attn, no blend", "plain", flash, why))
    if cuda:
        from torch.nn.attention.flex_attention import flex_attention
        flex_compiled = torch.compile(flex_attention, dynamic=False)

        def flex(q, k, v, ks, vs, lock):
            # score_mod cannot change K/V: the blend is materialised first.
            w = lock[:, :, None, None].to(k.dtype)
            kb, vb = torch.lerp(k, ks, w), torch.lerp(v, vs, w)
            return flex_compiled(q.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)).transpose(1, 2)

        rows.append(("FlexAttention (blend materialised)", "unfused", flex, ""))
    else:
        rows.append(("FlexAttention (blend materialised)", "unfused", None,
                     "compiled FlexAttention targets CUDA; on CPU it is an unfused reference"))
    return rows


def check(shape, dtype, device, backend) -> tuple[bool, str]:
    """Flash-attention rule at a large shape.  The reference is the memory-efficient torch
    path on fp32 inputs (blend in fp32, SDPA in fp32); the baseline the same in dtype."""
    q, k, v, ks, vs, lock = make_attention_inputs(shape, dtype, device)
    out = kv_lock_attention(q, k, v, ks, vs, lock, backend=backend)
    ref = reference.kv_lock_attention_torch(*[t.float() for t in (q, k, v, ks, vs)], lock)
    same = reference.kv_lock_attention_torch(q, k, v, ks, vs, lock)
    err = (out.float() - ref).abs().max().item()
    base = (same.float() - ref).abs().max().item()
    ok = err <= 2 * base + ATOL[dtype]
    return ok, f"max|out-ref| {err:.2e} <= 2 x {base:.2e} + {ATOL[dtype]:g}"


def run(shapes, batches, fg_fractions, device, peaks, repeats, dtype=torch.bfloat16):
    """One row per (shape, batch, fg, provider)."""
    rows = []
    for base in shapes:
        for batch in batches:
            shape = base.with_batch(batch)
            for fg in fg_fractions:
                inputs = make_attention_inputs(shape, dtype, device, fg_fraction=fg)
                nbytes = attention_bytes(shape)
                unfused_ms = None
                for name, kind, fn, why in providers(device):
                    row = dict(op="kv_lock_attention", shape=shape.name, batch=batch, seqlen=shape.seqlen,
                               heads=shape.heads, head_dim=shape.head_dim, fg=fg, provider=name)
                    if fn is None:
                        rows.append(dict(row, status=f"unavailable: {why}"))
                        continue
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        med, lo, hi = time_fn(lambda fn=fn, inputs=inputs: fn(*inputs), warmup=1, repeats=repeats,
                                              device=device)
                    except Exception as e:  # a provider failing on a shape is a result, not a crash
                        rows.append(dict(row, status=f"failed: {type(e).__name__}: {e}"[:200]))
                        continue
                    peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
                    if name.startswith("unfused"):
                        unfused_ms = med
                    rows.append(dict(row, status="ok", median_ms=med, min_ms=lo, max_ms=hi,
                                     tflops=shape.flops() / (med * 1e-3) / 1e12,
                                     gbps=nbytes[kind] / (med * 1e-3) / 1e9,
                                     roofline_pct=roofline_percent(shape.flops(), nbytes[kind], med * 1e-3, peaks),
                                     peak_mem_mb=peak_mb, model_bytes=nbytes[kind]))
                for r in rows:
                    if r.get("status") == "ok" and r["shape"] == shape.name and r["batch"] == batch and \
                            r["fg"] == fg and unfused_ms:
                        r["vs_unfused"] = unfused_ms / r["median_ms"]
    return rows


def model_rows(shapes, batches, peaks=(989e12, 3.35e12), peaks_name="H100 SXM"):
    """Bytes-and-FLOPs prediction per SPEC shape: fused = roofline of attention with the
    blend inside; unfused = attention's roofline plus the blend's own bandwidth-bound pass."""
    rows = []
    for base in shapes:
        for batch in batches:
            s = base.with_batch(batch)
            nb = attention_bytes(s)
            attn = max(s.flops() / peaks[0], nb["plain"] / peaks[1])
            fused = max(s.flops() / peaks[0], nb["fused"] / peaks[1])
            unfused = attn + (nb["unfused"] - nb["plain"]) / peaks[1]
            rows.append(dict(shape=s.name, batch=batch, seqlen=s.seqlen, tflop=s.flops() / 1e12,
                             fused_gib=nb["fused"] / 2 ** 30, unfused_gib=nb["unfused"] / 2 ** 30,
                             blend_mib=(nb["unfused"] - nb["plain"]) / 2 ** 20,
                             fused_ms=fused * 1e3, unfused_ms=unfused * 1e3, speedup=unfused / fused,
                             device_model=peaks_name))
    return rows
