"""lock_kv: the Triton kernel (through the interpreter) and the PyTorch path against the
fp32 reference with the flash-attention tolerance rule; the blending rule (selection at
weight 0/1, non-finite values), in-place semantics, custom ops, torch.compile, autograd
and bad input."""
import importlib

import pytest
import torch
from helpers import ATOL, assert_fa_close, far_apart_batch, make_source

from kvlock_kernels import reference
from kvlock_kernels.attention.lock_kv import lock_kv

LK = importlib.import_module("kvlock_kernels.attention.lock_kv")
BLOCK_S = LK.INTERPRETER_BLOCK_S


def make_lock(B, S, kind, gen=None):
    """Locks whose token blocks are a mix of all-0, all-1 and soft rows."""
    if kind == "zero":
        return torch.zeros(B, S)
    if kind == "one":
        return torch.ones(B, S)
    rows = torch.arange(S)
    if kind == "bool":
        lock = torch.rand(B, S, generator=gen) > 0.5
        lock[:, (rows // 4) % 3 == 0] = False
        return lock
    lock = torch.rand(B, S, generator=gen)
    lock[:, rows % 3 == 0] = 0.0
    lock[:, rows % 3 == 1] = 1.0
    if kind == "soft":
        return lock
    raise ValueError(kind)


def make_inputs(B, S, H, D, dtype, source, lock_kind="soft"):
    """source: "branch0", "branch1", "stride0" (expanded batch-1 view), "batch1", "per_entry"."""
    k, v = (torch.randn(B, S, H, D).to(dtype) for _ in range(2))
    return k, v, make_lock(B, S, lock_kind), make_source(source, B, S, H, D, dtype)


def upcast(kw):
    return {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


def check_against_reference(k, v, lock, kw, backend="triton", inplace=False):
    ref32 = reference.lock_kv(k.float(), v.float(), lock, **upcast(kw))
    ref_same = reference.lock_kv(k, v, lock, **kw)
    if inplace:
        kc, vc = k.clone(), v.clone()
        out = lock_kv(kc, vc, lock, **kw, inplace=True, backend=backend)
        assert out[0] is kc and out[1] is vc
    else:
        out = lock_kv(k, v, lock, **kw, backend=backend)
        assert all(o.is_contiguous() for o in out)
    for name, o, r32, rs in zip(("k", "v"), out, ref32, ref_same):
        assert o.shape == k.shape and o.dtype == k.dtype
        assert_fa_close(o, r32, rs, atol=ATOL[k.dtype], name=name)
    # Weight 0 and 1 select exactly (no arithmetic on the selected operand).
    B, S = k.shape[:2]
    w = (lock[None] if lock.dim() == 1 else lock).float().expand(B, S)
    src_k = k[kw["source_index"]][None].expand_as(k) if "source_index" in kw else kw["k_src"].expand_as(k)
    src_rows = torch.zeros(B, dtype=torch.bool)
    if "source_index" in kw:
        src_rows[kw["source_index"]] = True
    zero = (w == 0) | src_rows[:, None]
    one = (w == 1) & ~src_rows[:, None]
    assert torch.equal(out[0][zero], k[zero])
    assert torch.equal(out[0][one], src_k[one])
    return out


# ------------------------------------------------------------------ Triton vs reference
CASES = [
    # B, S, H, D, source, lock kind, dtype
    (3, 37, 2, 64, "branch0", "soft", torch.bfloat16),
    (3, 40, 2, 72, "branch1", "bool", torch.float16),
    (2, 33, 3, 80, "stride0", "soft", torch.bfloat16),
    (1, 50, 2, 96, "batch1", "soft", torch.float32),
    (3, 20, 1, 128, "per_entry", "soft", torch.bfloat16),
    (2, 17, 2, 64, "branch1", "zero", torch.float16),
    (2, 18, 2, 64, "stride0", "one", torch.bfloat16),
    (1, 19, 2, 80, "branch0", "soft", torch.bfloat16),  # the source alone: a copy
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_S{}_H{}_D{}_{}_{}_{}".format(*c[:6], str(c[6])[6:]))
def test_triton_matches_reference(case):
    B, S, H, D, source, lock_kind, dtype = case
    k, v, lock, kw = make_inputs(B, S, H, D, dtype, source, lock_kind)
    check_against_reference(k, v, lock, kw)


@pytest.mark.parametrize("source", ["branch1", "stride0", "per_entry"])
def test_triton_in_place_matches_reference(source):
    k, v, lock, kw = make_inputs(3, 37, 2, 72, torch.bfloat16, source)
    check_against_reference(k, v, lock, kw, inplace=True)


@pytest.mark.parametrize("lock_shape", ["S", "1xS"])
def test_broadcast_lock(lock_shape):
    k, v, lock, kw = make_inputs(3, 30, 2, 64, torch.float32, "branch0")
    lock = lock[0] if lock_shape == "S" else lock[:1]
    out = check_against_reference(k, v, lock, kw)
    torch.testing.assert_close(out[0][1:], reference.lock_kv(k, v, lock[None, :] if lock.dim() == 1 else lock,
                                                             **kw)[0][1:], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_and_triton_paths_agree(backend):
    k, v, lock, kw = make_inputs(2, 21, 2, 64, torch.bfloat16, "stride0")
    check_against_reference(k, v, lock, kw, backend=backend)
    check_against_reference(k, v, lock, kw, backend=backend, inplace=True)


def test_stride0_source_is_read_in_place(monkeypatch):
    k, v, lock, kw = make_inputs(3, 30, 2, 64, torch.bfloat16, "stride0")
    seen = {}
    real = LK._launch

    def spy(k_, v_, lock_, k_src, v_src, *rest, **kw_):
        seen["ptr"], seen["stride0"] = k_src.data_ptr(), k_src.stride(0)
        return real(k_, v_, lock_, k_src, v_src, *rest, **kw_)

    monkeypatch.setattr(LK, "_launch", spy)
    check_against_reference(k, v, lock, kw)
    assert seen == {"ptr": kw["k_src"].data_ptr(), "stride0": 0}


def test_non_contiguous_inputs():
    """k, v as chunks of a fused qkv projection; the source from a wider cache; a
    non-unit last stride (copied)."""
    B, S, H, D = 3, 35, 2, 64
    qkv = torch.randn(B, S, 3 * H * D).to(torch.bfloat16)
    _, k, v = (t.unflatten(-1, (H, D)) for t in qkv.chunk(3, dim=-1))
    assert not k.is_contiguous() and k.stride(-1) == 1
    cache = torch.randn(1, S, 2 * H, D).to(torch.bfloat16)
    kw = dict(k_src=cache[:, :, :H], v_src=cache[:, :, H:])
    lock = make_lock(B, S, "soft")
    check_against_reference(k, v, lock, kw)
    check_against_reference(k, v, lock, dict(source_index=2))
    kt = torch.randn(B, S, H, D).to(torch.bfloat16).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert kt.stride(-1) != 1
    check_against_reference(kt, v, lock, kw)
    check_against_reference(kt.clone(), v.clone(), lock, kw, inplace=True)


# ------------------------------------------------------------------ in place: what is written
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_in_place_leaves_source_entry_and_weight_zero_rows_untouched(backend):
    B, S, H, D = 3, 37, 2, 64
    k, v, lock, kw = make_inputs(B, S, H, D, torch.bfloat16, "branch1")
    # NaNs with payloads and signs in the source entry: its bytes must survive as they are.
    for t in (k, v):
        bits = t[1].view(torch.int16)
        bits.view(-1)[::7] = torch.tensor([0x7FC1, -0x7F, 0x7F81, -0x3F], dtype=torch.int16).repeat(
            bits.numel() // 28 + 1)[: bits.view(-1)[::7].numel()]
    lock[:, :5] = 0.0
    k_before, v_before = k.clone(), v.clone()
    expected = reference.lock_kv(k, v, lock, **kw)
    lock_kv(k, v, lock, **kw, inplace=True, backend=backend)
    assert torch.equal(k[1].view(torch.int16), k_before[1].view(torch.int16))
    assert torch.equal(v[1].view(torch.int16), v_before[1].view(torch.int16))
    assert torch.equal(k[:, :5].view(torch.int16), k_before[:, :5].view(torch.int16))
    for b in (0, 2):
        finite = torch.isfinite(expected[0][b])
        assert torch.equal(k[b][finite], expected[0][b][finite])


def test_functional_branch_copies_source_entry_bytes():
    k, v, lock, kw = make_inputs(2, 20, 1, 64, torch.float16, "branch0")
    k.view(torch.int16)[0, ::3, 0, ::5] = 0x7E01  # NaN payloads
    out = lock_kv(k, v, lock, **kw, backend="triton")
    assert torch.equal(out[0][0].view(torch.int16), k[0].view(torch.int16))


# ------------------------------------------------------------------ non-finite inputs: one rule
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_non_finite_values_follow_the_rule(backend, inplace):
    B, S, H, D = 2, 24, 1, 64
    k, v = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    ks, vs = torch.randn(1, S, H, D), torch.randn(1, S, H, D)
    lock = torch.full((B, S), 0.5)
    lock[:, :8] = 0.0   # source NaN here must not be read
    lock[:, 8:16] = 1.0  # k NaN here must not be read
    ks[:, :8] = float("nan")
    vs[:, :8] = float("inf")
    k[:, 8:16] = float("nan")
    v[:, 8:16] = float("-inf")
    ks[:, 20] = float("nan")  # 0 < w < 1: IEEE propagation
    kc, vc = k.clone(), v.clone()
    out = lock_kv(kc, vc, lock, k_src=ks, v_src=vs, inplace=inplace, backend=backend)
    assert torch.isfinite(out[0][:, :20]).all() and torch.isfinite(out[1]).all()
    assert torch.isnan(out[0][:, 20]).all()
    assert torch.equal(out[0][:, :8], k[:, :8]) and torch.equal(out[0][:, 8:16], ks[:, 8:16].expand(B, -1, -1, -1))


# ------------------------------------------------------------------ custom ops, compile, autograd
def test_custom_ops_are_registered():
    k, v = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    ks, vs = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    lock = torch.rand(2, 9)
    op = torch.ops.kvlock_kernels.lock_kv
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    with_aot = quick + ("test_aot_dispatch_static",)  # the dynamic-shape variant costs ~15 s
    torch.library.opcheck(op, (k, v, lock, None, None, 1, "triton"), test_utils=quick)
    torch.library.opcheck(op, tuple(t.requires_grad_() for t in (k.clone(), v.clone(), lock.clone(), ks.clone(),
                                                                  vs.clone())) + (-1, "torch"),
                          test_utils=with_aot)
    torch.library.opcheck(torch.ops.kvlock_kernels.lock_kv_, (k.clone(), v.clone(), lock, ks, vs, -1, "triton"),
                          test_utils=quick)


def test_torch_compile_fullgraph():
    k, v, lock, kw = make_inputs(3, 30, 2, 64, torch.float32, "branch1")

    def step(k, v, lock):
        kl, vl = lock_kv(k * 1, v, lock, source_index=1)
        return kl + 1, vl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(k, v, lock)
    ref = reference.lock_kv(k, v, lock, source_index=1)
    torch.testing.assert_close(out[0], ref[0] + 1, rtol=0, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)

    def step_inplace(k, v, ks, lock):
        k = k * 1
        lock_kv(k, v, lock, k_src=ks.expand(3, -1, -1, -1), v_src=ks, inplace=True)
        return k

    ks = torch.randn(1, 30, 2, 64)
    vc = v.clone()
    out = torch.compile(step_inplace, fullgraph=True, backend="aot_eager")(k, vc, ks, lock)
    torch.testing.assert_close(out, reference.lock_kv(k, v, lock, k_src=ks, v_src=ks)[0], rtol=0, atol=0)
    torch.testing.assert_close(vc, reference.lock_kv(k, v, lock, k_src=ks, v_src=ks)[1], rtol=0, atol=0)


def test_gradcheck_float64_torch_path():
    B, S, H, D = 2, 5, 1, 3
    k, v = torch.randn(B, S, H, D, dtype=torch.float64), torch.randn(B, S, H, D, dtype=torch.float64)
    ks, vs = torch.randn(1, S, H, D, dtype=torch.float64), torch.randn(1, S, H, D, dtype=torch.float64)
    lock = torch.rand(B, S, dtype=torch.float64) * 0.8 + 0.1
    args = [t.requires_grad_() for t in (k, v, ks, vs, lock)]

    def fn(k, v, ks, vs, lock):
        return lock_kv(k, v, lock, k_src=ks, v_src=vs, backend="torch")

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda k, v, lock: lock_kv(k, v, lock, source_index=0, backend="torch"),
                                    (args[0], args[1], args[4]))


def test_backward_of_triton_forward_matches_reference():
    k, v, lock, kw = make_inputs(3, 20, 2, 64, torch.float32, "stride0")
    kr, vr = k.clone().requires_grad_(), v.clone().requires_grad_()
    ks = kw["k_src"][:1].clone().requires_grad_()
    out = lock_kv(kr, vr, lock, k_src=ks.expand(3, -1, -1, -1), v_src=kw["v_src"], backend="triton")
    (out[0] * 2 + out[1]).sum().backward()
    w = lock[:, :, None, None]
    torch.testing.assert_close(kr.grad, 2 * (1 - w).expand_as(k))
    torch.testing.assert_close(ks.grad, 2 * w.sum(0, keepdim=True).expand_as(ks))


def test_in_place_with_grad_goes_through_autograd():
    k, v, lock, kw = make_inputs(2, 10, 1, 16, torch.float32, "batch1")
    leaf = k.clone().requires_grad_()
    kk, vv = leaf * 1, v.clone()
    lock_kv(kk, vv, lock, **kw, inplace=True)
    kk.sum().backward()
    torch.testing.assert_close(leaf.grad, (1 - lock)[:, :, None, None].expand_as(k))


def test_empty_inputs():
    k = torch.randn(2, 0, 2, 16)
    out = lock_kv(k, k.clone(), torch.zeros(2, 0), source_index=0, backend="triton")
    assert out[0].shape == (2, 0, 2, 16)


@pytest.mark.parametrize("inplace", [False, True])
def test_batch_strides_beyond_int32(inplace):
    """Issue 12 (limits): batch entries 2^31 elements apart.  The kernel passes strides
    divided by ALIGN and multiplies them back in 64-bit (in 32-bit, 2^27 * 16 wrapped to
    -2^31 and entry 1 was read and written 4 GB before the buffer)."""
    k = far_apart_batch((24, 2, 16), torch.float16)
    v = far_apart_batch((24, 2, 16), torch.float16)
    lock = make_lock(2, 24, "soft")
    ks, vs = (torch.randn(1, 24, 2, 16).half() for _ in range(2))
    kc, vc = k.clone(), v.clone()
    for kw in (dict(source_index=0), dict(k_src=ks, v_src=vs)):
        ref = reference.lock_kv(kc, vc, lock, **kw)
        out = lock_kv(k, v, lock, **kw, inplace=inplace, backend="triton")  # functional: k, v only read
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, atol=0, rtol=0)
        if inplace:
            k.copy_(kc)
            v.copy_(vc)


# ---------------------------------------------------------------------- bad input
def _call(**over):
    k, v, lock, kw = make_inputs(2, 8, 2, 16, torch.float32, "batch1")
    args = dict(k=k, v=v, lock=lock, **kw)
    args.update(over)
    return lock_kv(args.pop("k"), args.pop("v"), args.pop("lock"), **args)


BAD = [
    (dict(k=[1.0]), TypeError, "k must be a torch.Tensor"),
    (dict(k=torch.randn(2, 8, 16)), ValueError, "k must be 4-D"),
    (dict(k=torch.zeros(2, 8, 2, 16, dtype=torch.int32)), TypeError, "k must have dtype"),
    (dict(v=torch.randn(2, 8, 2, 16).half()), TypeError, "v must have k's dtype"),
    (dict(v=torch.randn(2, 9, 2, 16)), ValueError, "v must have k's shape"),
    (dict(lock=0.5), TypeError, "lock must be a torch.Tensor"),
    (dict(lock=torch.ones(2, 8, dtype=torch.int64)), TypeError, "lock must have dtype"),
    (dict(lock=torch.rand(3, 8)), ValueError, "lock must have shape"),
    (dict(lock=torch.full((2, 8), 1.5)), ValueError, r"lock values must be in \[0, 1\]"),
    (dict(lock=torch.full((2, 8), float("nan"))), ValueError, r"lock values must be in \[0, 1\]"),
    (dict(k_src=None, v_src=None), ValueError, "lock needs a source"),
    (dict(v_src=None), ValueError, "k_src and v_src must be given together"),
    (dict(source_index=0), ValueError, "either as k_src and v_src or as source_index"),
    (dict(k_src=None, v_src=None, source_index=2), ValueError, "source_index must be an int in"),
    (dict(k_src=None, v_src=None, source_index=1.0), TypeError, "source_index must be an int"),
    (dict(k_src=torch.randn(1, 8, 2, 16).half()), TypeError, "k_src must have k's dtype"),
    (dict(k_src=torch.randn(1, 8, 3, 16)), ValueError, "k_src must have shape"),
    (dict(v_src=torch.randn(3, 8, 2, 16)), ValueError, "v_src must have shape"),
    (dict(inplace=1), TypeError, "inplace must be a bool"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend=None), TypeError, "backend must be one of"),
    (dict(k=torch.randn(2, 8, 2, 16, dtype=torch.float64), v=torch.randn(2, 8, 2, 16, dtype=torch.float64),
          k_src=None, v_src=None, source_index=0, backend="triton"), TypeError, "backend='triton' needs"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


def test_bad_input_writes_nothing(monkeypatch):
    k, v, lock, kw = make_inputs(2, 8, 2, 16, torch.float32, "batch1")
    k_before, v_before = k.clone(), v.clone()
    launched = []
    monkeypatch.setattr(LK, "_launch", lambda *a, **kw_: launched.append(1))
    for over, exc in ((dict(lock=torch.full((2, 8), 2.0)), ValueError),
                      (dict(k_src=kw["k_src"].half()), TypeError),
                      (dict(v_src=torch.randn(1, 7, 2, 16)), ValueError)):
        args = dict(kw, lock=lock)
        args.update(over)
        with pytest.raises(exc):
            lock_kv(k, v, args.pop("lock"), **args, inplace=True, backend="triton")
    assert not launched
    assert torch.equal(k, k_before) and torch.equal(v, v_before)


def test_check_inputs_false_skips_the_value_check():
    k, v, lock, kw = make_inputs(2, 8, 2, 16, torch.float32, "batch1")
    lock_kv(k, v, torch.full((2, 8), 1.5), **kw, check_inputs=False)  # no sync, no error
