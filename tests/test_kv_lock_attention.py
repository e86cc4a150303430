"""kv_lock_attention: the Triton kernel (through the interpreter) and the PyTorch path
against the fp32 oracle, with the flash-attention tolerance rule."""
import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import ATOL, assert_fa_close

import kvlock_kernels
from kvlock_kernels import kv_lock_attention, reference
from kvlock_kernels.kv_lock_attention import INTERPRETER_CONFIG, select_backend

# The package attribute kv_lock_attention is the function; the module lives in sys.modules.
KLA_MODULE = importlib.import_module("kvlock_kernels.kv_lock_attention")

BLOCK_N = INTERPRETER_CONFIG[1]


def make_inputs(B, Sq, Skv, Hq, Hkv, D, dtype, *, src_batch=None, lock_kind="soft", layout="bshd"):
    def rnd(b, s, h):
        t = torch.randn(b, s, h, D, dtype=torch.float32).to(dtype)
        return t.transpose(1, 2).contiguous() if layout == "bhsd" else t

    q, k, v = rnd(B, Sq, Hq), rnd(B, Skv, Hkv), rnd(B, Skv, Hkv)
    sb = B if src_batch is None else src_batch
    k_src, v_src = rnd(sb, Skv, Hkv), rnd(sb, Skv, Hkv)
    lock = make_lock(B, Skv, lock_kind)
    return q, k, v, k_src, v_src, lock


def make_lock(B, Skv, kind):
    """Locks whose KV blocks are a mix of all-0, all-1 and mixed blocks."""
    idx = torch.arange(Skv)
    block = idx // BLOCK_N
    if kind == "soft":
        lock = torch.rand(B, Skv)
        lock[:, block % 3 == 0] = 0.0
        lock[:, block % 3 == 1] = 1.0
        return lock
    if kind == "bool":
        lock = torch.rand(B, Skv) > 0.5
        lock[:, block % 3 == 0] = False
        lock[:, block % 3 == 1] = True
        return lock
    if kind == "random":
        return torch.rand(B, Skv)
    raise ValueError(kind)


def check_against_oracle(q, k, v, k_src, v_src, lock, *, layout="bshd", backend="triton", lse=True):
    out = kv_lock_attention(q, k, v, k_src, v_src, lock, layout=layout, backend=backend, return_lse=lse)
    out, out_lse = out if lse else (out, None)
    ref, ref_lse = reference.kv_lock_attention(q, k, v, k_src, v_src, lock, layout=layout, return_lse=True)
    ref_same = reference.kv_lock_attention(q, k, v, k_src, v_src, lock, layout=layout, upcast=False)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_fa_close(out, ref, ref_same, atol=ATOL[q.dtype])
    if lse:
        assert out_lse.dtype == torch.float32
        torch.testing.assert_close(out_lse, ref_lse, atol=2e-3 if q.dtype != torch.float32 else 1e-5, rtol=1e-4)
    return out


