"""The GPU tier: every config of the fused kernel's table and every path of a locked
attention call against the references, on a real GPU, with the flash-attention rule.

    TRITON_INTERPRET=0 python -m pytest -q -m cuda tests/test_cuda_tier.py

Every test here is marked ``cuda`` and skipped without a CUDA GPU.  ``tests/conftest.py``
sets TRITON_INTERPRET=1 unless it is set already, and under the interpreter a Triton
kernel on CUDA tensors would run on the CPU: the tests that launch Triton kernels skip
with that message unless TRITON_INTERPRET=0.  ``KVLOCK_TIER_DEVICE=cpu`` runs the tier on
CPU tensors through the interpreter instead (slow; it checks the tier's own code, not the
GPU).  The parametrisation builders are plain functions, exercised on CPU by
tests/test_routing.py.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import ATOL, assert_fa_close

from kvlock_kernels import reference
from kvlock_kernels._utils import triton_interpreting
from kvlock_kernels.attention import configs, routing
from kvlock_kernels.attention.configs import configs_for
from kvlock_kernels.attention.epilogue import qkv_epilogue
from kvlock_kernels.attention.kv_lock_attention import fused_attention_with_config
from kvlock_kernels.attention.lock_kv import lock_kv

TIER_DEVICE = os.environ.get("KVLOCK_TIER_DEVICE", "cuda")
CUDA = torch.cuda.is_available()
HAVE_DEVICE = CUDA if TIER_DEVICE == "cuda" else True
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A head dim per tier of the config table ("unaligned": a contiguous head dim whose row
# stride is not a multiple of 16 elements).
TIER_HEAD_DIMS = {"d64": (64,), "d128": (128, 80), "d256": (256,), "unaligned": (72,)}
NORMS = ("none", "rms_across_heads", "rms_per_head", "layer_per_head")
ROPES = ("none", "interleaved", "half")
LOCK_KV_MODES = ("cache_shared", "cache_per_entry", "branch", "branch_inplace")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_DEVICE, reason="the GPU tier needs a CUDA GPU (none here)")]
needs_gpu_triton = pytest.mark.skipif(
    TIER_DEVICE == "cuda" and triton_interpreting(),
    reason="TRITON_INTERPRET=1 would run the Triton kernels through the CPU interpreter: "
           "run the GPU tier with TRITON_INTERPRET=0")


# --------------------------------------------------------------------------------------
# Parametrisation builders (plain functions: tests/test_routing.py runs them on CPU)
# --------------------------------------------------------------------------------------
def tier_arch() -> int:
    """sm_<arch> of the GPU the tier runs on (sm_90 where there is none, for collection)."""
    if CUDA:
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def fused_config_cases(arch: int | None = None) -> list[tuple[str, int, tuple]]:
    """(dtype name, head dim, config) for every entry of the fused kernel's config table
    (``attention.configs.KERNEL_CONFIGS``) for ``arch``'s family, every dtype and every
    head-dim tier."""
    arch = tier_arch() if arch is None else arch
    family = configs.KERNEL_CONFIGS[configs.arch_family(arch)]
    cases = []
    for dtype_name, tiers in family.items():
        for tier, entries in tiers.items():
            for head_dim in TIER_HEAD_DIMS.get(tier, ()):
                for cfg in entries:
                    cases.append((dtype_name, head_dim, tuple(int(c) for c in cfg)))
    return cases


def spec_like_cases() -> list[tuple[str, int, int, int, int]]:
    """(dtype, batch, frames, heads, head_dim) of the SPEC-like shapes: Wan2.1 480p rows
    (30 x 52 tokens per latent frame) and CogVideoX's head layout with text tokens."""
    return [("bf16", 3, 3, 12, 128), ("fp16", 2, 3, 12, 128), ("bf16", 2, 2, 48, 64)]


def epilogue_cases() -> list[tuple[str, str, str]]:
    """(norm, rope, dtype) for every norm and RoPE kind of ``qkv_epilogue``."""
    return [(n, r, d) for n in NORMS for r in ROPES for d in ("bf16", "fp16", "fp32")]


