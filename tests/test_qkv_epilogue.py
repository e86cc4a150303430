"""qkv_epilogue: the PyTorch path equals the stock diffusers processors' q/k/v bit for bit
(Wan, CogVideoX, HunyuanVideo single- and dual-stream; fp32, bf16, fp16); the Triton
kernel (through the interpreter) against the fp32 reference with the flash-attention
tolerance rule over norm / RoPE / lock kinds and odd shapes; views, custom ops,
torch.compile, autograd and bad input."""
import importlib
from unittest import mock

import pytest
import torch
from helpers import ATOL, assert_fa_close, far_apart_batch, make_source

from kvlock_kernels import reference
from kvlock_kernels.attention.epilogue import qkv_epilogue

EP = importlib.import_module("kvlock_kernels.attention.epilogue")

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.models.transformers import transformer_hunyuan_video as hunyuan  # noqa: E402
from diffusers.models.transformers import transformer_wan as wan  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------- stock modules
def randomize(module, seed=1):
    """Random weights everywhere, norm weights around 1 (stock init is ones / zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.5 * torch.randn(p.shape, generator=g))
    return module


class Capture:
    """Stands in for the attention call and keeps the q/k/v it is given, as bshd."""

    def __init__(self, layout):
        self.layout, self.qkv = layout, None

    def __call__(self, query, key, value, *args, **kwargs):
        if self.layout == "bhsd":
            self.qkv = tuple(t.transpose(1, 2) for t in (query, key, value))
        else:
            self.qkv = (query, key, value)
        return torch.zeros_like(query)


def wan_case(dtype):
    """WanAttention (RMSNorm across heads, interleaved RoPE with (1, S, 1, D) tables)."""
    H, D, dim = 2, 64, 48
    attn = randomize(wan.WanAttention(dim=dim, heads=H, dim_head=D, eps=1e-6, processor=wan.WanAttnProcessor()))
    attn = attn.to(dtype)
    cos, sin = wan.WanRotaryPosEmbed(D, (1, 2, 2), 64)(torch.randn(2, 4, 3, 6, 8))
    x = torch.randn(2, cos.shape[1], dim).to(dtype)
    cap = Capture("bshd")
    with mock.patch.object(wan, "dispatch_attention_fn", cap):
        attn(x, rotary_emb=(cos, sin))
    proj = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    kw = dict(heads=H, norm="rms_across_heads", norm_q_weight=attn.norm_q.weight, norm_k_weight=attn.norm_k.weight,
              norm_eps=attn.norm_q.eps, rope="interleaved", rope_cos=cos, rope_sin=sin)
    return proj, kw, cap.qkv, [kw]


def cogvideox_case(dtype):
    """CogVideoX's Attention (per-head LayerNorm with bias, RoPE on video after the text)."""
    H, D, dim, text = 3, 64, 40, 7
    attn = randomize(Attention(query_dim=dim, dim_head=D, heads=H, qk_norm="layer_norm", eps=1e-6, bias=True,
                               out_bias=True, processor=CogVideoXAttnProcessor2_0())).to(dtype)
    cos, sin = get_3d_rotary_pos_embed(D, ((0, 0), (6, 4)), (6, 4), 3)
    video, txt = torch.randn(2, cos.shape[0], dim).to(dtype), torch.randn(2, text, dim).to(dtype)
    cap = Capture("bhsd")
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", cap):
        attn(video, encoder_hidden_states=txt, image_rotary_emb=(cos, sin))
    joint = torch.cat([txt, video], dim=1)
    proj = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
    kw = dict(heads=H, norm="layer_per_head", norm_q_weight=attn.norm_q.weight, norm_q_bias=attn.norm_q.bias,
              norm_k_weight=attn.norm_k.weight, norm_k_bias=attn.norm_k.bias, norm_eps=attn.norm_q.eps,
              rope="interleaved", rope_cos=cos, rope_sin=sin, rope_start=text)
    return proj, kw, cap.qkv, [kw]


def _hunyuan_rope():
    return hunyuan.HunyuanVideoRotaryPosEmbed(2, 1, [8, 12, 12], 256.0)(torch.randn(1, 4, 3, 8, 6))