# Odd shapes: lengths not multiples of the 64-row blocks, B = 1 and 3, GQA 4:1 and 12:1,
# head dims that are not powers of two.
SHAPES = [
    # B, Sq, Skv, Hq, Hkv, D
    (1, 70, 133, 4, 1, 64),
    (3, 37, 97, 2, 2, 80),
    (2, 33, 150, 12, 1, 72),
    (1, 129, 130, 2, 2, 128),
    (1, 20, 70, 2, 1, 96),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Sq{}_Skv{}_H{}x{}_D{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_oracle(shape, dtype):
    B, Sq, Skv, Hq, Hkv, D = shape
    check_against_oracle(*make_inputs(B, Sq, Skv, Hq, Hkv, D, dtype))


@pytest.mark.parametrize("D", [16, 256])
def test_triton_head_dim_extremes(D):
    check_against_oracle(*make_inputs(2, 40, 90, 2, 1, D, torch.bfloat16))


def test_triton_fp32():
    check_against_oracle(*make_inputs(2, 50, 100, 4, 2, 64, torch.float32))


@pytest.mark.parametrize("lock_kind", ["bool", "random"])
def test_triton_lock_kinds(lock_kind):
    check_against_oracle(*make_inputs(2, 40, 150, 2, 2, 64, torch.bfloat16, lock_kind=lock_kind))


@pytest.mark.parametrize("lock_shape", ["1xS", "S"])
def test_triton_broadcast_lock(lock_shape):
    q, k, v, ks, vs, lock = make_inputs(2, 30, 100, 2, 1, 64, torch.float16)
    lock = lock[:1] if lock_shape == "1xS" else lock[0]
    check_against_oracle(q, k, v, ks, vs, lock)


def test_triton_broadcast_source_is_not_copied(monkeypatch):
    """A source branch shared by the CFG branches: batch-1 or an expanded stride-0 view."""
    q, k, v, ks, vs, lock = make_inputs(3, 40, 100, 4, 2, 64, torch.bfloat16, src_batch=1)
    check_against_oracle(q, k, v, ks, vs, lock)
    ks_x, vs_x = ks.expand(3, -1, -1, -1), vs.expand(3, -1, -1, -1)
    seen = {}
    mod = KLA_MODULE
    real = mod._launch_triton

    def spy(q_, k_, v_, k_src, v_src, *rest, **kw):
        seen["ptr"], seen["stride0"] = k_src.data_ptr(), k_src.stride(0)
        return real(q_, k_, v_, k_src, v_src, *rest, **kw)

    monkeypatch.setattr(mod, "_launch_triton", spy)
    check_against_oracle(q, k, v, ks_x, vs_x, lock, lse=False)
    assert seen == {"ptr": ks.data_ptr(), "stride0": 0}


def test_triton_non_contiguous_inputs():
    """q/k/v sliced out of a packed qkv projection (head stride != H*D), k_src from a
    larger cache (sequence stride over a wider tensor)."""
    B, S, H, D = 2, 70, 3, 64
    qkv = torch.randn(B, S, 3, H, D).to(torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    cache = torch.randn(1, S, 2 * H, D).to(torch.bfloat16)
    ks, vs = cache[:, :, :H], cache[:, :, H:]
    lock = make_lock(B, S, "soft")
    check_against_oracle(q, k, v, ks, vs, lock)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_triton_layouts(layout):
    q, k, v, ks, vs, lock = make_inputs(2, 45, 77, 4, 2, 64, torch.bfloat16, layout=layout, src_batch=1)
    out = check_against_oracle(q, k, v, ks, vs, lock, layout=layout)
    if layout == "bhsd":
        assert out.is_contiguous()  # bhsd results come back in bhsd memory order


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lock_zero_and_one_match_sdpa(backend, dtype):
    B, S, H, D = 2, 80, 2, 64
    q, k, v, ks, vs, _ = make_inputs(B, S, S, H, H, D, dtype)
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(  # noqa: E731
        a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)).transpose(1, 2)
    sdpa32 = lambda a, b, c: sdpa(a.float(), b.float(), c.float())  # noqa: E731
    for lock_value, (kk, vv) in ((0.0, (k, v)), (1.0, (ks, vs))):
        lock = torch.full((B, S), lock_value)
        out = kv_lock_attention(q, k, v, ks, vs, lock, backend=backend)
        assert_fa_close(out, sdpa32(q, kk, vv), sdpa(q, kk, vv), atol=ATOL[dtype], name=f"lock={lock_value}")


def test_uniform_blocks_skip_the_unused_tile():
    """Blocks whose lock is all 0 never read k_src/v_src, blocks all 1 never read k/v: NaN
    planted there must not reach the output."""
    B, S, H, D = 1, 3 * BLOCK_N, 2, 64
    q, k, v, ks, vs, _ = make_inputs(B, 40, S, H, H, D, torch.float16)
    lock = torch.zeros(B, S)
    lock[:, BLOCK_N:2 * BLOCK_N] = 1.0
    lock[:, 2 * BLOCK_N:] = torch.rand(B, BLOCK_N)
    ks_nan, vs_nan, k_nan, v_nan = ks.clone(), vs.clone(), k.clone(), v.clone()
    ks_nan[:, :BLOCK_N] = float("nan")
    vs_nan[:, :BLOCK_N] = float("nan")
    k_nan[:, BLOCK_N:2 * BLOCK_N] = float("nan")
    v_nan[:, BLOCK_N:2 * BLOCK_N] = float("nan")
    out = kv_lock_attention(q, k_nan, v_nan, ks_nan, vs_nan, lock, backend="triton")
    assert torch.isfinite(out).all()
    ref = reference.kv_lock_attention(q, k, v, ks, vs, lock)
    ref_same = reference.kv_lock_attention(q, k, v, ks, vs, lock, upcast=False)
    assert_fa_close(out, ref, ref_same, atol=ATOL[torch.float16])


def test_no_lock_is_plain_attention():
    q, k, v, ks, vs, lock = make_inputs(1, 30, 70, 2, 2, 64, torch.float32)
    plain = reference.kv_lock_attention(q, k, v)
    for args in ((None, None, None), (ks, vs, None), (None, None, lock)):
        out = kv_lock_attention(q, k, v, *args, backend="triton")
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_softmax_scale():
    q, k, v, ks, vs, lock = make_inputs(1, 30, 70, 2, 2, 64, torch.float32)
    out = kv_lock_attention(q, k, v, ks, vs, lock, softmax_scale=0.3, backend="triton")
    ref = reference.kv_lock_attention(q, k, v, ks, vs, lock, softmax_scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "B{}_Sq{}_Skv{}_H{}x{}_D{}".format(*s))
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_torch_backend_matches_oracle(shape, layout):
    B, Sq, Skv, Hq, Hkv, D = shape
    q, k, v, ks, vs, lock = make_inputs(B, Sq, Skv, Hq, Hkv, D, torch.bfloat16, layout=layout, src_batch=1)
    check_against_oracle(q, k, v, ks, vs, lock, layout=layout, backend="torch")


def test_torch_backend_lse_in_query_chunks():
    q, k, v, ks, vs, lock = make_inputs(2, 50, 60, 4, 2, 64, torch.float32)
    out, lse = reference.kv_lock_attention_torch(q, k, v, ks, vs, lock, return_lse=True, query_chunk=16)
    ref, ref_lse = reference.kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_lse_matches_logsumexp_of_scores():
    q, k, v, ks, vs, lock = make_inputs(2, 33, 90, 4, 1, 80, torch.float32)
    _, lse = kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True, backend="triton")
    kb, _ = reference.lock_kv(k, v, lock, k_src=ks, v_src=vs)
    kb = kb.repeat_interleave(4, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kb) / 80 ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)


