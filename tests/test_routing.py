"""attention.routing: the plain attention backends (stand-in flash-attn modules check the
preference order, the cached probes and the calls), the route from shapes alone, the
cost model, the harness model built on it, and the GPU tier's parametrisation builders."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, assert_fa_close

from kvlock_kernels import reference
from kvlock_kernels.attention import routing

H100 = dict(arch=90, device_name="H100")
ALL = ("fa3", "fa2", "sdpa")


def _reference_flash(q, k, v, softmax_scale=None):
    out, lse = reference.kv_lock_attention(q, k, v, softmax_scale=softmax_scale, return_lse=True)
    return out, lse


def _standin_modules(calls, *, fa3_always_tuple=False, lse_pad=0):
    """flash_attn_interface (FA3) and flash_attn (FA2) stand-ins with their call
    conventions: FA3 returns out, or (out, lse) with return_attn_probs (early releases:
    always a tuple); FA2 returns out, or (out, lse, S_dmask) with return_attn_probs."""
    fa3 = types.ModuleType("flash_attn_interface")
    fa2 = types.ModuleType("flash_attn")

    def pad(lse):
        return F.pad(lse, (0, lse_pad), value=123.0) if lse_pad else lse

    def fa3_func(q, k, v, softmax_scale=None, causal=False, **kw):
        if fa3_always_tuple and kw:  # early releases: no return_attn_probs argument
            raise TypeError(f"unexpected keyword arguments {sorted(kw)}")
        return_attn_probs = kw.pop("return_attn_probs", False)
        calls.append(("fa3", return_attn_probs))
        out, lse = _reference_flash(q, k, v, softmax_scale)
        return (out, pad(lse)) if (return_attn_probs or fa3_always_tuple) else out

    def fa2_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False):
        calls.append(("fa2", return_attn_probs))
        out, lse = _reference_flash(q, k, v, softmax_scale)
        return (out, pad(lse), None) if return_attn_probs else out

    fa3.flash_attn_func = fa3_func
    fa2.flash_attn_func = fa2_func
    return fa3, fa2


@pytest.fixture
def standins(monkeypatch):
    """Stand-in FA2/FA3 modules and a pretend sm_90 device; probes reset around the test."""
    calls = []
    fa3, fa2 = _standin_modules(calls)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: 90)
    routing.reset_probes()
    yield calls
    routing.reset_probes()


@pytest.fixture(autouse=True)
def _fresh_probes():
    routing.reset_probes()
    yield
    routing.reset_probes()


def _qkv(B=2, Sq=37, Skv=45, Hq=4, Hkv=2, D=32, dtype=torch.float32):
    return (torch.randn(B, Sq, Hq, D).to(dtype), torch.randn(B, Skv, Hkv, D).to(dtype),
            torch.randn(B, Skv, Hkv, D).to(dtype))


# --------------------------------------------------------------------------------------
# Backends: availability, preference order, cached probes
# --------------------------------------------------------------------------------------
def test_backends_on_this_machine():
    # No CUDA here: flash-attn cannot run whatever is installed; SDPA always can.
    assert routing.plain_attention_backends("cpu") == ["sdpa"]
    assert routing.plain_attention_backends() == (["sdpa"] if not torch.cuda.is_available()
                                                  else routing.plain_attention_backends("cuda"))


def test_preference_order_with_standins(standins, monkeypatch):
    assert routing.plain_attention_backends("cpu") == ["fa3", "fa2", "sdpa"]
    assert routing.plain_attention_backends("cpu", torch.bfloat16, 128) == ["fa3", "fa2", "sdpa"]
    # FA2/FA3 need fp16/bf16 and a head dim <= 256 that is a multiple of 8.
    assert routing.plain_attention_backends("cpu", torch.float32, 128) == ["sdpa"]
    assert routing.plain_attention_backends("cpu", torch.bfloat16, 100) == ["sdpa"]
    assert routing.plain_attention_backends("cpu", torch.bfloat16, 320) == ["sdpa"]
    # FA3 is Hopper-only, FA2 needs sm_80+.
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: 80)
    assert routing.plain_attention_backends("cpu") == ["fa2", "sdpa"]
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: 75)
    assert routing.plain_attention_backends("cpu") == ["sdpa"]
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: None)  # not a CUDA device
    assert routing.plain_attention_backends("cpu") == ["sdpa"]


def test_only_fa2_installed(monkeypatch):
    calls = []
    _, fa2 = _standin_modules(calls)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import fails
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: 90)
    assert routing.plain_attention_backends("cpu") == ["fa2", "sdpa"]


def test_probes_are_cached(standins, monkeypatch):
    assert "fa3" in routing.plain_attention_backends("cpu")
    # Uninstalled after the first probe: the cached result stands (one import per process) ...
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert routing.plain_attention_backends("cpu") == ["fa3", "fa2", "sdpa"]
    # ... until the probes are reset.
    routing.reset_probes()
    assert routing.plain_attention_backends("cpu") == ["sdpa"]


def test_failed_probes_are_cached(monkeypatch):
    """Issue 12: a failed flash-attn import is not cached by Python (each attempt costs
    tens of microseconds); the probe tries once per process, failures included."""
    attempts = []

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name in ("flash_attn", "flash_attn_interface"):
                attempts.append(name)
                raise ImportError(f"{name} blocked by the test")
            return None

    for name in ("flash_attn", "flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: 90)
    for _ in range(3):
        assert routing.plain_attention_backends("cpu", torch.bfloat16, 128) == ["sdpa"]
        routing.choose_path(2, 64, 64, 2, 2, 128, torch.bfloat16, "cpu", arch=90, device_name="H100")
    assert sorted(attempts) == ["flash_attn", "flash_attn_interface"]


# --------------------------------------------------------------------------------------
# plain_attention
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
def test_plain_attention_sdpa_matches_oracle(dtype, heads):
    Hq, Hkv = heads
    q, k, v = _qkv(Hq=Hq, Hkv=Hkv, D=40, dtype=dtype)
    ref, ref_lse = reference.kv_lock_attention(q.float(), k.float(), v.float(), return_lse=True)
    same = reference.kv_lock_attention(q, k, v, upcast=False)
    out = routing.plain_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert_fa_close(out, ref, same, atol=ATOL[dtype])
    out, lse = routing.plain_attention(q, k, v, return_lse=True, backend="sdpa")
    assert_fa_close(out, ref, same, atol=ATOL[dtype])
    assert lse.shape == (2, Hq, 37) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    scaled = routing.plain_attention(q, k, v, softmax_scale=0.05)
    ref = reference.kv_lock_attention(q.float(), k.float(), v.float(), softmax_scale=0.05)
    assert_fa_close(scaled, ref, reference.kv_lock_attention(q, k, v, softmax_scale=0.05, upcast=False),
                    atol=ATOL[dtype])


def test_plain_attention_calls_the_best_backend(standins):
    q, k, v = _qkv(dtype=torch.bfloat16)
    ref, ref_lse = _reference_flash(q, k, v, 0.2)
    out = routing.plain_attention(q, k, v, softmax_scale=0.2)
    assert standins[-1] == ("fa3", False)
    torch.testing.assert_close(out, ref)
    out, lse = routing.plain_attention(q, k, v, softmax_scale=0.2, return_lse=True)
    assert standins[-1] == ("fa3", True)
    torch.testing.assert_close(lse, ref_lse)
    out, lse = routing.plain_attention(q, k, v, softmax_scale=0.2, return_lse=True, backend="fa2")
    assert standins[-1] == ("fa2", True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    n = len(standins)
    routing.plain_attention(q, k, v, backend="sdpa")
    assert len(standins) == n  # SDPA does not go through the stand-ins
    # fp32 cannot use FA2/FA3: SDPA runs even with them installed.
    routing.plain_attention(q.float(), k.float(), v.float())
    assert len(standins) == n


def test_flash_release_conventions(monkeypatch):
    """Early FA3 releases return (out, lse) always and take no return_attn_probs; some
    releases pad lse's last dim."""
    calls = []
    fa3, fa2 = _standin_modules(calls, fa3_always_tuple=True, lse_pad=5)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    monkeypatch.setattr(routing, "_cuda_arch", lambda device: 90)
    q, k, v = _qkv(dtype=torch.float16)
    ref, ref_lse = _reference_flash(q, k, v, None)
    out = routing.plain_attention(q, k, v)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref)
    for backend in ("fa3", "fa2"):
        out, lse = routing.plain_attention(q, k, v, return_lse=True, backend=backend)
        assert lse.shape == ref_lse.shape
        torch.testing.assert_close(lse, ref_lse)