def hunyuan_single_case(dtype):
    """HunyuanVideo single-stream block: one projection of video + text (text last),
    diffusers' RMSNorm per head, RoPE on the video tokens only."""
    H, D, text = 2, 32, 5
    attn = randomize(Attention(query_dim=H * D, cross_attention_dim=None, dim_head=D, heads=H, out_dim=H * D,
                               bias=True, processor=hunyuan.HunyuanVideoAttnProcessor2_0(), qk_norm="rms_norm",
                               eps=1e-6, pre_only=True)).to(dtype)
    cos, sin = _hunyuan_rope()
    video, txt = torch.randn(2, cos.shape[0], H * D).to(dtype), torch.randn(2, text, H * D).to(dtype)
    cap = Capture("bshd")
    with mock.patch.object(hunyuan, "dispatch_attention_fn", cap):
        attn(video, encoder_hidden_states=txt, image_rotary_emb=(cos, sin))
    joint = torch.cat([video, txt], dim=1)
    proj = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
    kw = dict(heads=H, norm="rms_per_head", norm_q_weight=attn.norm_q.weight, norm_k_weight=attn.norm_k.weight,
              norm_eps=attn.norm_q.eps, rope="interleaved", rope_cos=cos, rope_sin=sin, rope_start=0)
    return proj, kw, cap.qkv, [kw]


def hunyuan_dual_case(dtype):
    """HunyuanVideo dual-stream block: video and text projected separately; two epilogue
    calls write into slices of one joint (video, text) buffer through ``out``."""
    H, D, text = 2, 32, 5
    attn = randomize(Attention(query_dim=H * D, cross_attention_dim=None, added_kv_proj_dim=H * D, dim_head=D,
                               heads=H, out_dim=H * D, context_pre_only=False, bias=True,
                               processor=hunyuan.HunyuanVideoAttnProcessor2_0(), qk_norm="rms_norm",
                               eps=1e-6)).to(dtype)
    cos, sin = _hunyuan_rope()
    video, txt = torch.randn(2, cos.shape[0], H * D).to(dtype), torch.randn(2, text, H * D).to(dtype)
    cap = Capture("bshd")
    with mock.patch.object(hunyuan, "dispatch_attention_fn", cap):
        attn(video, encoder_hidden_states=txt, image_rotary_emb=(cos, sin))
    proj = (attn.to_q(video), attn.to_k(video), attn.to_v(video),
            attn.add_q_proj(txt), attn.add_k_proj(txt), attn.add_v_proj(txt))
    video_kw = dict(heads=H, norm="rms_per_head", norm_q_weight=attn.norm_q.weight, norm_k_weight=attn.norm_k.weight,
                    norm_eps=attn.norm_q.eps, rope="interleaved", rope_cos=cos, rope_sin=sin)
    text_kw = dict(heads=H, norm="rms_per_head", norm_q_weight=attn.norm_added_q.weight,
                   norm_k_weight=attn.norm_added_k.weight, norm_eps=attn.norm_added_q.eps)
    return proj, None, cap.qkv, [video_kw, text_kw]


CASES = {"wan": wan_case, "cogvideox": cogvideox_case, "hunyuan_single": hunyuan_single_case,
         "hunyuan_dual": hunyuan_dual_case}