def lock_kv_cases() -> list[tuple[str, str, int]]:
    """(mode, dtype, head dim) for ``lock_kv``."""
    return [(m, d, hd) for m in LOCK_KV_MODES for d in ("bf16", "fp16", "fp32") for hd in (64, 80, 128)]


def _case_id(case) -> str:
    return "-".join("x".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in case)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def _device():
    return torch.device(TIER_DEVICE)


def _attention_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, *, seed=0, lock="mixed"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(_device(), dtype)

    q, k, v = rnd(B, Sq, Hq, D), rnd(B, Skv, Hkv, D), rnd(B, Skv, Hkv, D)
    k_src, v_src = rnd(1, Skv, Hkv, D).expand(B, -1, -1, -1), rnd(1, Skv, Hkv, D).expand(B, -1, -1, -1)
    w = torch.rand(B, Skv, generator=g)
    blocks = torch.arange(Skv) // 48  # all-0, all-1, constant and mixed stretches
    w[:, blocks % 4 == 0] = 0.0
    w[:, blocks % 4 == 1] = 1.0
    w[:, blocks % 4 == 2] = 0.5
    if lock == "binary":
        w = (w > 0.5).float()
    return q, k, v, k_src, v_src, w.to(_device())


def _moving_rect_lock(B, frames, height, width, alpha, text=0, fg=0.3, device=None):
    side = fg ** 0.5
    bh, bw = max(1, round(height * side)), max(1, round(width * side))
    m = torch.zeros(frames, height, width, dtype=torch.bool)
    for t in range(frames):
        h0 = round(t * (height - bh) / max(frames - 1, 1))
        w0 = round(t * (width - bw) / max(frames - 1, 1))
        m[t, h0:h0 + bh, w0:w0 + bw] = True
    w = torch.cat([torch.zeros(text), alpha * (~m.flatten()).float()])
    return w[None].repeat(B, 1).to(device or _device())


def _oracle(q, k, v, k_src, v_src, lock, **kw):
    """(fp32 ground truth, same-dtype baseline, fp32 lse) of a locked attention call."""
    up = [t.float() if t is not None else None for t in (q, k, v, k_src, v_src)]
    ref, ref_lse = reference.kv_lock_attention(*up, lock, return_lse=True, **kw)
    same = reference.kv_lock_attention(q, k, v, k_src, v_src, lock, upcast=False, **kw)
    return ref, same, ref_lse


def _check_out(out, ref, same, dtype, lse=None, ref_lse=None):
    assert_fa_close(out, ref, same, atol=ATOL[dtype])
    if lse is not None:
        assert lse.shape == ref_lse.shape
        assert (lse.float() - ref_lse).abs().max().item() <= 1e-2


# --------------------------------------------------------------------------------------
# The fused kernel: every config of the table
# --------------------------------------------------------------------------------------
@needs_gpu_triton
@pytest.mark.parametrize("case", fused_config_cases(), ids=_case_id)
@pytest.mark.parametrize("lock_kind", ["mixed", "binary"])
def test_fused_every_config(case, lock_kind):
    fused = fused_attention_with_config
    dtype_name, D, config = case
    dtype = DTYPES[dtype_name]
    # Lengths not multiples of any block, GQA 2:1, batch 3, a batch-stride-0 source.
    q, k, v, ks, vs, lock = _attention_inputs(3, 203, 333, 4, 2, D, dtype, lock=lock_kind)
    out, lse = fused(q, k, v, ks, vs, lock, config, return_lse=True)
    ref, same, ref_lse = _oracle(q, k, v, ks, vs, lock)
    _check_out(out, ref, same, dtype, lse, ref_lse)
    # No lock: the plain path of the same config.
    out = fused(q, k, v, None, None, None, config)
    ref, same, _ = _oracle(q, k, v, None, None, None)
    _check_out(out, ref, same, dtype)