def test_plain_attention_errors(standins):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must have q's dtype"):
        routing.plain_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        routing.plain_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="divisible"):
        routing.plain_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="v must have k's shape"):
        routing.plain_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="backend must be one of"):
        routing.plain_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="cannot run"):  # fp32: no FA3 even when installed
        routing.plain_attention(q, k, v, backend="fa3")
    with pytest.raises(ValueError, match="softmax_scale"):
        routing.plain_attention(q, k, v, softmax_scale=-1.0)
    with pytest.raises(TypeError, match="return_lse"):
        routing.plain_attention(q, k, v, return_lse=1)


# --------------------------------------------------------------------------------------
# The route: shapes only, never values
# --------------------------------------------------------------------------------------
def test_route_reads_no_tensor_values():
    # The route takes shapes: tensors on the meta device (no values at all) give them.
    q = torch.empty(3, 32760, 12, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(3, 32760, 12, 128, device="meta", dtype=torch.bfloat16)
    route = routing.choose_path(*q.shape[:2], k.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, "cuda",
                                available=ALL, **H100)
    assert route.path == "blend_then_plain" and route.plain_backend == "fa3"
    # A tensor where a size belongs is refused, never read (no implicit .item() sync).
    with pytest.raises(TypeError, match="batch must be an int"):
        routing.choose_path(torch.tensor(3), 100, 100, 4, 4, 64, torch.bfloat16, "cuda")
    with pytest.raises(TypeError, match="dtype"):
        routing.choose_path(3, 100, 100, 4, 4, 64, "bf16", "cuda")
    with pytest.raises(ValueError, match="heads_q"):
        routing.choose_path(3, 100, 100, 6, 4, 64, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="head_dim"):
        routing.choose_path(3, 100, 100, 4, 4, 512, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="available"):
        routing.choose_path(3, 100, 100, 4, 4, 64, torch.bfloat16, "cuda", available=("flash",))


def test_route_is_cached_and_deterministic():
    a = routing.choose_path(2, 17776, 17776, 48, 48, 64, torch.bfloat16, "cuda", available=ALL, **H100)
    b = routing.choose_path(2, 17776, 17776, 48, 48, 64, torch.bfloat16, "cuda", available=ALL, **H100)
    assert a is b


@pytest.mark.parametrize("shape", [(2, 32760, 12, 128), (3, 32760, 12, 128), (2, 75600, 40, 128),
                                   (3, 17776, 48, 64), (2, 119056, 24, 128)])
@pytest.mark.parametrize("available", [ALL, ("fa2", "sdpa"), ("sdpa",)])
def test_route_at_spec_shapes_within_bound(shape, available):
    B, S, H, D = shape
    route = routing.choose_path(B, S, S, H, H, D, torch.bfloat16, "cuda", available=available, **H100)
    assert route.path in routing.PATHS
    assert route.modelled_ms <= 1.03 * route.plain_ms
    costs = dict(route.costs)
    chosen = costs["fused"] if route.path == "fused" else costs[f"blend+{route.plain_backend}"]
    assert route.modelled_ms == pytest.approx(chosen)
    assert route.modelled_ms <= (1 + routing.FUSED_MARGIN) * min(costs.values())
    if "fa3" in available:  # compute-bound: blend once, then FA3
        assert (route.path, route.plain_backend) == ("blend_then_plain", "fa3")
        assert "compute-bound" in route.why


def test_route_memory_bound_short_queries_fuse():
    # 64 queries over 32k keys: attention reads K/V once; the blend pass would read and
    # write them again, the fused kernel reads each tile once.
    route = routing.choose_path(2, 64, 32760, 12, 12, 128, torch.bfloat16, "cuda", available=ALL, **H100)
    assert route.path == "fused" and "memory-bound" in route.why


def test_route_fp32_and_cpu():
    route = routing.choose_path(2, 8192, 8192, 8, 8, 128, torch.float32, "cuda", available=ALL, **H100)
    assert route.plain_backend == "sdpa"  # no FA2/FA3 for fp32
    assert all(not name.startswith("blend+fa") for name, _ in route.costs)
    route = routing.choose_path(2, 100, 100, 4, 2, 64, torch.bfloat16, "cpu")
    assert (route.path, route.plain_backend) == ("blend_then_plain", "sdpa") and "interpreter" in route.why


def test_cost_model_shape():
    prof = routing.device_profile(name="H100", arch=90)
    assert (prof.tensor_flops, prof.bandwidth) == (989e12, 3.35e12)
    assert routing.device_profile(name="NVIDIA H200", arch=90).bandwidth == 4.8e12
    assert routing.device_profile(name="NVIDIA A100-SXM4-80GB").arch == 80  # not the A10 entry
    assert "modelled as" in routing.device_profile(name="Some GPU", arch=90).name
    dims = (2, 32760, 32760, 12, 12, 128, torch.bfloat16)
    # Compute-bound: plain time is FLOPs at the backend's efficiency; FA3 beats FA2.
    fa3, fa2 = routing.plain_time("fa3", *dims, prof), routing.plain_time("fa2", *dims, prof)
    flops = routing.attention_flops(2, 32760, 32760, 12, 128)
    assert fa3 == pytest.approx(flops / (989e12 * routing.EFFICIENCY[("sm90", "fa3")][1]) + routing.LAUNCH_S)
    assert fa3 < fa2
    # The blend pass: k, v and K', V' per entry, the shared source once, at BW_EFF.
    tile = 32760 * 12 * 128 * 2
    assert routing.blend_bytes(2, 32760, 12, 128, torch.bfloat16) == pytest.approx(10 * tile + 4 * 2 * 32760)
    assert routing.blend_bytes(2, 32760, 12, 128, torch.bfloat16, source_shared=False) > \
        routing.blend_bytes(2, 32760, 12, 128, torch.bfloat16)
    # The fused kernel blends every tile in registers on one code path: compute-bound, its
    # time does not depend on how many blocks read both tiles; a smaller BLOCK_M re-blends
    # more often.
    f0 = routing.fused_time(*dims, prof, blended_fraction=0.0, block_m=128)
    f1 = routing.fused_time(*dims, prof, blended_fraction=1.0, block_m=128)
    f1_small = routing.fused_time(*dims, prof, blended_fraction=1.0, block_m=64)
    assert f0 == f1 < f1_small
    flops_at_peak = flops / 989e12
    assert f1 == pytest.approx(flops_at_peak * (1 / routing.EFFICIENCY[("sm90", "triton")][1]
                                                + (1 - routing.BLEND_OVERLAP) * 2 * routing.BLEND_LANE_OPS
                                                * routing.TC_FLOP_PER_LANE / (4 * 128)) + routing.LAUNCH_S)
    # Even without its blend the Triton kernel is below FA3's efficiency.
    assert f0 > fa3
    # Memory-bound, the bytes decide: blocks that read both tiles cost more.
    few_q = (2, 16, 32760, 12, 12, 128, torch.bfloat16)
    assert routing.fused_time(*few_q, prof, blended_fraction=0.0, block_m=128) < \
        routing.fused_time(*few_q, prof, blended_fraction=1.0, block_m=128)
    # Memory-bound: time follows bytes.
    short = (2, 16, 32760, 12, 12, 128, torch.bfloat16)
    nbytes = routing.plain_bytes(*short)
    assert routing.plain_time("fa3", *short, prof) == pytest.approx(
        nbytes / (prof.bandwidth * routing.BW_EFF) + routing.LAUNCH_S)
    with pytest.raises(ValueError, match="float32"):
        routing.efficiency("fa3", 90, torch.float32, 128)


def test_fused_blocks_from_config_table():
    from kvlock_kernels.attention.configs import configs_for
    bm, bn, src = routing.fused_blocks(128, torch.bfloat16, 90)
    assert (bm, bn) == tuple(configs_for(128, torch.bfloat16, arch=90)[0][:2]) and "configs_for" in src
    assert routing.fused_blocks(64, torch.float16, 80)[:2] == tuple(configs_for(64, "fp16", arch=80)[0][:2])
    # No config (fp32; head dim 256 on sm_80): no fused route.
    for dtype, d, arch in ((torch.float32, 128, 90), (torch.bfloat16, 256, 80)):
        bm, bn, src = routing.fused_blocks(d, dtype, arch)
        assert bm is None and bn is None and "no fused-kernel config" in src


def test_sdpa_kernel_kind_follows_torch_flags():
    assert routing.sdpa_kernel_kind(torch.bfloat16, 128) in ("flash", "efficient", "cudnn", "math")
    assert routing.sdpa_kernel_kind(torch.float32, 128) in ("efficient", "math")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        assert routing.sdpa_kernel_kind(torch.bfloat16, 128) == "math"


# --------------------------------------------------------------------------------------
# The harness model (benchmarks/model.py)
# --------------------------------------------------------------------------------------
def test_block_classes():
    from benchmarks.model import block_classes
    w = torch.tensor([[0.0] * 4 + [1.0] * 4 + [0.5] * 4 + [0.0, 1.0, 1.0, 1.0] + [0.0, 0.0]])  # 18 keys, BN 4
    c = block_classes(w, 4)[0]
    assert c == pytest.approx(dict(zero=2 / 5, one=1 / 5, const=1 / 5, mixed=1 / 5))  # padded block: all-0


def test_model_masks_follow_token_order():
    from benchmarks.common import COGVIDEOX_5B, HUNYUAN, WAN_1_3B
    from benchmarks.model import block_classes, lock_for
    cog = lock_for(COGVIDEOX_5B, 3, 1.0, 0.3)
    assert cog.shape == (3, COGVIDEOX_5B.seqlen)
    assert bool((cog[:, :226] == 0).all()) and bool((cog[0] == 0).all())  # text first; the source entry unlocked
    assert cog[1, 226:].max() == 1.0
    hun = lock_for(HUNYUAN.with_batch(2), 2, 0.5, 0.1)
    assert bool((hun[:, -256:] == 0).all()) and hun[:, :-256].max() == 0.5  # text last
    # The rectangle moves: frames differ.
    wan = lock_for(WAN_1_3B, 2, 1.0, 0.3)[0].view(21, 30, 52)
    assert not torch.equal(wan[0], wan[-1])
    # The measurement: at alpha 1 a third to over a half of 64-token blocks are mixed.
    mixed = block_classes(lock_for(WAN_1_3B, 2, 1.0, 0.3), 64)[0]["mixed"]
    assert 0.3 < mixed < 0.65
    soft = block_classes(lock_for(WAN_1_3B, 2, 0.5, 0.1), 64)[0]
    assert soft["const"] + soft["mixed"] > 0.99  # a soft alpha blends every background block


def test_model_rows_keep_the_bound():
    from benchmarks import model
    result = model.run()
    assert len(result["rows"]) == len(model.SPECS) * len(model.BATCHES) * len(model.ALPHAS) * len(model.FGS)
    assert result["bound_ok"] and result["worst_auto_ratio"] <= 1.03
    for r in result["rows"]:
        assert r["auto_ratio"] <= 1.03 and all(s["ratio"] <= 1.03 for s in r["scenarios"].values())
        # One dot per matmul in the new design; the old one doubled the blended blocks' dots.
        assert r["tensor_work"]["fused_new"] == 1.0
        assert r["tensor_work"]["fused_old"] == pytest.approx(1.0 + r["blended_fraction"])
        assert sum(r["locked_classes"].values()) == pytest.approx(1.0)
    for e in result["epilogue"]:  # the blend in the epilogue costs no more than the stock layer
        assert e["fused_layer_ratio"] <= 1.0 < e["blend_layer_ratio"]
    assert len(result["edit"]) == len(model.SPECS) * len(model.BATCHES) * len(model.FGS)
    for e in result["edit"]:
        assert e["ratio"]["auto"] <= 1.03 and e["ratio"]["fused (old, two dots)"] > 1.5
    text = model.format_markdown(result)
    assert "holds" in text and "| hunyuanvideo 720p | 2 | 1 | 0.3 |" in text


# --------------------------------------------------------------------------------------
# The GPU tier's builders run on CPU (the tier itself is skipped here)
# --------------------------------------------------------------------------------------
def test_cuda_tier_builders():
    import test_cuda_tier as tier

    from kvlock_kernels.attention.configs import KERNEL_CONFIGS
    for arch, family in ((90, "sm90"), (80, "sm80")):
        cases = tier.fused_config_cases(arch)
        configs = {(d, c) for d, tiers in KERNEL_CONFIGS[family].items() for entries in tiers.values()
                   for c in entries}
        assert {(d, cfg) for d, _, cfg in cases} == {(d, tuple(c)) for d, c in configs}  # every entry
        for dtype_name, head_dim, cfg in cases:
            assert dtype_name in tier.DTYPES and 1 <= head_dim <= 256 and len(cfg) == 4
    assert {(n, r) for n, r, _ in tier.epilogue_cases()} == {(n, r) for n in tier.NORMS for r in tier.ROPES}
    assert {m for m, _, _ in tier.lock_kv_cases()} == set(tier.LOCK_KV_MODES)
    assert tier.spec_like_cases()
    assert tier._case_id(("bf16", 128, (128, 64, 8, 3))) == "bf16-128-128x64x8x3"
    lock = tier._moving_rect_lock(2, 3, 30, 52, 0.5, text=7, device="cpu")
    assert lock.shape == (2, 7 + 3 * 30 * 52) and bool((lock[:, :7] == 0).all()) and lock.max() == 0.5


def test_cuda_tier_is_marked_and_skips_here():
    import test_cuda_tier as tier
    assert any(m.name == "cuda" for m in tier.pytestmark)
    if not torch.cuda.is_available():
        assert any(m.name == "skipif" and m.args and m.args[0] for m in tier.pytestmark) or \
            tier.TIER_DEVICE != "cuda"


def test_modelled_time_is_finite_for_odd_shapes():
    for args in ((1, 1, 1, 1, 1, 8), (3, 999, 77, 6, 3, 72), (1, 4096, 4096, 2, 1, 256)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            r = routing.choose_path(*args, dtype, "cuda", available=ALL, **H100)
            assert math.isfinite(r.modelled_ms) and r.modelled_ms > 0 and r.plain_ms > 0
