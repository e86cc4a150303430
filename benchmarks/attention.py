"""Attention sections of the harness: kv_lock_attention against its alternatives, and the
two routed paths (blend then plain attention, or the fused kernel) side by side with the
cost model's prediction and choice."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlock_kernels import kv_lock_attention, lock_kv, reference
from kvlock_kernels.attention import routing

from .common import attention_bytes, make_attention_inputs, roofline_percent, time_fn

ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _lerp_blend(k, v, ks, vs, lock):
    """The blend materialised: K' and V' as ``torch.lerp`` toward the source."""
    w = lock[:, :, None, None].to(k.dtype)
    return torch.lerp(k, ks, w), torch.lerp(v, vs, w)


def unfused(q, k, v, ks, vs, lock):
    """What a pipeline does without this library: materialise the blend, then SDPA."""
    return sdpa_ceiling(q, *_lerp_blend(k, v, ks, vs, lock))


def sdpa_ceiling(q, k, v, *_):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _fused_triton(cuda):
    """(callable or None, why unavailable) of the fused Triton kernel."""
    if not cuda:
        return None, "Triton needs a GPU (the interpreter checks correctness only)"
    return (lambda *a: kv_lock_attention(*a, backend="triton", check_inputs=False)), ""


def providers(device):
    """[(name, bytes kind, callable or None, why unavailable)] in report order."""
    cuda = device.type == "cuda"
    rows = [("kvlock (Triton, fused)", "fused", *_fused_triton(cuda))]
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
            kb, vb = _lerp_blend(k, v, ks, vs, lock)
            return flex_compiled(q.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)).transpose(1, 2)

        rows.append(("FlexAttention (blend materialised)", "unfused", flex, ""))
    else:
        rows.append(("FlexAttention (blend materialised)", "unfused", None,
                     "compiled FlexAttention targets CUDA; on CPU it is an unfused reference"))
    return rows


def _time_row(row, fn, why, inputs, device, repeats):
    """``row`` with ``fn(*inputs)`` timed: status "ok" and median/min/max ms, "unavailable"
    (no ``fn``) or "failed" (a provider failing on a shape is a result, not a crash)."""
    if fn is None:
        return dict(row, status=f"unavailable: {why}")
    try:
        med, lo, hi = time_fn(lambda: fn(*inputs), warmup=1, repeats=repeats, device=device)
    except Exception as e:
        return dict(row, status=f"failed: {type(e).__name__}: {e}"[:200])
    return dict(row, status="ok", median_ms=med, min_ms=lo, max_ms=hi)


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


def check_plain(device, dtype=torch.bfloat16) -> list[tuple[str, bool, str]]:
    """``routing.plain_attention`` on every usable backend against the fp32 oracle (flash-
    attention rule, out and lse) at a small GQA shape with odd lengths."""
    g = torch.Generator().manual_seed(1)
    B, Sq, Skv, Hq, Hkv, D = 2, 77, 91, 4, 2, 64
    q = torch.randn(B, Sq, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Skv, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, Skv, Hkv, D, generator=g).to(device, dtype)
    ref, ref_lse = reference.kv_lock_attention(q.float(), k.float(), v.float(), return_lse=True)
    same = reference.kv_lock_attention(q, k, v, upcast=False)
    base = (same.float() - ref).abs().max().item()
    out = []
    for b in routing.plain_attention_backends(device, dtype, D):
        o, lse = routing.plain_attention(q, k, v, return_lse=True, backend=b)
        err = (o.float() - ref).abs().max().item()
        lse_err = (lse.float() - ref_lse).abs().max().item()
        ok = err <= 2 * base + ATOL[dtype] and lse_err <= 1e-2
        out.append((b, ok, f"max|out-ref| {err:.2e} <= 2 x {base:.2e} + {ATOL[dtype]:g}, max|lse-ref| {lse_err:.1e}"))
    return out


def run(shapes, batches, fg_fractions, device, peaks, repeats, dtype=torch.bfloat16):
    """One row per (shape, batch, fg, provider)."""
    rows = []
    for base in shapes:
        for batch in batches:
            shape = base.with_batch(batch)
            for fg in fg_fractions:
                inputs = make_attention_inputs(shape, dtype, device, fg_fraction=fg)
                nbytes = attention_bytes(shape)
                group, unfused_ms = [], None
                for name, kind, fn, why in providers(device):
                    row = dict(op="kv_lock_attention", shape=shape.name, batch=batch, seqlen=shape.seqlen,
                               heads=shape.heads, head_dim=shape.head_dim, fg=fg, provider=name)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row = _time_row(row, fn, why, inputs, device, repeats)
                    group.append(row)
                    if row["status"] != "ok":
                        continue
                    med = row["median_ms"]
                    peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
                    if name.startswith("unfused"):
                        unfused_ms = med
                    row.update(tflops=shape.flops() / (med * 1e-3) / 1e12, gbps=nbytes[kind] / (med * 1e-3) / 1e9,
                               roofline_pct=roofline_percent(shape.flops(), nbytes[kind], med * 1e-3, peaks),
                               peak_mem_mb=peak_mb, model_bytes=nbytes[kind])
                for r in group:
                    if r["status"] == "ok" and unfused_ms:
                        r["vs_unfused"] = unfused_ms / r["median_ms"]
                rows += group
    return rows


PATH_ALPHAS = (0.0, 0.5, 1.0)


def blend_impl(device):
    """fn(k, v, lock, k_src, v_src) -> (K', V'): ``lock_kv`` (its PyTorch path on CPU: CPU
    times time the PyTorch paths)."""
    backend = "auto" if device.type == "cuda" else "torch"
    return lambda k, v, lock, ks, vs: lock_kv(k, v, lock, k_src=ks, v_src=vs, backend=backend, check_inputs=False)


def _plain_fn(backend):
    return lambda q, k, v, *_: routing.plain_attention(q, k, v, backend=backend)


def _blend_then(blend, backend):
    def run(q, k, v, ks, vs, lock):
        kb, vb = blend(k, v, lock, ks, vs)
        return routing.plain_attention(q, kb, vb, backend=backend)
    return run


def path_providers(device, dtype, head_dim):
    """[(name, kind, callable or None, why unavailable)]: plain attention on each backend,
    the blend then each backend, the fused kernel and ``kv_lock_attention(backend="auto")``."""
    usable = routing.plain_attention_backends(device, dtype, head_dim)
    blend = blend_impl(device)
    reasons = {"fa3": "flash_attn_interface (FA3) not importable or not sm_90",
               "fa2": "flash_attn (FA2) not importable or not sm_80+"}
    rows = []
    for b in routing.PLAIN_BACKENDS:
        ok = b in usable
        rows.append((f"plain {b} (no lock)", ("plain", b), _plain_fn(b) if ok else None, "" if ok else reasons[b]))
    for b in routing.PLAIN_BACKENDS:
        ok = b in usable
        rows.append((f"blend + {b}", ("blend", b), _blend_then(blend, b) if ok else None, "" if ok else reasons[b]))
    cuda = device.type == "cuda"
    rows.append(("fused (Triton)", ("fused", None), *_fused_triton(cuda)))
    if cuda:
        rows.append(("kv_lock_attention auto", ("auto", None),
                     lambda *a: kv_lock_attention(*a, backend="auto", check_inputs=False), ""))
    else:
        rows.append(("kv_lock_attention backend=torch", ("auto", None),
                     lambda *a: kv_lock_attention(*a, backend="torch", check_inputs=False), ""))
    return rows


def _modelled_ms(kind, backend, dims, prof, blended, block_m):
    """The cost model's ms for one provider of the paths table (None for "auto": its
    route is printed beside the table)."""
    B, S, _, H, _, D, dtype = dims
    if kind == "plain":
        return routing.plain_time(backend, *dims, prof) * 1e3
    if kind == "blend":
        return (routing.blend_time(B, S, H, D, dtype, prof) + routing.plain_time(backend, *dims, prof)) * 1e3
    if kind == "fused":
        return routing.fused_time(*dims, prof, blended_fraction=blended, block_m=block_m) * 1e3
    return None


def path_rows(shapes, alphas, device, peaks, repeats, *, fg=0.3, dtype=torch.bfloat16):
    """Time the routed paths at ``alphas`` with a moving-rectangle mask; each row carries
    the cost model's time for the same path on this device (GPU only) and the route
    ``choose_path`` takes here.  ``pct_of_plain``: the best measured plain attention's
    time over this row's, in percent."""
    from .model import block_classes

    rows, notes = [], []
    cuda = device.type == "cuda"
    prof = routing.device_profile(device) if cuda else None
    for shape in shapes:
        B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
        route = routing.choose_path(B, S, S, H, H, D, dtype, device)
        providers = path_providers(device, dtype, D)
        notes.append(dict(shape=shape.name, batch=B, route=route.path, plain_backend=route.plain_backend,
                          modelled_ms=route.modelled_ms if cuda else None, why=route.why, blend="lock_kv"))
        bm, bn, _ = routing.fused_blocks(D, dtype, max(prof.arch, 80) if cuda else 90)
        dims = (B, S, S, H, H, D, dtype)
        base = make_attention_inputs(shape, dtype, device, fg_fraction=fg, alpha=1.0, mask="moving")
        for alpha in alphas:
            inputs = base[:5] + (base[5] * alpha,)  # the same tensors, the lock at this alpha
            classes = block_classes(inputs[5].expand(B, -1), bn)
            blended = sum(c["const"] + c["mixed"] for c in classes) / B
            group = []
            for name, (kind, backend), fn, why in providers:
                row = dict(op="locked attention paths", shape=shape.name, batch=B, seqlen=S, heads=H, head_dim=D,
                           alpha=alpha, fg=fg, provider=name, kind=kind, backend=backend,
                           route=f"{route.path}/{route.plain_backend}", blended_fraction=blended)
                row = _time_row(row, fn, why, inputs, device, repeats)
                group.append(row)
                if row["status"] == "ok":
                    row.update(model_ms=_modelled_ms(kind, backend, dims, prof, blended, bm) if cuda else None,
                               tflops=shape.flops() / (row["median_ms"] * 1e-3) / 1e12)
            plain_ok = [r["median_ms"] for r in group if r["status"] == "ok" and r["kind"] == "plain"]
            for r in group:
                if r["status"] == "ok" and plain_ok:
                    r["pct_of_plain"] = 100.0 * min(plain_ok) / r["median_ms"]
            rows += group
    return rows, notes