def run_case(proj, kws, backend, lock_fn=None):
    """The epilogue over the case's projections; the dual-stream case writes both calls
    into one joint buffer with ``out``."""
    if len(proj) == 3:
        (kw,) = kws
        extra = lock_fn(proj[0].shape[0], proj[0].shape[1]) if lock_fn else {}
        return qkv_epilogue(*proj, **kw, **extra, backend=backend)
    qv, kv_, vv, qt, kt, vt = proj
    B, Sv, St = qv.shape[0], qv.shape[1], qt.shape[1]
    H = kws[0]["heads"]
    bufs = [torch.full((B, Sv + St, H, qv.shape[-1] // H), float("nan"), dtype=qv.dtype) for _ in range(3)]
    extra = lock_fn(B, Sv) if lock_fn else {}
    res = qkv_epilogue(qv, kv_, vv, **kws[0], **extra, out=[b[:, :Sv] for b in bufs], backend=backend)
    assert all(r.data_ptr() == b.data_ptr() for r, b in zip(res, bufs))
    qkv_epilogue(qt, kt, vt, **kws[1], out=[b[:, Sv:] for b in bufs], backend=backend)
    return bufs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", list(CASES))
def test_torch_path_equals_stock_processor_bit_for_bit(model, dtype):
    proj, _, stock, kws = CASES[model](dtype)
    with torch.no_grad():
        ours = run_case(proj, kws, "torch")
        # Lock weight 0 everywhere (in-batch source branch, and a cache source) changes nothing.
        zero_branch = run_case(proj, kws, "torch", lambda B, S: dict(lock=torch.zeros(S), source_index=B - 1))
        zero_cache = run_case(proj, kws, "torch", lambda B, S: dict(
            lock=torch.zeros(B, S), k_src=torch.full((1, S, kws[0]["heads"], proj[0].shape[-1] // kws[0]["heads"]),
                                                    float("nan"), dtype=dtype).expand(B, -1, -1, -1),
            v_src=torch.randn(B, S, kws[0]["heads"], proj[0].shape[-1] // kws[0]["heads"]).to(dtype)))
    for name, s, a, b, c in zip("qkv", stock, ours, zero_branch, zero_cache):
        assert a.shape == s.shape and a.dtype == s.dtype, name
        assert torch.equal(a, s), f"{model} {name}: max diff {(a.float() - s.float()).abs().max()}"
        assert torch.equal(b, s) and torch.equal(c, s), f"{model} {name} with a zero lock"


@pytest.mark.parametrize("model", ["wan", "cogvideox", "hunyuan_dual"])
def test_triton_matches_stock_processor_within_the_rule(model):
    """The kernel's single rounding is at least as close to the fp32 truth as the stock
    bf16 sequence (which rounds after the norm and again after RoPE)."""
    proj, _, stock, kws = CASES[model](torch.bfloat16)
    with torch.no_grad():
        ours = run_case(proj, kws, "triton")
        up = [{n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()} for kw in kws]
        truth = run_case([p.float() for p in proj], up, "torch")
    for name, o, t, s in zip("qkv", ours, truth, stock):
        assert_fa_close(o, t, s, atol=ATOL[torch.bfloat16], name=f"{model} {name}")


def test_norm_eps_none_is_torch_default():
    B, S, H, D = 2, 5, 2, 16
    norm = torch.nn.RMSNorm(H * D)  # eps=None
    with torch.no_grad():
        norm.weight.normal_()
    q, k, v = (torch.randn(B, S, H * D).bfloat16() for _ in range(3))
    out = qkv_epilogue(q, k, v, heads=H, norm="rms_across_heads", norm_q_weight=norm.weight.bfloat16(),
                       norm_k_weight=norm.weight.bfloat16(), norm_eps=None, backend="torch")
    assert torch.equal(out[0], norm.bfloat16()(q).unflatten(-1, (H, D)))


# ---------------------------------------------------------------------- Triton vs reference
def make_inputs(B, S, H, D, dtype, norm, rope, source, *, rope_start=0, rope_len=None, lock_kind="soft",
                bias=False, weights=True, fused=False):
    if fused:  # chunks of one fused qkv projection: token stride 3 * H * D
        q, k, v = torch.randn(B, S, 3 * H * D).to(dtype).chunk(3, dim=-1)
    else:
        q, k, v = (torch.randn(B, S, H * D).to(dtype) for _ in range(3))
    kw = dict(heads=H, norm=norm, rope=rope)
    if norm != "none" and weights:
        n = H * D if norm == "rms_across_heads" else D
        kw.update(norm_q_weight=1 + 0.3 * torch.randn(n).to(dtype), norm_k_weight=1 + 0.3 * torch.randn(n).to(dtype))
        if bias:
            kw.update(norm_q_bias=0.3 * torch.randn(n).to(dtype), norm_k_bias=0.3 * torch.randn(n).to(dtype))
    if rope != "none":
        n = S - rope_start if rope_len is None else rope_len
        angle = torch.rand(n, D // 2) * 6.3
        pairs = (lambda t: t.repeat_interleave(2, dim=-1)) if rope == "interleaved" else \
            (lambda t: torch.cat([t, t], dim=-1))
        table = torch.float64 if dtype == torch.float64 else torch.float32
        kw.update(rope_cos=pairs(angle.cos()).to(table), rope_sin=pairs(angle.sin()).to(table), rope_start=rope_start)
    if source != "none":
        lock = {"soft": torch.rand(B, S), "zero": torch.zeros(B, S), "one": torch.ones(B, S),
                "bool": torch.rand(B, S) > 0.5}[lock_kind]
        if lock_kind == "soft":
            lock[:, ::3] = 0.0
            lock[:, 1::3] = 1.0
        kw["lock"] = lock
        kw.update(make_source(source, B, S, H, D, dtype))
    return q, k, v, kw


def upcast(kw):
    return {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and n != "lock" else t)
            for n, t in kw.items()}


def check_against_reference(q, k, v, kw, backend="triton", out=None):
    res = qkv_epilogue(q, k, v, **kw, out=out, backend=backend)
    truth = reference.qkv_epilogue(q.float(), k.float(), v.float(), **upcast(kw))
    same = reference.qkv_epilogue(q, k, v, **kw)
    B, S = q.shape[:2]
    H = kw["heads"]
    for name, o, t, s in zip("qkv", res, truth, same):
        assert o.shape == (B, S, H, q.shape[-1] // H) and o.dtype == q.dtype
        assert_fa_close(o, t, s, atol=ATOL[q.dtype], name=name)
    if "lock" in kw:
        # Rows of weight 1 hold the source's K/V exactly (in-batch: its own outputs).
        w = kw["lock"].float().expand(B, S).clone()
        if "source_index" in kw:
            src_k = res[1][kw["source_index"]][None].expand(B, -1, -1, -1)
            src_v = res[2][kw["source_index"]][None].expand(B, -1, -1, -1)
            w[kw["source_index"]] = 0
        else:
            src_k, src_v = kw["k_src"].expand(B, -1, -1, -1), kw["v_src"].expand(B, -1, -1, -1)
        one = w == 1
        assert torch.equal(res[1][one], src_k[one]) and torch.equal(res[2][one], src_v[one])
        zero = w == 0
        assert torch.equal(res[2][zero], v.unflatten(-1, (H, -1))[zero])
    return res


TRITON_CASES = [
    # id, (B, S, H, D, dtype), norm, rope, source, extra
    ("wan_branch", (3, 37, 2, 64, torch.bfloat16), "rms_across_heads", "interleaved", "branch0", {}),
    ("wan_cache_stride0", (2, 19, 3, 128, torch.bfloat16), "rms_across_heads", "interleaved", "stride0", {}),
    ("cogvideox_text_first", (3, 29, 2, 64, torch.float16), "layer_per_head", "interleaved", "branch1",
     dict(rope_start=5, bias=True)),
    ("hunyuan_text_last", (3, 23, 2, 128, torch.bfloat16), "rms_per_head", "interleaved", "branch2",
     dict(rope_len=19)),
    ("half_rope_per_entry_fp32", (2, 21, 2, 80, torch.float32), "none", "half", "per_entry", {}),
    ("layer_half_no_lock", (1, 17, 2, 96, torch.bfloat16), "layer_per_head", "half", "none",
     dict(rope_start=3, rope_len=10)),
    ("rms_head_bool_lock_d72", (2, 18, 1, 72, torch.bfloat16), "rms_per_head", "none", "branch0",
     dict(lock_kind="bool", bias=True)),
    ("plain_copy_d72", (2, 20, 2, 72, torch.float16), "none", "none", "none", {}),
    ("across_half_all_one_fp32", (3, 16, 2, 72, torch.float32), "rms_across_heads", "half", "batch1",
     dict(lock_kind="one")),
    ("across_branch_all_zero_fused", (2, 18, 2, 64, torch.bfloat16), "rms_across_heads", "interleaved", "branch1",
     dict(lock_kind="zero", fused=True)),
    ("no_affine_weights", (2, 17, 2, 64, torch.bfloat16), "layer_per_head", "interleaved", "stride0",
     dict(weights=False)),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(case):
    _, (B, S, H, D, dtype), norm, rope, source, extra = case
    q, k, v, kw = make_inputs(B, S, H, D, dtype, norm, rope, source, **extra)
    check_against_reference(q, k, v, kw)


def test_triton_block_sizes(monkeypatch):
    """Programs of 4 and 32 tokens (the GPU tiles are 4-32 tokens per program)."""
    for block in (4, 32):
        monkeypatch.setattr(EP, "INTERPRETER_BLOCK_S", block)
        q, k, v, kw = make_inputs(3, 13, 2, 64, torch.bfloat16, "rms_across_heads", "interleaved", "branch1")
        check_against_reference(q, k, v, kw)


def test_zero_lock_equals_no_lock_on_triton():
    q, k, v, kw = make_inputs(3, 19, 2, 64, torch.bfloat16, "rms_per_head", "interleaved", "branch0",
                              lock_kind="zero")
    locked = qkv_epilogue(q, k, v, **kw, backend="triton")
    kw.pop("lock"), kw.pop("source_index")
    plain = qkv_epilogue(q, k, v, **kw, backend="triton")
    for a, b in zip(locked, plain):
        assert torch.equal(a, b)


def test_out_views_and_4d_inputs():
    """out= slices of a joint text+video buffer (CogVideoX: text first) are written in place
    and nothing around them; (B, S, heads, D) inputs work like (B, S, heads*D)."""
    B, S, H, D, text = 2, 20, 2, 64, 6
    q, k, v, kw = make_inputs(B, S, H, D, torch.bfloat16, "layer_per_head", "interleaved", "branch1", bias=True)
    bufs = [torch.full((B, text + S, H, D), 7.0, dtype=torch.bfloat16) for _ in range(3)]
    views = [b[:, text:] for b in bufs]
    res = check_against_reference(q, k, v, kw, out=views)
    assert all(r is o for r, o in zip(res, views))
    assert all(bool((b[:, :text] == 7).all()) for b in bufs)
    q4, k4, v4 = (t.unflatten(-1, (H, D)) for t in (q, k, v))
    res4 = qkv_epilogue(q4, k4, v4, **kw, backend="triton")
    for a, b in zip(res, res4):
        assert torch.equal(a, b)


def test_torch_backend_with_out_and_fused_chunks():
    q, k, v, kw = make_inputs(2, 12, 2, 32, torch.float16, "rms_across_heads", "interleaved", "stride0", fused=True)
    outs = [torch.empty(2, 12, 2, 32, dtype=torch.float16) for _ in range(3)]
    res = check_against_reference(q, k, v, kw, backend="torch", out=outs)
    assert all(r is o for r, o in zip(res, outs))


# ---------------------------------------------------------------------- the blending rule
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_source_under_weight_zero_stays_out(backend):
    B, S, H, D = 3, 18, 2, 64
    q, k, v, kw = make_inputs(B, S, H, D, torch.float32, "rms_per_head", "interleaved", "branch0")
    lock = torch.full((B, S), 0.5)
    lock[:, :6] = 0.0
    k[0, :6] = float("nan")
    v[0, :6] = float("inf")
    k[1:, 6:12] = float("nan")  # targets under weight 1: not read
    lock[:, 6:12] = 1.0
    kw["lock"] = lock
    q_out, k_out, v_out = qkv_epilogue(q, k, v, **kw, backend=backend)
    assert torch.isfinite(k_out[1:]).all() and torch.isfinite(v_out[1:]).all()
    assert torch.isnan(k_out[0, :6]).all()  # the source entry's own output is its own


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_cache_source_under_weight_zero_stays_out(backend):
    B, S, H, D = 2, 18, 2, 64
    q, k, v, kw = make_inputs(B, S, H, D, torch.bfloat16, "rms_across_heads", "interleaved", "stride0")
    kw["lock"][:, :6] = 0.0
    kw["k_src"] = kw["k_src"][:1].clone()
    kw["k_src"][:, :6] = float("nan")
    out = qkv_epilogue(q, k, v, **kw, backend=backend)
    assert torch.isfinite(out[1]).all()


# ---------------------------------------------------------------------- custom ops, compile, autograd
def test_custom_ops_are_registered():
    B, S, H, D = 2, 6, 2, 8
    q, k, v, kw = make_inputs(B, S, H, D, torch.float32, "layer_per_head", "interleaved", "stride0", bias=True,
                              rope_start=1)
    args = (q, k, v, H, "layer_per_head", kw["norm_q_weight"], kw["norm_q_bias"], kw["norm_k_weight"],
            kw["norm_k_bias"], 1e-6, "interleaved", kw["rope_cos"], kw["rope_sin"], 1, kw["lock"],
            kw["k_src"][:1], kw["v_src"][:1], -1)
    op = torch.ops.kvlock_kernels.qkv_epilogue
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    with_aot = quick + ("test_aot_dispatch_static",)  # the dynamic-shape variant costs ~15 s
    torch.library.opcheck(op, args + ("triton",), test_utils=quick)
    grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, grad_args + ("torch",), test_utils=with_aot)
    outs = tuple(torch.empty(B, S, H, D) for _ in range(3))
    torch.library.opcheck(torch.ops.kvlock_kernels.qkv_epilogue_out, args + ("triton",) + outs, test_utils=quick)


def test_torch_compile_fullgraph():
    B, S, H, D = 3, 16, 2, 64
    q, k, v, kw = make_inputs(B, S, H, D, torch.float32, "rms_across_heads", "interleaved", "branch0")
    lock = kw.pop("lock")

    def layer(q, k, v, lock):
        qo, ko, vo = qkv_epilogue(q, k, v, **kw, lock=lock * 1)
        return qo.sum() + ko.sum() + vo.sum()

    def layer_out(q, k, v, lock, buf):
        qkv_epilogue(q, k, v, **kw, lock=lock, out=(buf[0], buf[1], buf[2]))
        return buf * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want = sum(t.sum() for t in reference.qkv_epilogue(q, k, v, **kw, lock=lock))
    torch.testing.assert_close(compiled(q, k, v, lock), want, rtol=1e-5, atol=1e-3)
    buf = torch.zeros(3, B, S, H, D)
    got = torch.compile(layer_out, fullgraph=True, backend="aot_eager")(q, k, v, lock, buf)
    ref = torch.stack(reference.qkv_epilogue(q, k, v, **kw, lock=lock))
    torch.testing.assert_close(got, 2 * ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,rope,source", [("layer_per_head", "interleaved", "stride0"),
                                              ("rms_across_heads", "half", "branch1"),
                                              ("rms_per_head", "interleaved", "per_entry")])
def test_gradcheck_float64_torch_path(norm, rope, source):
    B, S, H, D = 2, 4, 2, 4
    q, k, v, kw = make_inputs(B, S, H, D, torch.float64, norm, rope, source, bias=norm == "layer_per_head",
                              rope_start=1)
    kw["lock"] = (torch.rand(B, S, dtype=torch.float64) * 0.8 + 0.1)
    names = [n for n, t in kw.items() if isinstance(t, torch.Tensor) and not n.startswith("rope")]
    tensors = [q, k, v] + [kw[n].clone() for n in names]
    tensors = [t.detach().clone().requires_grad_() for t in tensors]

    def fn(q, k, v, *rest):
        args = dict(kw, **dict(zip(names, rest)))
        return qkv_epilogue(q, k, v, **args, backend="torch")

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


def test_backward_of_triton_forward_matches_torch():
    q, k, v, kw = make_inputs(3, 10, 2, 16, torch.float32, "rms_across_heads", "interleaved", "branch2")
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, kw["norm_k_weight"])]
        out = qkv_epilogue(*leaves[:3], **dict(kw, norm_k_weight=leaves[3]), backend=backend)
        (out[0] * 1.5 + out[1] * 2 + out[2]).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empty_sequence():
    q = torch.randn(2, 0, 32)
    out = qkv_epilogue(q, q.clone(), q.clone(), heads=2, backend="triton")
    assert [tuple(o.shape) for o in out] == [(2, 0, 2, 16)] * 3


def test_batch_strides_beyond_int32():
    """Issue 12 (limits): batch entries 2^31 elements apart (in-kernel strides are 64-bit;
    in 32-bit, ALIGN-scaled batch strides wrapped and entry 1 was read 4 GB off)."""
    q, k, v = (far_apart_batch((20, 32), torch.float16) for _ in range(3))
    w = torch.rand(32) + 0.5
    lock = torch.rand(2, 20)
    kw = dict(heads=2, norm="rms_across_heads", norm_q_weight=w, norm_k_weight=w, lock=lock, source_index=0)
    out = qkv_epilogue(q, k, v, **kw, backend="triton")
    ref32 = reference.qkv_epilogue(q.float(), k.float(), v.float(), **kw)
    same = reference.qkv_epilogue(q.clone(), k.clone(), v.clone(), **kw)
    for name, o, r, s in zip("qkv", out, ref32, same):
        assert_fa_close(o, r, s, atol=ATOL[torch.float16], name=name)


# ---------------------------------------------------------------------- bad input
def _call(**over):
    q, k, v, kw = make_inputs(2, 8, 2, 16, torch.float32, "layer_per_head", "interleaved", "stride0", bias=True)
    args = dict(q=q, k=k, v=v, **kw)
    args.update(over)
    return qkv_epilogue(args.pop("q"), args.pop("k"), args.pop("v"), **args)


BAD = [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(2, 8)), ValueError, "q must be 3-D or 4-D"),
    (dict(k=torch.randn(2, 8, 32).half()), TypeError, "k must have q's dtype"),
    (dict(v=torch.randn(2, 9, 32)), ValueError, "v must have q's shape"),
    (dict(q=torch.zeros(2, 8, 32, dtype=torch.int32)), TypeError, "q must have dtype"),
    (dict(heads=3), ValueError, "divisible by heads=3"),
    (dict(heads=2.0), TypeError, "heads must be an int"),
    (dict(heads=0), ValueError, "heads must be an int >= 1"),
    (dict(norm="rms"), ValueError, "norm must be one of"),
    (dict(rope=None), TypeError, "rope must be one of"),
    (dict(norm_q_weight=torch.randn(32)), ValueError, r"norm_q_weight must have shape \(D,\)"),
    (dict(norm_k_bias=torch.randn(16).long()), TypeError, "norm_k_bias must have dtype"),
    (dict(norm="none", norm_q_bias=None, norm_k_bias=None, norm_k_weight=None), ValueError,
     "norm_q_weight is given but norm='none'"),
    (dict(norm="rms_across_heads", norm_q_weight=torch.randn(32), norm_k_weight=torch.randn(32)), ValueError,
     "has no bias"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps must be >= 0"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps must be a finite number"),
    (dict(rope_cos=None), ValueError, "needs rope_cos"),
    (dict(rope="none"), ValueError, "rope_cos is given but rope='none'"),
    (dict(rope_cos=torch.randn(8, 15)), ValueError, "rope_cos must have shape"),
    (dict(rope_sin=torch.randn(7, 16)), ValueError, "rope_sin must have rope_cos's shape"),
    (dict(rope_start=2), ValueError, "rope_start \\+ S_rope must be <= S"),
    (dict(rope_start=-1), ValueError, "rope_start must be an int >= 0"),
    (dict(lock=torch.full((2, 8), 1.5)), ValueError, r"lock values must be in \[0, 1\]"),
    (dict(lock=torch.rand(2, 9)), ValueError, "lock must have shape"),
    (dict(lock=0.3), TypeError, "lock must be a torch.Tensor"),
    (dict(k_src=None, v_src=None), ValueError, "lock needs a source"),
    (dict(source_index=0), ValueError, "either as k_src and v_src or as source_index"),
    (dict(k_src=torch.randn(1, 8, 2, 8)), ValueError, "k_src must have shape"),
    (dict(v_src=torch.randn(1, 8, 2, 16).bfloat16()), TypeError, "v_src must have q's dtype"),
    (dict(out=torch.empty(2, 8, 2, 16)), TypeError, "out must be a tuple"),
    (dict(out=(torch.empty(2, 8, 2, 16),) * 2), ValueError, "out must hold 3 tensors"),
    (dict(out=(torch.empty(2, 8, 2, 16),) * 2 + (torch.empty(2, 8, 32),)), ValueError,
     "out\\[2\\] \\(v_out\\) must be 4-D"),
    (dict(out=(torch.empty(2, 8, 2, 16).half(),) * 3), TypeError, "out\\[0\\] \\(q_out\\) must have q's dtype"),
    (dict(out=(torch.empty(2, 8, 16, 2).transpose(-1, -2),) * 3), ValueError, "contiguous last dim"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


def test_bad_input_writes_nothing(monkeypatch):
    launched = []
    monkeypatch.setattr(EP, "_launch", lambda *a, **kw: launched.append(1))
    outs = tuple(torch.full((2, 8, 2, 16), 3.0) for _ in range(3))
    with pytest.raises(ValueError):
        _call(out=outs, lock=torch.full((2, 8), -0.5), backend="triton")
    with pytest.raises(TypeError):
        _call(out=outs, k_src=torch.randn(1, 8, 2, 16).half(), backend="triton")
    assert not launched and all(bool((o == 3).all()) for o in outs)
