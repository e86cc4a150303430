"""Blend section of the harness: ``lock_kv`` against the eager ``torch.lerp`` blend, and the
fused ``qkv_epilogue`` against the stock processors' eager sequence (QK norm, RoPE, then a
``torch.lerp`` blend, each a separate op).

Functions the harness calls:
    checks(device)                      correctness rows (the Triton kernels against the
                                        fp32 references; through the interpreter on CPU)
    run(device, peaks, repeats, quick)  timing rows (CUDA: SPEC shapes, batch 3 with the
                                        in-batch source; CPU: small stand-ins, CPU times)
    model_rows()                        the bytes model at the SPEC shapes
    section(device, peaks, repeats, quick)  all three, plus a markdown text

The bytes model counts, op by op, what the eager code reads and writes: every tensor an
op touches is counted once per op at its distinct elements (an expanded, batch-stride-0
view counts once), views are free.  The stock sequence is counted by running the stock
diffusers attention processor itself on meta tensors at the real shape (nothing is
allocated) from the q/k/v projections up to the attention call; the fused op is one op
(q, k, v read once; q, K', V' written once; tables, weights, lock).  Cache effects are
ignored both ways, except that the across-heads RMSNorm's second pass over q and k is
assumed to hit L2 (its upper bound, one more read of q and k, is reported too).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvlock_kernels import reference
from kvlock_kernels.attention.epilogue import qkv_epilogue
from kvlock_kernels.attention.lock_kv import lock_kv
from kvlock_kernels.reference.epilogue import apply_norm, apply_rope

from .common import COGVIDEOX_5B, HUNYUAN, WAN_1_3B, AttnShape, bytes_row, device_peaks, token_lock

H100_BANDWIDTH = device_peaks("H100")[1]  # bytes/s, for the modelled times
BATCH = 3                 # cond, uncond and the in-batch source branch
SOURCE_INDEX = 2

# Model families: SPEC shape (its text tokens in front, or behind with text_last) and norm kind.
FAMILIES = {
    "wan": dict(shape=WAN_1_3B, norm="rms_across_heads"),
    "cogvideox": dict(shape=COGVIDEOX_5B, norm="layer_per_head"),
    "hunyuan": dict(shape=HUNYUAN, norm="rms_per_head"),
}
# CPU stand-ins: the same head layouts on a small token grid.
CPU_SHAPES = {
    "wan": AttnShape("wan2.1-1.3B heads, 15x26 tokens (CPU)", BATCH, 1, 15, 26, 12, 128),
    "cogvideox": AttnShape("cogvideox-5B heads, 15x15 + text (CPU)", BATCH, 1, 15, 15, 48, 64, text_tokens=226),
    "hunyuan": AttnShape("hunyuanvideo heads, 15x20 + text (CPU)", BATCH, 1, 15, 20, 24, 128, text_tokens=256,
                         text_last=True),
}


# ----------------------------------------------------------------------------- inputs
def _video_range(shape: AttnShape) -> tuple[int, int]:
    """(rope_start, S_rope): RoPE covers the video tokens."""
    return (0 if shape.text_last else shape.text_tokens), shape.video_tokens


def make_epilogue_inputs(family: str, shape: AttnShape, device, dtype=torch.bfloat16, *, alpha=0.7, fg=0.3,
                         seed=0):
    """Projections (B, S, H*D), the family's norm weights and RoPE tables, and a lock of
    weight alpha on background video tokens (0 on text and foreground)."""
    g = torch.Generator().manual_seed(seed)
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    q, k, v = (torch.randn(B, S, H * D, generator=g).to(device, dtype) for _ in range(3))
    norm = FAMILIES[family]["norm"]
    n = H * D if norm == "rms_across_heads" else D
    kw = dict(heads=H, norm=norm, norm_eps=1e-6, rope="interleaved")
    kw["norm_q_weight"], kw["norm_k_weight"] = ((1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
                                                for _ in range(2))
    if norm == "layer_per_head":
        kw["norm_q_bias"], kw["norm_k_bias"] = ((0.1 * torch.randn(n, generator=g)).to(device, dtype)
                                                for _ in range(2))
    start, n_rope = _video_range(shape)
    angle = torch.rand(n_rope, D // 2, generator=g) * 2 * math.pi
    kw.update(rope_cos=angle.cos().repeat_interleave(2, -1).to(device),
              rope_sin=angle.sin().repeat_interleave(2, -1).to(device), rope_start=start)
    video = torch.rand(shape.video_tokens, generator=g) > fg
    lock = torch.zeros(S)
    lock[start:start + shape.video_tokens] = alpha * video.float()
    kw.update(lock=lock.to(device), source_index=SOURCE_INDEX if B > SOURCE_INDEX else 0)
    return q, k, v, kw


def eager_epilogue(q, k, v, *, heads, norm, rope, rope_cos, rope_sin, rope_start, lock, source_index,
                   norm_q_weight=None, norm_q_bias=None, norm_k_weight=None, norm_k_bias=None, norm_eps=1e-6):
    """What a processor without the fused op runs: the stock norm and RoPE as separate ops,
    then the lock as a ``torch.lerp`` toward the source entry (broadcast view)."""
    qn = apply_rope(apply_norm(q, norm, heads, norm_q_weight, norm_q_bias, norm_eps), rope, rope_cos, rope_sin,
                    rope_start)
    kn = apply_rope(apply_norm(k, norm, heads, norm_k_weight, norm_k_bias, norm_eps), rope, rope_cos, rope_sin,
                    rope_start)
    vv = v.unflatten(-1, (heads, -1))
    return (qn,) + eager_lerp(kn, vv, lock, source_index)


def eager_lerp(k, v, lock, source_index):
    """The eager blend: ``torch.lerp`` toward the source entry, which is locked toward
    itself with weight 0 (one kernel per tensor, no selection rule)."""
    B = k.shape[0]
    w = (lock[None] if lock.dim() == 1 else lock).expand(B, -1).clone()
    w[source_index] = 0
    w = w[:, :, None, None].to(k.dtype)
    src = slice(source_index, source_index + 1)
    return torch.lerp(k, k[src].expand_as(k), w), torch.lerp(v, v[src].expand_as(v), w)


def make_lock_inputs(shape: AttnShape, device, dtype=torch.bfloat16, *, alpha=0.7, fg=0.3, seed=0):
    """k, v (B, S, H, D) and a lock (S,) of weight alpha on a random ``1 - fg`` of the video
    tokens (``common.token_lock``: 0 on text, in front or behind with ``text_last``)."""
    g = torch.Generator().manual_seed(seed)
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    k, v = (torch.randn(B, S, H, D, generator=g).to(device, dtype) for _ in range(2))
    lock = token_lock(shape, torch.rand(shape.video_tokens, generator=g) <= fg, alpha)
    return k, v, lock.to(device)


# ----------------------------------------------------------------------------- checks
def checks(device) -> list[dict]:
    """The Triton kernels against the fp32 references (flash-attention rule: error at most
    twice that of the same math in the inputs' dtype, plus a small atol)."""
    device = torch.device(device)
    rows = []
    small = {"wan": AttnShape("wan-like", BATCH, 1, 3, 13, 2, 128),
             "cogvideox": AttnShape("cogvideox-like + text", BATCH, 1, 3, 9, 2, 64, text_tokens=7),
             "hunyuan": AttnShape("hunyuan-like + text", BATCH, 1, 3, 9, 2, 72, text_tokens=5, text_last=True)}
    if device.type == "cuda":
        small = {f: s for f, s in CPU_SHAPES.items()}
    for family, shape in small.items():
        q, k, v, kw = make_epilogue_inputs(family, shape, device)
        out = qkv_epilogue(q, k, v, **kw, backend="triton")
        up = {n: (t.float() if isinstance(t, torch.Tensor) and n != "lock" else t) for n, t in kw.items()}
        truth = reference.qkv_epilogue(q.float(), k.float(), v.float(), **up)
        same = reference.qkv_epilogue(q, k, v, **kw)
        ok, details = True, []
        for name, o, t, s in zip("qkv", out, truth, same):
            err = (o.float() - t).abs().max().item()
            base = (s.float() - t).abs().max().item()
            ok &= err <= 2 * base + 2e-3
            details.append(f"{name} {err:.2e} (torch bf16 {base:.2e})")
        rows.append(dict(op="qkv_epilogue", case=f"{family}: {shape.name} S={shape.seqlen} bf16 branch", ok=ok,
                         detail="; ".join(details)))
    shape = small["cogvideox"]
    k, v, lock = make_lock_inputs(shape, device)
    for mode, kw in (("in-batch source", dict(source_index=SOURCE_INDEX)),
                     ("cache source, stride 0", dict(k_src=k[:1].clone().expand(BATCH, -1, -1, -1),
                                                     v_src=v[:1].clone().expand(BATCH, -1, -1, -1)))):
        out = lock_kv(k, v, lock, **kw, backend="triton")
        up = {n: t.float() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
        truth = reference.lock_kv(k.float(), v.float(), lock, **up)
        same = reference.lock_kv(k, v, lock, **kw)
        errs = [((o.float() - t).abs().max().item(), (s.float() - t).abs().max().item())
                for o, t, s in zip(out, truth, same)]
        ok = all(e <= 2 * b + 2e-3 for e, b in errs)
        rows.append(dict(op="lock_kv", case=f"{shape.name} S={shape.seqlen} bf16, {mode}", ok=ok,
                         detail="; ".join(f"{n} {e:.2e} (torch bf16 {b:.2e})" for n, (e, b) in zip("kv", errs))))
    return rows



# ----------------------------------------------------------------------------- bytes model
def _distinct_bytes(t: torch.Tensor) -> int:
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


_MATMULS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"}


class ByteCounter(TorchDispatchMode):
    """Sums the distinct bytes every op reads and writes (views are free; an op's
    mutated arguments count as written, not read).  Ops before ``start_after`` (e.g. the
    projections) and matmuls are left out."""

    def __init__(self, start_after_matmul: bool = False):
        super().__init__()
        self.read = self.written = 0
        self.ops = []
        self.started = not start_after_matmul

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if name in _MATMULS:
            self.started = True
            return out
        if not self.started or func.is_view or name in ("aten::empty", "aten::empty_like", "aten::empty_strided"):
            return out
        mutated = {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        read = written = 0
        for a, val in zip(func._schema.arguments, args):
            for t in (val if isinstance(val, (list, tuple)) else (val,)):
                if isinstance(t, torch.Tensor):
                    if a.name in mutated:
                        written += _distinct_bytes(t)
                    else:
                        read += _distinct_bytes(t)
        if not mutated:
            outs = out if isinstance(out, (list, tuple)) else (out,)
            written += sum(_distinct_bytes(t) for t in outs if isinstance(t, torch.Tensor))
        self.read += read
        self.written += written
        self.ops.append((name, read, written))
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


@contextmanager
def _meta_default():
    with torch.device("meta"):
        yield


@torch.library.custom_op("kvlock_bench::one_pass_rms_norm", mutates_args=())
def _one_pass_rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]) -> torch.Tensor:
    """A stand-in counted as one op (one read of x, one write): a fused RMSNorm kernel."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


@_one_pass_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def _one_pass_rms_norm(x, normalized_shape, weight=None, eps=None):
    return _one_pass_rms_norm_op(x, weight, eps)


def stock_processor_bytes(family: str, shape: AttnShape, dtype=torch.bfloat16, fused_rms_norm: bool = False) -> int:
    """Bytes the stock diffusers processor moves between the q/k/v projections and the
    attention call, counted op by op on meta tensors at the real shape.  ``F.rms_norm``
    decomposes into 8 ops on CPU and meta; ``fused_rms_norm`` counts it as one pass
    (a fused kernel, as torch may use on CUDA): the stock lower bound."""
    from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
    from diffusers.models.transformers import transformer_hunyuan_video as hunyuan
    from diffusers.models.transformers import transformer_wan as wan

    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    dim = H * D
    video, text = shape.video_tokens, shape.text_tokens
    counter = ByteCounter(start_after_matmul=True)
    with _meta_default():
        cos = torch.empty(video, D)
        sin = torch.empty(video, D)
        if family == "wan":
            attn = wan.WanAttention(dim=dim, heads=H, dim_head=D, eps=1e-6, processor=wan.WanAttnProcessor())
            x = torch.empty(B, S, dim, dtype=dtype)
            call = lambda: attn(x, rotary_emb=(cos[None, :, None], sin[None, :, None]))  # noqa: E731
            patch = mock.patch.object(wan, "dispatch_attention_fn", _stop)
        elif family == "cogvideox":
            attn = Attention(query_dim=dim, dim_head=D, heads=H, qk_norm="layer_norm", eps=1e-6, bias=True,
                             out_bias=True, processor=CogVideoXAttnProcessor2_0())
            xv, xt = torch.empty(B, video, dim, dtype=dtype), torch.empty(B, text, dim, dtype=dtype)
            call = lambda: attn(xv, encoder_hidden_states=xt, image_rotary_emb=(cos, sin))  # noqa: E731
            patch = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _stop)
        else:
            attn = Attention(query_dim=dim, cross_attention_dim=None, dim_head=D, heads=H, out_dim=dim, bias=True,
                             processor=hunyuan.HunyuanVideoAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6,
                             pre_only=True)
            xv, xt = torch.empty(B, video, dim, dtype=dtype), torch.empty(B, text, dim, dtype=dtype)
            call = lambda: attn(xv, encoder_hidden_states=xt, image_rotary_emb=(cos, sin))  # noqa: E731
            patch = mock.patch.object(hunyuan, "dispatch_attention_fn", _stop)
        attn = attn.to(dtype)
        norm_patch = (mock.patch.object(torch.nn.functional, "rms_norm", _one_pass_rms_norm) if fused_rms_norm
                      else mock.patch.object(torch.nn.functional, "rms_norm", torch.nn.functional.rms_norm))
        with patch, norm_patch, counter:
            try:
                call()
            except _Stop:
                pass
    return counter.total


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _count(fn) -> ByteCounter:
    counter = ByteCounter()
    with counter:
        fn()
    return counter


def epilogue_bytes(family: str, shape: AttnShape, dtype=torch.bfloat16) -> dict:
    """Bytes per layer call: the stock eager sequence, its lock (``torch.lerp`` of K and V
    toward the in-batch source), the fused op with and without the lock."""
    with _meta_default():
        q, k, v, kw = _meta_epilogue_inputs(family, shape, dtype)
        fused_lock = _count(lambda: qkv_epilogue(q, k, v, **kw, check_inputs=False)).total
        plain = {n: t for n, t in kw.items() if n not in ("lock", "source_index")}
        fused_plain = _count(lambda: qkv_epilogue(q, k, v, **plain)).total
        kk = torch.empty(shape.batch, shape.seqlen, shape.heads, shape.head_dim, dtype=dtype)
        lerp = _count(lambda: eager_lerp(kk, kk, kw["lock"], kw["source_index"])).total
    stock = stock_processor_bytes(family, shape, dtype)
    stock_fused_norm = stock_processor_bytes(family, shape, dtype, fused_rms_norm=True)
    reread = 0
    if FAMILIES[family]["norm"] == "rms_across_heads":  # pass 1 of q and k, if it missed L2
        reread = 2 * q.numel() * q.element_size()
    return dict(stock=stock, stock_fused_norm=stock_fused_norm, stock_lock=stock + lerp,
                stock_fused_norm_lock=stock_fused_norm + lerp, lerp=lerp, fused=fused_plain, fused_lock=fused_lock,
                fused_lock_upper=fused_lock + reread)


def _meta_epilogue_inputs(family, shape, dtype):
    B, S, H, D = shape.batch, shape.seqlen, shape.heads, shape.head_dim
    q, k, v = (torch.empty(B, S, H * D, dtype=dtype) for _ in range(3))
    norm = FAMILIES[family]["norm"]
    n = H * D if norm == "rms_across_heads" else D
    kw = dict(heads=H, norm=norm, rope="interleaved", norm_q_weight=torch.empty(n, dtype=dtype),
              norm_k_weight=torch.empty(n, dtype=dtype))
    if norm == "layer_per_head":
        kw.update(norm_q_bias=torch.empty(n, dtype=dtype), norm_k_bias=torch.empty(n, dtype=dtype))
    start, n_rope = _video_range(shape)
    kw.update(rope_cos=torch.empty(n_rope, D), rope_sin=torch.empty(n_rope, D), rope_start=start,
              lock=torch.empty(S), source_index=SOURCE_INDEX)
    return q, k, v, kw


def lock_kv_bytes(shape: AttnShape, dtype=torch.bfloat16) -> dict:
    """Bytes of one blend of K and V (batch 3, in-batch source; and a cache source)."""
    with _meta_default():
        k, v = (torch.empty(shape.batch, shape.seqlen, shape.heads, shape.head_dim, dtype=dtype) for _ in range(2))
        lock = torch.empty(shape.seqlen)
        src = torch.empty(1, shape.seqlen, shape.heads, shape.head_dim, dtype=dtype).expand_as(k)
        rows = dict(
            eager_lerp=_count(lambda: eager_lerp(k, v, lock, SOURCE_INDEX)).total,
            fused=_count(lambda: lock_kv(k, v, lock, source_index=SOURCE_INDEX, check_inputs=False)).total,
            fused_cache=_count(lambda: lock_kv(k, v, lock, k_src=src, v_src=src, check_inputs=False)).total,
        )
    # In place: the same reads, and the source entry is not written.
    rows["fused_inplace"] = rows["fused"] - 2 * k[0].numel() * k.element_size()
    return rows


def model_rows() -> list[dict]:
    """The bytes model at the SPEC shapes (batch 3, bf16), with the time it would take at
    H100 HBM bandwidth (3.35 TB/s)."""
    rows = []
    for family, spec in FAMILIES.items():
        shape = spec["shape"].with_batch(BATCH)
        eb = epilogue_bytes(family, shape)
        label = f"{shape.name} B{BATCH} S{shape.seqlen} H{shape.heads} D{shape.head_dim}"
        for design, key, note in (
                ("stock eager processor (norm + RoPE ops), no lock", "stock", "diffusers as shipped, op by op"),
                ("stock eager, F.rms_norm as one pass, no lock", "stock_fused_norm",
                 "lower bound if torch fuses rms_norm"),
                ("stock eager + torch.lerp lock of K, V", "stock_lock", "KV-Lock without the fused op"),
                ("stock eager (one-pass F.rms_norm) + torch.lerp lock", "stock_fused_norm_lock", ""),
                ("fused qkv_epilogue, no lock", "fused", "one read of q, k, v; one write"),
                ("fused qkv_epilogue with lock (in-batch source)", "fused_lock", "the source is a batch entry"),
                ("fused with lock, upper bound (across-heads pass 1 misses L2)", "fused_lock_upper", "")):
            if (key in ("fused_lock_upper", "stock_fused_norm", "stock_fused_norm_lock")
                    and eb[key] == eb[{"fused_lock_upper": "fused_lock", "stock_fused_norm": "stock",
                                       "stock_fused_norm_lock": "stock_lock"}[key]]):
                continue
            rows.append(dict(op="qkv_epilogue", shape=label, design=design, gbytes=eb[key] / 1e9,
                             vs_fused=eb[key] / eb["fused_lock"],
                             h100_ms=eb[key] / H100_BANDWIDTH * 1e3, note=note))
        lb = lock_kv_bytes(shape)
        for design, key in (("eager torch.lerp of K and V", "eager_lerp"), ("lock_kv (functional)", "fused"),
                            ("lock_kv inplace=True", "fused_inplace"), ("lock_kv, cache source (stride 0)",
                                                                        "fused_cache")):
            rows.append(dict(op="lock_kv", shape=label, design=design, gbytes=lb[key] / 1e9,
                             vs_fused=lb[key] / lb["fused"], h100_ms=lb[key] / H100_BANDWIDTH * 1e3, note=""))
    return rows


# ----------------------------------------------------------------------------- timing
def run(device, peaks=None, repeats=5, quick=False) -> list[dict]:
    """Timing rows: the fused kernels, the PyTorch paths and the eager sequences.  CUDA:
    the SPEC shapes; CPU: small stand-ins (CPU times, the Triton kernels are not timed
    under the interpreter)."""
    device = torch.device(device)
    rows = []
    for family in (("wan",) if quick else tuple(FAMILIES)):
        rows += _family_rows(family, device, peaks, repeats)
    return rows


def _family_rows(family, device, peaks, repeats):
    cuda = device.type == "cuda"
    shape = FAMILIES[family]["shape"].with_batch(BATCH) if cuda else CPU_SHAPES[family]
    cpu = "" if cuda else " [CPU]"
    label = f"{shape.name} B{shape.batch} S{shape.seqlen} H{shape.heads} D{shape.head_dim}"
    q, k, v, kw = make_epilogue_inputs(family, shape, device)
    with _meta_default():
        mq, mk, mv, mkw = _meta_epilogue_inputs(family, shape, torch.bfloat16)
        fused_b = _count(lambda: qkv_epilogue(mq, mk, mv, **mkw, check_inputs=False)).total
        eager_b = _count(lambda: eager_epilogue(mq, mk, mv, **mkw)).total
        # The PyTorch path: the reference's ops, then fresh outputs (a copy each).
        torch_b = _count(lambda: reference.qkv_epilogue(mq, mk, mv, **mkw)).total + 2 * 3 * _nbytes(mq)
    providers = (("kvlock qkv_epilogue (Triton, fused)",
                  (lambda: qkv_epilogue(q, k, v, **kw, backend="triton", check_inputs=False)) if cuda else None,
                  fused_b),
                 ("kvlock qkv_epilogue backend=torch" + cpu,
                  lambda: qkv_epilogue(q, k, v, **kw, backend="torch", check_inputs=False), torch_b),
                 ("eager: norm, RoPE, torch.lerp as separate ops" + cpu,
                  lambda: eager_epilogue(q, k, v, **kw), eager_b))
    rows = _time_rows("qkv_epilogue", label, providers, device, peaks, repeats)

    kk, vv, lock = make_lock_inputs(shape, device)
    with _meta_default():
        mk4, mv4, mlock = torch.empty(kk.shape, dtype=kk.dtype), torch.empty(kk.shape, dtype=kk.dtype), \
            torch.empty(shape.seqlen)
        lock_b = _count(lambda: lock_kv(mk4, mv4, mlock, source_index=SOURCE_INDEX, check_inputs=False)).total
        lerp_b = _count(lambda: eager_lerp(mk4, mv4, mlock, SOURCE_INDEX)).total
        torch_lock_b = _count(lambda: reference.lock_kv(mk4, mv4, mlock, source_index=SOURCE_INDEX)).total
    providers = (("kvlock lock_kv (Triton)",
                  (lambda: lock_kv(kk, vv, lock, source_index=SOURCE_INDEX, backend="triton",
                                   check_inputs=False)) if cuda else None, lock_b),
                 ("kvlock lock_kv backend=torch" + cpu,
                  lambda: lock_kv(kk, vv, lock, source_index=SOURCE_INDEX, backend="torch", check_inputs=False),
                  torch_lock_b),
                 ("eager torch.lerp of K and V" + cpu, lambda: eager_lerp(kk, vv, lock, SOURCE_INDEX), lerp_b))
    return rows + _time_rows("lock_kv", label, providers, device, peaks, repeats)


def _time_rows(op, label, providers, device, peaks, repeats):
    """One row per provider; the last provider is the eager baseline (vs_eager: its time
    over this one's; model_ratio: its modelled bytes over this one's)."""
    rows = _timed(op, label, providers, device, peaks, repeats)
    eager, eager_bytes = rows[-1], providers[-1][2]
    for r in rows:
        r["model_ratio"] = eager_bytes / r["model_bytes"] if r.get("model_bytes") else None
        if r["status"] == "ok" and eager["status"] == "ok":
            r["vs_eager"] = eager["median_ms"] / r["median_ms"]
    return rows


def _timed(op, label, providers, device, peaks, repeats):
    rows = []
    for name, fn, nbytes in providers:
        row = dict(op=op, shape=label, provider=name)
        if fn is None:
            rows.append(dict(row, status="unavailable: the Triton kernel is timed on CUDA only", model_bytes=nbytes))
            continue
        with torch.no_grad():
            rows.append(bytes_row(row, fn, nbytes, device, peaks, repeats))
    return rows


# ----------------------------------------------------------------------------- section
def _table(rows, keys):
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            x = r.get(k)
            cells.append(f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(device, peaks=None, repeats=5, quick=False) -> dict:
    device = torch.device(device)
    out = dict(checks=checks(device), rows=run(device, peaks, repeats, quick), model=model_rows())
    timing = [dict(r, median_ms=r.get("median_ms", r["status"])) for r in out["rows"]]
    out["text"] = "\n\n".join([
        "## blend: lock_kv and the fused qkv_epilogue",
        _table(out["checks"], ["op", "case", "ok", "detail"]),
        ("CPU times (PyTorch paths; the Triton kernels are timed on CUDA only)." if device.type != "cuda"
         else "CUDA times."),
        _table(timing, ["op", "shape", "provider", "median_ms", "gbps", "roofline_pct"]),
        "Bytes model (bf16, batch 3 with the in-batch source; modelled ms at 3.35 TB/s):",
        _table(out["model"], ["op", "shape", "design", "gbytes", "vs_fused", "h100_ms", "note"]),
    ])
    return out


if __name__ == "__main__":  # python -m benchmarks.blend
    print(section(torch.device("cuda" if torch.cuda.is_available() else "cpu"), repeats=3, quick=True)["text"])