@needs_gpu_triton
@pytest.mark.parametrize("case", spec_like_cases(), ids=_case_id)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_spec_like(case, alpha):
    fused = fused_attention_with_config
    dtype_name, B, frames, H, D = case
    dtype = DTYPES[dtype_name]
    text = 26 if D == 64 else 0
    S = frames * 30 * 52 + text
    q, k, v, ks, vs, _ = _attention_inputs(B, S, S, H, H, D, dtype)
    lock = _moving_rect_lock(B, frames, 30, 52, alpha, text=text)
    ref, same, ref_lse = _oracle(q, k, v, ks, vs, lock)
    for config in configs_for(D, dtype, tier_arch())[:2]:
        out, lse = fused(q, k, v, ks, vs, lock, tuple(config), return_lse=True)
        _check_out(out, ref, same, dtype, lse, ref_lse)


# --------------------------------------------------------------------------------------
# Plain attention and the blend-then-plain path, per backend
# --------------------------------------------------------------------------------------
def _usable_or_skip(backend, dtype, D):
    usable = routing.plain_attention_backends(_device(), dtype, D)
    if backend not in usable:  # FA3 needs sm_90 and flash_attn_interface, FA2 flash_attn: optional installs
        pytest.skip(f"plain backend {backend!r} is not usable here (usable: {usable})")


@pytest.mark.parametrize("backend", routing.PLAIN_BACKENDS)
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "fp32"])
def test_plain_attention_backend(backend, dtype_name):
    dtype = DTYPES[dtype_name]
    _usable_or_skip(backend, dtype, 64)
    q, k, v, *_ = _attention_inputs(2, 203, 333, 8, 2, 64, dtype)
    out, lse = routing.plain_attention(q, k, v, return_lse=True, backend=backend)
    ref, same, ref_lse = _oracle(q, k, v, None, None, None)
    _check_out(out, ref, same, dtype, lse, ref_lse)
    out = routing.plain_attention(q, k, v, softmax_scale=0.3, backend=backend)
    ref, same, _ = _oracle(q, k, v, None, None, None, softmax_scale=0.3)
    _check_out(out, ref, same, dtype)


@needs_gpu_triton
@pytest.mark.parametrize("backend", routing.PLAIN_BACKENDS)
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 333, 4, 2, 128), (2, 2 * 30 * 52, 12, 12, 128)], ids=["small", "spec-like"])
def test_blend_then_plain(backend, dtype_name, shape):
    dtype = DTYPES[dtype_name]
    B, S, Hq, Hkv, D = shape
    _usable_or_skip(backend, dtype, D)
    q, k, v, ks, vs, lock = _attention_inputs(B, S, S, Hq, Hkv, D, dtype)
    kb, vb = lock_kv(k, v, lock, k_src=ks, v_src=vs)
    out = routing.plain_attention(q, kb, vb, backend=backend)
    ref, same, _ = _oracle(q, k, v, ks, vs, lock)
    _check_out(out, ref, same, dtype)


@needs_gpu_triton
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("lock_kind", ["mixed", "binary"])
@pytest.mark.parametrize("source", ["stride0", "in_batch"])
@pytest.mark.parametrize("shape", [(3, 333, 333), (3, 2 * 30 * 52, 2 * 30 * 52)], ids=["small", "spec-like"])
def test_kv_lock_attention_auto(dtype_name, lock_kind, source, shape):
    """Whatever path ``backend="auto"`` takes (the route differs with the shape and with
    return_lse), the result is the reference's; an in-batch source (a stride-0 view of
    entry 0) goes through lock_kv's source_index."""
    from kvlock_kernels import kv_lock_attention
    dtype = DTYPES[dtype_name]
    B, Sq, Skv = shape
    q, k, v, ks, vs, lock = _attention_inputs(B, Sq, Skv, 4, 2, 128, dtype, lock=lock_kind)
    if source == "in_batch":
        ks, vs = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    ref, same, ref_lse = _oracle(q, k, v, ks, vs, lock)
    out, lse = kv_lock_attention(q, k, v, ks, vs, lock, backend="auto", return_lse=True)
    _check_out(out, ref, same, dtype, lse, ref_lse)
    out = kv_lock_attention(q, k, v, ks, vs, lock, backend="auto")
    _check_out(out, ref, same, dtype)