def test_empty_queries_return_empty():
    q, k, v, ks, vs, lock = make_inputs(2, 0, 10, 2, 2, 64, torch.float16)
    out, lse = kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True, backend="triton")
    assert out.shape == (2, 0, 2, 64) and lse.shape == (2, 2, 0)


def test_auto_backend_routing(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # flash-attn not installed
    assert select_backend(cuda, torch.bfloat16, False, "auto") == "triton"
    assert select_backend(cpu, torch.bfloat16, False, "auto") == "triton"  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(cpu, torch.bfloat16, True, "auto") == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        select_backend(cpu, torch.bfloat16, True, "triton")
    assert select_backend(cuda, torch.bfloat16, True, "torch") == "torch"


def test_flash_attn_routing_with_stand_in(monkeypatch):
    """With lock=None on CUDA, "auto" goes to flash_attn_func when flash-attn imports."""
    calls = []

    def fake_flash_attn_func(q, k, v, softmax_scale=None, return_attn_probs=False):
        calls.append((q.shape, k.shape, softmax_scale, return_attn_probs))
        out = reference.kv_lock_attention(q, k, v, softmax_scale=softmax_scale, return_lse=return_attn_probs)
        return (out[0], out[1], None) if return_attn_probs else out

    stand_in = types.ModuleType("flash_attn")
    stand_in.flash_attn_func = fake_flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    cuda = torch.device("cuda")
    assert select_backend(cuda, torch.bfloat16, False, "auto") == "flash"
    assert select_backend(cuda, torch.bfloat16, True, "auto") == "triton"  # locked: ours
    assert select_backend(cuda, torch.float32, False, "auto") == "triton"  # flash: half only
    assert select_backend(cuda, torch.bfloat16, False, "triton") == "triton"  # forced

    # The op's flash branch really calls it (CPU tensors, routing forced as on CUDA).
    mod = KLA_MODULE
    monkeypatch.setattr(mod, "select_backend", lambda *a: "flash")
    q, k, v, *_ = make_inputs(1, 20, 30, 4, 2, 64, torch.bfloat16)
    out, lse = kv_lock_attention(q, k, v, return_lse=True)
    ref, ref_lse = reference.kv_lock_attention(q, k, v, return_lse=True)
    assert len(calls) == 1 and calls[0][3] is True
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_torch_compile_fullgraph_no_graph_breaks():
    q, k, v, ks, vs, lock = make_inputs(2, 40, 70, 2, 1, 64, torch.float32, src_batch=1)

    def step(q, k, v, ks, vs, lock):
        out, lse = kv_lock_attention(q, k, v, ks.expand(2, -1, -1, -1), vs.expand(2, -1, -1, -1),
                                     lock, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v, ks, vs, lock)
    ref, ref_lse = reference.kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True)
    torch.testing.assert_close(out, 2 * ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_custom_op_is_registered():
    op = torch.ops.kvlock_kernels.kv_lock_attention
    torch.library.opcheck(op, (torch.randn(1, 8, 2, 16), torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16),
                               torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16), torch.rand(1, 9),
                               0.25, "bhsd", True, "torch"))