@needs_gpu_triton
def test_batch_strides_beyond_int32():
    """Batch entries 2^31 elements apart (S * H * D >= 2^31 in one entry): every kernel
    computes 64-bit offsets there (4 GiB of fp16 per tensor)."""
    from kvlock_kernels import kv_lock_attention
    S, H, D = 96, 2, 64

    def far(*tail):
        buf = torch.empty(2 ** 31 + S * H * D, dtype=torch.float16, device=_device())
        t = buf.as_strided((2, *tail), (2 ** 31, *torch.empty(tail).stride()))
        t.copy_(torch.randn(2, *tail, device=_device()).half())
        return t

    k, v = far(S, H, D), far(S, H, D)
    lock = torch.rand(2, S, device=_device())
    ks, vs = (torch.randn(1, S, H, D, device=_device()).half() for _ in range(2))
    for out, ref in zip(lock_kv(k, v, lock, source_index=0), reference.lock_kv(k, v, lock, source_index=0)):
        _assert_blend_close(out, ref, torch.float16, "lock_kv")
    q = torch.randn(2, S, H, D, device=_device()).half()
    ref, same, _ = _oracle(q, k, v, ks.expand(2, -1, -1, -1), vs.expand(2, -1, -1, -1), lock)
    out = kv_lock_attention(q, k, v, ks.expand(2, -1, -1, -1), vs.expand(2, -1, -1, -1), lock, backend="triton")
    _check_out(out, ref, same, torch.float16)
    del k, v
    qp = far(S, H * D)
    outs = qkv_epilogue(qp, qp, qp, heads=H, norm="rms_per_head", lock=lock, source_index=0)
    refs = reference.qkv_epilogue(qp.float(), qp.float(), qp.float(), heads=H, norm="rms_per_head", lock=lock,
                                  source_index=0)
    sames = reference.qkv_epilogue(qp, qp, qp, heads=H, norm="rms_per_head", lock=lock, source_index=0)
    for name, o, r, b in zip("qkv", outs, refs, sames):
        assert_fa_close(o, r, b, atol=ATOL[torch.float16], name=name)


def test_choose_path_on_this_device():
    for dtype in (torch.bfloat16, torch.float32):
        route = routing.choose_path(3, 32760, 32760, 12, 12, 128, dtype, _device())
        assert route.path in routing.PATHS
        assert route.plain_backend in routing.plain_attention_backends(_device(), dtype, 128)
        assert math.isfinite(route.modelled_ms) and route.modelled_ms > 0


# --------------------------------------------------------------------------------------
# lock_kv and qkv_epilogue (engineer B's kernels) against their references
# --------------------------------------------------------------------------------------
def _assert_blend_close(out, ref, dtype, name):
    # One rounding of an fp32 blend; an FMA may contract it differently from PyTorch's
    # separate multiply and add: at most one unit in the last place of the output.
    tol = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1.0)
    err = (out.float() - ref.float()).abs()
    assert bool((err <= tol).all()), f"{name}: max error {err.max().item():.3g}"