# ---------------------------------------------------------------------- bad input
def _good():
    return make_inputs(2, 8, 10, 4, 2, 16, torch.float32)


def _call(**over):
    q, k, v, ks, vs, lock = _good()
    args = dict(q=q, k=k, v=v, k_src=ks, v_src=vs, lock=lock)
    args.update(over)
    return kv_lock_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("k_src"),
                             args.pop("v_src"), args.pop("lock"), backend="triton", **args)


@pytest.mark.parametrize("over, exc, msg", [
    (dict(k=torch.randn(3, 10, 2, 16), v=torch.randn(3, 10, 2, 16)), ValueError, "batch size"),
    (dict(v=torch.randn(2, 11, 2, 16)), ValueError, "v must have k's shape"),
    (dict(k=torch.randn(2, 10, 2, 32), v=torch.randn(2, 10, 2, 32)), ValueError, "head_dim"),
    (dict(k=torch.randn(2, 10, 3, 16), v=torch.randn(2, 10, 3, 16),
          k_src=None, v_src=None), ValueError, "divisible"),
    (dict(lock=torch.full((2, 10), 1.5)), ValueError, r"lock values must lie in \[0, 1\]"),
    (dict(lock=torch.full((2, 10), -0.1)), ValueError, r"lock values must lie in \[0, 1\]"),
    (dict(lock=torch.full((2, 10), float("nan"))), ValueError, "NaN"),
    (dict(lock=torch.rand(2, 11)), ValueError, "lock must have shape"),
    (dict(lock=torch.rand(3, 10)), ValueError, "lock must have shape"),
    (dict(lock=torch.randint(0, 2, (2, 10))), TypeError, "lock must have dtype"),
    (dict(v_src=None), ValueError, "k_src and v_src must be given together"),
    (dict(k_src=torch.randn(2, 9, 2, 16)), ValueError, "k_src must have shape"),
    (dict(q=torch.randn(2, 8, 4, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(2, 10, 2, 16).half()), TypeError, "k must have q's dtype"),
    (dict(q=torch.randn(2, 8, 4, 16, device="meta")), ValueError, "one device"),
    (dict(q=torch.randn(2, 8, 4, 300), k=torch.randn(2, 10, 2, 300), v=torch.randn(2, 10, 2, 300),
          k_src=None, v_src=None), ValueError, "head_dim must be in"),
    (dict(k=torch.randn(2, 0, 2, 16), v=torch.randn(2, 0, 2, 16), k_src=None, v_src=None, lock=None),
     ValueError, "Skv=0"),
    (dict(q=torch.randn(8, 4, 16)), ValueError, "q must be 4-D"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(layout="sbhd"), ValueError, "layout"),
])
def test_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


def test_bad_input_raises_before_launch(monkeypatch):
    mod = KLA_MODULE
    monkeypatch.setattr(mod, "_launch_triton", lambda *a, **k: pytest.fail("kernel launched"))
    with pytest.raises(ValueError):
        _call(lock=torch.full((2, 10), 2.0))


def test_check_inputs_false_skips_value_check():
    q, k, v, ks, vs, _ = _good()
    # An out-of-range lock is the caller's business with check_inputs=False: it just blends.
    lock = torch.full((2, 10), 2.0)
    out = kv_lock_attention(q, k, v, ks, vs, lock, backend="torch", check_inputs=False)
    ref = reference.kv_lock_attention(q, k, v, ks, vs, lock)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_public_names():
    assert kvlock_kernels.kv_lock_attention is kv_lock_attention