@needs_gpu_triton
@pytest.mark.parametrize("case", lock_kv_cases(), ids=_case_id)
def test_lock_kv(case):
    mode, dtype_name, D = case
    dtype = DTYPES[dtype_name]
    B, S, H = 3, 333, 4
    _, k, v, ks, vs, lock = _attention_inputs(B, S, S, H, H, D, dtype)
    ks = ks[:1].clone()
    ks[:, (lock == 0).all(0)] = float("nan")  # weight 0 must not read the source
    ks = ks.expand(B, -1, -1, -1)  # batch stride 0, read in place
    if mode == "cache_per_entry":
        ks, vs = ks.contiguous(), vs.contiguous()
    if mode.startswith("branch"):
        kw = dict(source_index=0)
        ref_k, ref_v = reference.lock_kv(k, v, lock, source_index=0)
    else:
        kw = dict(k_src=ks, v_src=vs)
        ref_k, ref_v = reference.lock_kv(k, v, lock, k_src=ks, v_src=vs)
    if mode == "branch_inplace":
        k2, v2 = k.clone(), v.clone()
        out_k, out_v = lock_kv(k2, v2, lock, inplace=True, **kw)
        assert out_k.data_ptr() == k2.data_ptr() and out_v.data_ptr() == v2.data_ptr()
    else:
        out_k, out_v = lock_kv(k, v, lock, **kw)
    for out, ref, name in ((out_k, ref_k, "K'"), (out_v, ref_v, "V'")):
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{name}: NaN pattern differs"
        finite = ~torch.isnan(ref)
        _assert_blend_close(out[finite], ref[finite], dtype, name)


def _rope_tables(S_rope, D, kind, device):
    pos = torch.arange(S_rope, dtype=torch.float32)[:, None]
    inv = 10000.0 ** (-torch.arange(0, D // 2, dtype=torch.float32) / (D // 2))
    ang = pos * inv  # (S_rope, D/2)
    if kind == "interleaved":
        ang = ang.repeat_interleave(2, dim=-1)
    else:
        ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(device), ang.sin().to(device)


@needs_gpu_triton
@pytest.mark.parametrize("case", epilogue_cases(), ids=_case_id)
@pytest.mark.parametrize("source", ["branch", "cache"])
def test_qkv_epilogue(case, source):
    ref_epilogue = reference.qkv_epilogue
    norm, rope, dtype_name = case
    dtype = DTYPES[dtype_name]
    B, S, H, D, text = 3, 300, 4, 64, 20
    g = torch.Generator().manual_seed(3)
    dev = _device()

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    q, k, v = (rnd(B, S, H * D).to(dtype) for _ in range(3))
    kw = dict(heads=H, norm=norm, rope=rope)
    if norm != "none":
        # The stock modules keep their weights in the model's dtype.
        wshape = (H * D,) if norm == "rms_across_heads" else (D,)
        kw.update(norm_q_weight=(1 + rnd(*wshape, scale=0.1)).to(dtype),
                  norm_k_weight=(1 + rnd(*wshape, scale=0.1)).to(dtype))
        if norm == "layer_per_head":
            kw.update(norm_q_bias=rnd(D, scale=0.1).to(dtype), norm_k_bias=rnd(D, scale=0.1).to(dtype))
    if rope != "none":
        cos, sin = _rope_tables(S - text, D, rope, dev)
        kw.update(rope_cos=cos, rope_sin=sin, rope_start=text)
    lock = torch.cat([torch.zeros(text), torch.rand(S - text, generator=g)])
    lock[text:text + 40] = 1.0
    lock[text + 40:text + 80] = 0.0
    lock = lock[None].repeat(B, 1).to(dev)
    if source == "branch":
        kw.update(lock=lock, source_index=0)
    else:
        ks, vs = rnd(1, S, H, D).to(dtype), rnd(1, S, H, D).to(dtype)
        kw.update(lock=lock, k_src=ks.expand(B, -1, -1, -1), v_src=vs.expand(B, -1, -1, -1))
    outs = qkv_epilogue(q, k, v, **kw)
    up = {key: (val.float() if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
          for key, val in kw.items()}
    refs = ref_epilogue(q.float(), k.float(), v.float(), **up)
    same = ref_epilogue(q, k, v, **kw)
    for name, out, ref, base in zip(("q", "k", "v"), outs, refs, same):
        assert out.shape == (B, S, H, D) and out.dtype == dtype
        assert_fa_close(out, ref, base, atol=ATOL[dtype], name=f"{name} ({norm}, {rope})")
