"""kv_lock_attention: the fused Triton kernel (through the interpreter, every (BLOCK_M,
BLOCK_N) of the config table) and the PyTorch path against the fp32 oracle with the
flash-attention tolerance rule; the blending rule with non-finite inputs; tensor-core
work locked vs plain; validation; autograd."""
import functools
import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F
import triton.runtime.interpreter as triton_interpreter
from helpers import ATOL, assert_fa_close
from torch.utils.flop_counter import FlopCounterMode

import kvlock_kernels
from kvlock_kernels import kv_lock_attention, reference
from kvlock_kernels.attention.configs import (
    INTERPRETER_CONFIG,
    INTERPRETER_CONFIGS,
    KERNEL_CONFIGS,
    configs_for,
    head_dim_tier,
)

# The package attribute kv_lock_attention is the function; the module lives in sys.modules.
KLA_MODULE = importlib.import_module("kvlock_kernels.attention.kv_lock_attention")
fused_attention_with_config = KLA_MODULE.fused_attention_with_config
select_backend = KLA_MODULE.select_backend

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


def make_lock(B, Skv, kind, block_n=BLOCK_N):
    """Locks over KV blocks of `block_n` keys.  "classes": blocks cycle through all 0,
    all 1, constant 0.37 (a soft alpha) and mixed (random, with exact 0s and 1s)."""
    idx = torch.arange(Skv)
    block = idx // block_n
    if kind == "soft":
        lock = torch.rand(B, Skv)
        lock[:, block % 3 == 0] = 0.0
        lock[:, block % 3 == 1] = 1.0
        return lock
    if kind == "classes":
        lock = torch.rand(B, Skv)
        lock[:, ::5] = 0.0
        lock[:, 1::5] = 1.0
        lock[:, block % 4 == 0] = 0.0
        lock[:, block % 4 == 1] = 1.0
        lock[:, block % 4 == 2] = 0.37
        return lock
    if kind == "alpha":  # the scheduler's active phase: every key weighted alike
        return torch.full((B, Skv), 0.37)
    if kind == "bool":
        lock = torch.rand(B, Skv) > 0.5
        lock[:, block % 3 == 0] = False
        lock[:, block % 3 == 1] = True
        return lock
    if kind == "random":
        return torch.rand(B, Skv)
    if kind == "zeros":
        return torch.zeros(B, Skv)
    if kind == "ones":
        return torch.ones(B, Skv)
    raise ValueError(kind)


def poison_unread(k, v, k_src, v_src, lock):
    """NaN/inf in every row the blending rule does not read: the source rows under weight
    0, the fresh rows under weight 1 (per batch entry; lock (B, Skv))."""
    k, v, k_src, v_src = k.clone(), v.clone(), k_src.expand_as(k).clone(), v_src.expand_as(v).clone()
    w = lock.float().expand(k.shape[0], -1)
    for b in range(k.shape[0]):
        zero, one = (w[b] == 0).nonzero().flatten(), (w[b] == 1).nonzero().flatten()
        k_src[b, zero], v_src[b, zero] = float("nan"), float("inf")
        k[b, one], v[b, one] = float("-inf"), float("nan")
    return k, v, k_src, v_src


def check_against_oracle(q, k, v, k_src, v_src, lock, *, layout="bshd", backend="triton", lse=True, out=None,
                         out_lse=None):
    if out is None:
        res = kv_lock_attention(q, k, v, k_src, v_src, lock, layout=layout, backend=backend, return_lse=lse)
        out, out_lse = res if lse else (res, None)
    ref, ref_lse = reference.kv_lock_attention(q, k, v, k_src, v_src, lock, layout=layout, return_lse=True)
    ref_same = reference.kv_lock_attention(q, k, v, k_src, v_src, lock, layout=layout, upcast=False)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_fa_close(out, ref, ref_same, atol=ATOL[q.dtype])
    if out_lse is not None:
        assert out_lse.dtype == torch.float32
        torch.testing.assert_close(out_lse, ref_lse, atol=2e-3 if q.dtype != torch.float32 else 1e-5, rtol=1e-4)
    return out


# ------------------------------------------------------------------ every config of the table
def test_interpreter_configs_cover_the_table():
    pairs = {(bm, bn) for fam in KERNEL_CONFIGS.values() for per_dtype in fam.values()
             for tier in per_dtype.values() for bm, bn, _, _ in tier}
    assert {(bm, bn) for bm, bn, _, _ in INTERPRETER_CONFIGS} == pairs
    assert len(INTERPRETER_CONFIGS) == len(pairs)  # deduplicated: warps/stages do not change results


# (lock kind, dtype, head dim, B, Hq, Hkv): every config sees plain and every lock class,
# head dims 72/80/96 and powers of two, GQA, batch 1 and 3, and all three dtypes.
SWEEP_CASES = [
    (None, torch.float16, 80, 3, 2, 2),
    ("classes", torch.bfloat16, 64, 1, 4, 2),
    ("alpha", torch.float32, 96, 1, 2, 1),
    ("bool", torch.float16, 72, 3, 2, 1),
    ("zeros", torch.bfloat16, 128, 1, 2, 2),
    ("ones", torch.float32, 64, 1, 3, 1),
]


@pytest.mark.parametrize("case", SWEEP_CASES, ids=lambda c: f"{c[0] or 'plain'}-{str(c[1])[6:]}-D{c[2]}")
@pytest.mark.parametrize("config", INTERPRETER_CONFIGS, ids=lambda c: f"M{c[0]}N{c[1]}")
def test_every_config_matches_oracle(config, case):
    """Sq not a multiple of BLOCK_M; Skv = three full KV blocks and a tail.  NaN/inf in
    the rows the rule does not read must not reach the output (at BLOCK_N = 128 the
    previous kernel's mixed blocks leaked them: 0 * NaN in its score interpolation)."""
    kind, dtype, D, B, Hq, Hkv = case
    bm, bn = config[:2]
    Sq, Skv = 37, 3 * bn + 7
    q, k, v, ks, vs, _ = make_inputs(B, Sq, Skv, Hq, Hkv, D, dtype)
    lock = None if kind is None else make_lock(B, Skv, kind, block_n=bn)
    if lock is None:
        out, lse = fused_attention_with_config(q, k, v, None, None, None, config, return_lse=True)
    else:
        kp, vp, ksp, vsp = poison_unread(k, v, ks, vs, lock)
        out, lse = fused_attention_with_config(q, kp, vp, ksp, vsp, lock, config, return_lse=True)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_against_oracle(q, k, v, ks, vs, lock, out=out, out_lse=lse)


def test_block_n_128_nan_regression():
    """The configuration of the original report: BLOCK_N = 128, a block holding weight-0
    keys whose source is NaN next to weight-1 keys."""
    B, Sq, Skv, H, D = 1, 40, 150, 2, 64
    q, k, v, ks, vs, _ = make_inputs(B, Sq, Skv, H, H, D, torch.float32)
    lock = torch.zeros(B, Skv)
    lock[:, 64:128] = 1.0
    lock[:, 128:] = 0.5
    ks_nan, vs_nan = ks.clone(), vs.clone()
    ks_nan[:, :64], vs_nan[:, :64] = float("nan"), float("nan")
    for config in ((64, 128, 4, 1), (128, 128, 8, 3)):
        out = fused_attention_with_config(q, k, v, ks_nan, vs_nan, lock, config)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference.kv_lock_attention(q, k, v, ks, vs, lock), atol=1e-5, rtol=1e-5)


def test_fused_attention_with_config_rejects_bad_configs():
    q, k, v, ks, vs, lock = make_inputs(1, 8, 10, 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="config"):
        fused_attention_with_config(q, k, v, ks, vs, lock, (64, 64))
    with pytest.raises(ValueError, match="config"):
        fused_attention_with_config(q, k, v, ks, vs, lock, (64, 48, 4, 1))


# ------------------------------------------------------------------ tensor-core work
def _count_dots(monkeypatch):
    counts = {"calls": 0, "flops": 0}
    real = triton_interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, d, *args, **kwargs):
        counts["calls"] += 1
        counts["flops"] += 2 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        return real(self, a, b, d, *args, **kwargs)

    monkeypatch.setattr(triton_interpreter.InterpreterBuilder, "create_dot", counting)
    return counts


@pytest.mark.parametrize("kind", ["classes", "alpha", "bool"])
def test_locked_tensor_core_work_equals_plain(monkeypatch, kind):
    """Issue 9's done-when: a locked call issues the dots of a plain call (one QK and one
    PV dot per block, whatever the block's weights), so its tensor-core work is equal."""
    config = (64, 32, 4, 1)
    q, k, v, ks, vs, _ = make_inputs(2, 70, 4 * 32 + 5, 4, 2, 64, torch.bfloat16)
    lock = make_lock(2, k.shape[1], kind, block_n=32)
    counts = _count_dots(monkeypatch)
    fused_attention_with_config(q, k, v, None, None, None, config)
    plain = dict(counts)
    counts.update(calls=0, flops=0)
    fused_attention_with_config(q, k, v, ks, vs, lock, config)
    assert plain["calls"] > 0
    assert counts == plain
    # One QK and one PV dot per (program, KV block): 2 * 4 heads * 2 q-blocks * 5 KV blocks.
    assert plain["calls"] == 2 * (2 * 4) * 2 * 5


def test_torch_path_tensor_work_equals_plain(monkeypatch):
    """The PyTorch path's matmul work is the same with and without a lock (the blend is
    elementwise): one SDPA call on the same shapes, or (return_lse) the same matmuls."""
    q, k, v, ks, vs, lock = make_inputs(2, 64, 96, 4, 2, 32, torch.float32, lock_kind="random")
    flops = []
    for args in ((None, None, None), (ks, vs, lock)):
        with FlopCounterMode(display=False) as counter:
            reference.kv_lock_attention_torch(q, k, v, *args, return_lse=True)
        flops.append(counter.get_total_flops())
    assert flops[0] == 4 * 2 * 4 * 64 * 96 * 32 and flops[1] == flops[0]
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q_, k_, v_, **kw):
        calls.append((q_.shape, k_.shape, v_.shape))
        return real(q_, k_, v_, **kw)

    monkeypatch.setattr(sys.modules["kvlock_kernels.reference.attention"].F, "scaled_dot_product_attention", spy)
    for args in ((None, None, None), (ks, vs, lock)):
        reference.kv_lock_attention_torch(q, k, v, *args)
    assert len(calls) == 2 and calls[0] == calls[1]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_flop_counter_sees_the_op(backend):
    """The custom op is opaque to FlopCounterMode: it has a registered formula (the same
    4 * B * Hq * Sq * Skv * D with and without a lock)."""
    q, k, v, ks, vs, lock = make_inputs(1, 20, 40, 2, 1, 16, torch.float32)
    flops = []
    for args in ((None, None, None), (ks, vs, lock)):
        with FlopCounterMode(display=False) as counter:
            kv_lock_attention(q, k, v, *args, backend=backend)
        flops.append(counter.get_total_flops())
    assert flops == [4 * 1 * 2 * 20 * 40 * 16] * 2


# ------------------------------------------------------------------ public function, Triton backend
SHAPES = [
    # B, Sq, Skv, Hq, Hkv, D
    (1, 70, 133, 4, 1, 64),
    (3, 37, 97, 2, 2, 80),
    (2, 33, 150, 12, 1, 72),
    (1, 20, 70, 2, 1, 96),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Sq{}_Skv{}_H{}x{}_D{}".format(*s))
def test_triton_matches_oracle(shape):
    B, Sq, Skv, Hq, Hkv, D = shape
    check_against_oracle(*make_inputs(B, Sq, Skv, Hq, Hkv, D, torch.bfloat16))


@pytest.mark.parametrize("D", [16, 256])
def test_triton_head_dim_extremes(D):
    check_against_oracle(*make_inputs(2, 40, 90, 2, 1, D, torch.float16))


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
    real = KLA_MODULE._launch_triton

    def spy(q_, k_, v_, k_src, v_src, *rest, **kw):
        seen["ptr"], seen["stride0"] = k_src.data_ptr(), k_src.stride(0)
        return real(q_, k_, v_, k_src, v_src, *rest, **kw)

    monkeypatch.setattr(KLA_MODULE, "_launch_triton", spy)
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


# ------------------------------------------------------------------ PyTorch path
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


# ------------------------------------------------------------------ non-finite inputs: one rule
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_source_under_weight_zero_is_not_read(backend):
    q, k, v, ks, vs, _ = make_inputs(2, 20, 70, 2, 1, 32, torch.float32)
    lock = make_lock(2, 70, "soft", block_n=16)
    kp, vp, ksp, vsp = poison_unread(k, v, ks, vs, lock)
    out = kv_lock_attention(q, kp, vp, ksp, vsp, lock, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.kv_lock_attention(q, k, v, ks, vs, lock), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_source_backends_agree():
    """Weight 0: a NaN source key is not read (finite output, both backends).  Weight
    0.5: it reaches the blended key, and every query row of that batch entry's KV-head
    group attends to it: NaN rows, the same in both backends."""
    B, Sq, Skv, Hq, Hkv, D = 2, 9, 40, 4, 2, 16
    q, k, v, ks, vs, _ = make_inputs(B, Sq, Skv, Hq, Hkv, D, torch.float32)
    ks[1, 7, 0] = float("nan")  # batch entry 1, key 7, KV head 0 (query heads 0 and 1)
    lock = torch.zeros(B, Skv)
    outs = {b: kv_lock_attention(q, k, v, ks, vs, lock, backend=b) for b in ("triton", "torch")}
    for out in outs.values():
        assert torch.isfinite(out).all()
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-5, rtol=1e-5)
    lock[1, 7] = 0.5
    outs = {b: kv_lock_attention(q, k, v, ks, vs, lock, backend=b) for b in ("triton", "torch")}
    expected = torch.zeros(B, Sq, Hq, D, dtype=torch.bool)
    expected[1, :, 0:2] = True
    for out in outs.values():
        assert torch.equal(torch.isnan(out), expected)
    finite = ~expected
    torch.testing.assert_close(outs["triton"][finite], outs["torch"][finite], atol=1e-5, rtol=1e-5)


NON_FINITE = [  # (tensor index in (q, k, v, k_src, v_src), row, value, weight of that key row)
    (0, 1, float("nan"), None),   # a query row: that output row
    (0, 1, float("inf"), None),
    (1, 2, float("nan"), 0.5),    # a key read by the blend: every row of the head group
    (1, 2, float("nan"), 1.0),    # not read under weight 1: no effect
    (1, 2, float("inf"), 0.0),
    (2, 2, float("inf"), 0.0),    # a value row read: +-inf / NaN
    (3, 2, float("nan"), 0.0),    # source not read under weight 0
    (3, 2, float("nan"), 0.5),
    (4, 2, float("inf"), 1.0),
    (5, 2, float("nan"), None),   # a NaN weight (check_inputs=False): both operands, NaN
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf
@pytest.mark.parametrize("case", NON_FINITE, ids=lambda c: f"{'q k v ks vs lock'.split()[c[0]]}-{c[2]}-w{c[3]}")
def test_non_finite_inputs_same_pattern_both_backends(case):
    which, row, value, weight = case
    q, k, v, ks, vs, _ = make_inputs(1, 4, 6, 2, 1, 8, torch.float32)
    lock = torch.full((1, 6), 0.5)
    tensors = [q, k, v, ks, vs, lock]
    tensors[which][0, row] = value
    if weight is not None and which != 0:
        lock[0, row] = weight
    outs = [kv_lock_attention(*tensors, backend=b, check_inputs=False) for b in ("triton", "torch")]
    assert torch.equal(torch.isnan(outs[0]), torch.isnan(outs[1]))
    assert torch.equal(torch.isinf(outs[0]), torch.isinf(outs[1]))
    finite = torch.isfinite(outs[0])
    torch.testing.assert_close(outs[0][finite], outs[1][finite], atol=1e-5, rtol=1e-5)
    if which == 0:
        assert torch.isnan(outs[0][0, row]).all() and torch.isfinite(outs[0][0, row + 1:]).all()
    elif (which in (1, 2) and weight == 1.0) or (which in (3, 4) and weight == 0.0):
        assert finite.all()
    else:
        assert not finite.all()


# ------------------------------------------------------------------ autograd
def test_gradcheck_torch_path_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 2, 4, dtype=torch.float64, generator=g)
    k, v, ks, vs = (torch.randn(1, 5, 1, 4, dtype=torch.float64, generator=g) for _ in range(4))
    lock = torch.tensor([[0.0, 1.0, 0.3, 0.7, 0.0]], dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, ks, vs, lock)]
    for return_lse in (False, True):
        fn = functools.partial(reference.kv_lock_attention_torch, softmax_scale=0.6, return_lse=return_lse)
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_backward_matches_oracle(backend, layout):
    """The op's backward (recompute through the PyTorch path) against autograd through
    the oracle, for every differentiable input, lse included."""
    q, k, v, ks, vs, _ = make_inputs(2, 9, 21, 4, 2, 16, torch.float32, layout=layout, src_batch=1)
    lock = torch.rand(2, 21)
    lock[:, :5], lock[:, 5:9] = 0.0, 1.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v, ks, vs, lock)]
    out, lse = kv_lock_attention(*leaves, layout=layout, backend=backend, return_lse=True)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, ks, vs, lock)]
    ref, ref_lse = reference.kv_lock_attention(*ref_leaves, layout=layout, return_lse=True)
    ref_grads = torch.autograd.grad((ref * g_out).sum() + (ref_lse * g_lse).sum(), ref_leaves)
    for name, g, r in zip(("q", "k", "v", "k_src", "v_src", "lock"), grads, ref_grads):
        assert g is not None and g.shape == r.shape, name
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=name)


def test_backward_without_lock_and_bool_lock():
    q, k, v, ks, vs, _ = make_inputs(1, 6, 11, 2, 2, 16, torch.float32)
    q.requires_grad_()
    out = kv_lock_attention(q, k, v, backend="triton")
    out.sum().backward()
    ref_q = q.detach().clone().requires_grad_()
    reference.kv_lock_attention(ref_q, k, v).sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, atol=1e-5, rtol=1e-5)
    ks.requires_grad_()
    kv_lock_attention(q, k, v, ks, vs, torch.rand(11) > 0.5, backend="torch").sum().backward()
    assert ks.grad is not None and torch.isfinite(ks.grad).all()


# ------------------------------------------------------------------ routing
DIMS = (3, 4096, 4096, 12, 12, 128)  # (B, Sq, Skv, Hq, Hkv, D): compute-bound


def test_backend_selection_off_cuda(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend(cpu, torch.bfloat16, True, "auto", DIMS) == ("fused", None)  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(cpu, torch.bfloat16, True, "auto", DIMS) == ("torch", None)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        select_backend(cpu, torch.bfloat16, True, "triton", DIMS)
    assert select_backend(torch.device("cuda"), torch.bfloat16, True, "torch", DIMS) == ("torch", None)


def test_auto_on_cuda_follows_the_cost_model(monkeypatch):
    """"auto" on CUDA: compute-bound locked calls blend once then run the best plain
    attention; memory-bound ones (few queries, many keys) take the fused kernel; unlocked
    calls run plain attention; "triton" forces the fused kernel.  Shapes only: the same
    answer whatever the lock values (none are passed)."""
    import kvlock_kernels.attention.routing as routing

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    routing.reset_probes()
    monkeypatch.setattr(KLA_MODULE, "_cuda_arch", lambda index: 90)
    cuda = torch.device("cuda", 0)
    impl, plain = select_backend(cuda, torch.bfloat16, True, "auto", DIMS)
    assert (impl, plain) == ("blend_then_plain", "sdpa")
    assert select_backend(cuda, torch.bfloat16, False, "auto", DIMS) == ("plain", "sdpa")
    assert select_backend(cuda, torch.bfloat16, True, "auto", (2, 64, 32768, 12, 12, 128))[0] == "fused"
    assert select_backend(cuda, torch.bfloat16, True, "triton", DIMS) == ("fused", None)
    # fp32 has no fused config: blend then SDPA, and "triton" is refused.
    assert select_backend(cuda, torch.float32, True, "auto", (2, 64, 32768, 12, 12, 128)) == \
        ("blend_then_plain", "sdpa")
    with pytest.raises(ValueError, match="float32 CUDA tensors"):
        select_backend(cuda, torch.float32, True, "triton", DIMS)
    routing.reset_probes()


def test_blend_then_plain_path_matches_the_oracle(monkeypatch):
    """Path (a) end to end on CPU tensors (the op routed as on CUDA): lock_kv, then plain
    attention; an in-batch source (a stride-0 view of entry 0) is detected and skipped."""
    monkeypatch.setattr(KLA_MODULE, "select_backend", lambda *a, **k: ("blend_then_plain", "sdpa"))
    q, k, v, _, _, lock = make_inputs(3, 20, 70, 4, 2, 64, torch.bfloat16)
    ks, vs = k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)
    assert KLA_MODULE.in_batch_source_index(k, ks) == 0
    assert KLA_MODULE.in_batch_source_index(k, torch.randn_like(k[:1]).expand(3, -1, -1, -1)) is None
    out, lse = kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True)
    ref_lock = lock.clone()
    ref_lock[0] = 0.0  # the source entry blended toward itself is itself
    ref, ref_lse = reference.kv_lock_attention(q, k, v, ks, vs, ref_lock, return_lse=True)
    same = reference.kv_lock_attention(q, k, v, ks, vs, ref_lock, upcast=False)
    assert_fa_close(out, ref, same, atol=ATOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)


def test_plain_path_uses_the_chosen_backend(monkeypatch):
    """An unlocked call on the "plain" route runs routing.plain_attention with the backend
    the route named."""
    calls = []
    real = KLA_MODULE.plain_attention

    def spy(q, k, v, **kw):
        calls.append(kw["backend"])
        return real(q, k, v, **{**kw, "backend": "sdpa"})

    monkeypatch.setattr(KLA_MODULE, "select_backend", lambda *a, **k: ("plain", "fa3"))
    monkeypatch.setattr(KLA_MODULE, "plain_attention", spy)
    q, k, v, *_ = make_inputs(1, 20, 30, 4, 2, 64, torch.bfloat16)
    out, lse = kv_lock_attention(q, k, v, return_lse=True)
    ref, ref_lse = reference.kv_lock_attention(q, k, v, return_lse=True)
    assert calls == ["fa3"]
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)


def test_return_lse_without_flash_takes_the_fused_kernel(monkeypatch):
    """SDPA returns no log-sum-exp (its stand-in is the chunked fp32 PyTorch path): with
    return_lse (ring attention's chunks), "auto" on CUDA takes the fused kernel wherever it
    has a config, locked or not; a flash backend returns the LSE itself and keeps its route."""
    import kvlock_kernels.attention.routing as routing

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    routing.reset_probes()
    monkeypatch.setattr(KLA_MODULE, "_cuda_arch", lambda index: 90)
    cuda = torch.device("cuda", 0)
    for locked in (True, False):
        assert select_backend(cuda, torch.bfloat16, locked, "auto", DIMS, return_lse=True) == ("fused", None)
    assert select_backend(cuda, torch.float32, True, "auto", DIMS, return_lse=True) == ("blend_then_plain", "sdpa")
    monkeypatch.setattr(KLA_MODULE, "choose_path", lambda *a, **k: routing.Route("blend_then_plain", "fa3", 1.0, ""))
    assert select_backend(cuda, torch.bfloat16, True, "auto", DIMS, return_lse=True) == ("blend_then_plain", "fa3")
    assert select_backend(cuda, torch.bfloat16, False, "auto", DIMS, return_lse=True) == ("plain", "fa3")
    routing.reset_probes()


def _route_as_on_cuda(monkeypatch):
    """Route CPU tensors the way "auto" routes CUDA tensors (the cost model on a stand-in
    sm_90 device; the chosen path then runs on the CPU tensors)."""
    real, dims = select_backend, []

    def on_cuda(device, dtype, locked, backend, d=None, **kw):
        dims.append(d)
        return real(torch.device("cuda", 0), dtype, locked, backend, d, **kw)

    monkeypatch.setattr(KLA_MODULE, "select_backend", on_cuda)
    monkeypatch.setattr(KLA_MODULE, "_cuda_arch", lambda index: 90)
    return dims


def test_empty_calls_never_reach_the_cost_model(monkeypatch):
    """B = 0 or Hq = 0 has no shape the cost model accepts (it wants sizes >= 1): the op
    returns empty outputs before routing (on CUDA "auto" this raised a ValueError)."""
    dims = _route_as_on_cuda(monkeypatch)
    op = torch.ops.kvlock_kernels.kv_lock_attention
    for B, Sq, Hq, Hkv in ((0, 5, 2, 1), (2, 0, 2, 1), (2, 5, 0, 1)):
        q = torch.randn(B, Sq, Hq, 16)
        k, v, ks, vs = (torch.randn(B, 7, Hkv, 16) for _ in range(4))
        out, lse = op(q, k, v, ks, vs, torch.rand(max(B, 1), 7), 0.25, "bshd", True, "auto")
        assert out.shape == (B, Sq, Hq, 16) and lse.shape == (B, Hq, Sq)
    assert dims == []


def test_auto_on_cuda_is_routed_inside_the_op_under_torch_compile(monkeypatch):
    """The cost model is host code Dynamo cannot trace (torch flags, device queries,
    lru caches): kv_lock_attention leaves "auto" routing to the op, which torch.compile
    treats as opaque, so fullgraph compilation of a CUDA-routed call has no graph break."""
    dims = _route_as_on_cuda(monkeypatch)
    q, k, v, ks, vs, lock = make_inputs(2, 40, 70, 2, 1, 64, torch.float32, src_batch=1)

    def step(q, k, v, ks, vs, lock):
        return kv_lock_attention(q, k, v, ks.expand(2, -1, -1, -1), vs.expand(2, -1, -1, -1), lock) * 2

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, ks, vs, lock)
    assert dims and all(d == (2, 40, 70, 2, 1, 64) for d in dims)  # routed at run time, inside the op
    ref = reference.kv_lock_attention(q, k, v, ks, vs, lock)
    torch.testing.assert_close(out, 2 * ref, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ configs
def test_configs_keyed_by_dtype_arch_and_tier():
    for arch in (80, 90):
        for tier_dim, aligned in ((64, True), (128, True), (256, True), (72, False)):
            half = configs_for(tier_dim, torch.bfloat16, arch, aligned)
            assert half == configs_for(tier_dim, "fp16", arch, aligned)
            assert bool(half) == (arch == 90 or tier_dim <= 128)  # sm_80: no head-dim-256 entry
            # fp32 has no GPU configs (every fp32 tile spilled): fp32 CUDA calls blend, then SDPA.
            assert configs_for(tier_dim, torch.float32, arch, aligned) == []
    assert configs_for(128, "bf16", 90) != configs_for(128, "bf16", 80)
    assert head_dim_tier(72, aligned=False) == "unaligned" and head_dim_tier(96) == "d128"
    assert head_dim_tier(200, aligned=False) == "d256"
    with pytest.raises(TypeError):
        configs_for(64, torch.float64)


def test_no_config_for_head_dim_256_on_sm80(monkeypatch):
    """An empty config list (here head dim > 128 on sm_80) keeps "auto" off the fused kernel
    and makes "triton" a clear error."""
    monkeypatch.setattr(KLA_MODULE, "_cuda_arch", lambda index: 80)
    cuda = torch.device("cuda")
    dims = (2, 64, 32768, 12, 12, 256)  # memory-bound: the model would pick fused if it ran
    assert select_backend(cuda, torch.bfloat16, True, "auto", dims)[0] == "blend_then_plain"
    with pytest.raises(ValueError, match="no fused-kernel config for head dim 256 on sm_80"):
        select_backend(cuda, torch.float16, True, "triton", dims)
    monkeypatch.setattr(KLA_MODULE, "_cuda_arch", lambda index: 90)
    assert select_backend(cuda, torch.bfloat16, True, "triton", dims) == ("fused", None)


def test_autotune_prune_uses_dtype_and_alignment():
    def named(dtype, head_stride):
        args = {n: 64 * 16 for n in KLA_MODULE._ROW_STRIDES}
        args["stride_qh"] = head_stride
        args["Q"] = torch.empty(0, dtype=dtype)
        return args

    configs = KLA_MODULE._kv_lock_attn_fwd_tuned.configs
    as_tuples = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
                            for c in cs}
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128, 256):
            kept = KLA_MODULE._prune_configs(configs, named(dtype, 64), HEAD_DIM=d)
            assert as_tuples(kept) == set(configs_for(d, dtype))
    kept = KLA_MODULE._prune_configs(configs, named(torch.bfloat16, 72), HEAD_DIM=72)
    assert as_tuples(kept) == set(configs_for(72, torch.bfloat16, aligned=False))


# ------------------------------------------------------------------ limits
def test_offsets_guard():
    """Block and program bases are int64 in the kernel: a batch entry of >= 2^31 elements
    is fine (meta tensors: nothing allocated).  A row stride whose 128-row tile offsets
    would overflow int32 is refused with a ValueError."""
    big = torch.empty(1, 2 ** 20, 64, 64, device="meta")  # S * H * D = 2^32
    lock = torch.empty(1, 2 ** 20, device="meta")
    KLA_MODULE.check_offsets(big, big, big, big, big, lock, big)
    bhsd = torch.empty(1, 64, 2 ** 20, 64, device="meta").transpose(1, 2)
    KLA_MODULE.check_offsets(bhsd, bhsd, bhsd, None, None, None, bhsd)
    wide = torch.empty_strided((1, 4, 1, 64), (2 ** 26, 2 ** 24, 64, 1), device="meta")
    with pytest.raises(ValueError, match="k_src has a sequence stride"):
        KLA_MODULE.check_offsets(big[:, :4], big[:, :4], big[:, :4], wide, wide, lock[:, :4], big[:, :4])


def test_launch_refuses_overflowing_strides(monkeypatch):
    q, k, v, ks, vs, lock = make_inputs(1, 4, 6, 1, 1, 16, torch.float32)
    monkeypatch.setattr(KLA_MODULE, "MAX_BLOCK", 2 ** 27)  # as if tiles had 2^27 rows
    monkeypatch.setattr(KLA_MODULE, "_launch_triton", lambda *a, **k: pytest.fail("kernel launched"))
    with pytest.raises(ValueError, match="sequence stride"):
        kv_lock_attention(q, k, v, ks, vs, lock, backend="triton")


# ------------------------------------------------------------------ torch.compile, custom op
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
    args = (torch.randn(1, 8, 2, 16), torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16),
            torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16), torch.rand(1, 9), 0.25, "bhsd", True, "torch")
    torch.library.opcheck(op, args)
    grad_args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, grad_args)


# ---------------------------------------------------------------------- bad input
def _good():
    return make_inputs(2, 8, 10, 4, 2, 16, torch.float32)


def _call(**over):
    q, k, v, ks, vs, lock = _good()
    args = dict(q=q, k=k, v=v, k_src=ks, v_src=vs, lock=lock, backend="triton")
    args.update(over)
    return kv_lock_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("k_src"),
                             args.pop("v_src"), args.pop("lock"), **args)


@pytest.mark.parametrize("over, exc, msg", [
    (dict(k=torch.randn(3, 10, 2, 16), v=torch.randn(3, 10, 2, 16)), ValueError, "batch size"),
    (dict(v=torch.randn(2, 11, 2, 16)), ValueError, "v must have k's shape"),
    (dict(k=torch.randn(2, 10, 2, 32), v=torch.randn(2, 10, 2, 32)), ValueError, "head_dim"),
    (dict(k=torch.randn(2, 10, 3, 16), v=torch.randn(2, 10, 3, 16),
          k_src=None, v_src=None), ValueError, "divisible"),
    (dict(lock=torch.full((2, 10), 1.5)), ValueError, r"lock values must be in \[0, 1\]"),
    (dict(lock=torch.full((2, 10), -0.1)), ValueError, r"lock values must be in \[0, 1\]"),
    (dict(lock=torch.full((2, 10), float("nan"))), ValueError, "NaN"),
    (dict(lock=torch.rand(2, 11)), ValueError, "lock must have shape"),
    (dict(lock=torch.rand(3, 10)), ValueError, "lock must have shape"),
    (dict(lock=torch.randint(0, 2, (2, 10))), TypeError, "lock must have dtype"),
    (dict(lock=0.5), TypeError, r"lock must be a torch.Tensor \(S,\), \(1, S\) or \(B, S\).*got float"),
    (dict(lock=[0.0] * 10), TypeError, r"lock must be a torch.Tensor \(S,\), \(1, S\) or \(B, S\).*got list"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    (dict(check_inputs=None), TypeError, "check_inputs must be a bool"),
    (dict(v_src=None), ValueError, "k_src and v_src must be given together"),
    (dict(k_src=torch.randn(2, 9, 2, 16)), ValueError, "k_src must have shape"),
    (dict(q=torch.randn(2, 8, 4, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(2, 10, 2, 16).half()), TypeError, "k must have q's dtype"),
    (dict(v=torch.randn(2, 10, 2, 16).bfloat16()), TypeError, "v must have q's dtype"),
    (dict(k_src=torch.randn(2, 10, 2, 16).half()), TypeError, "k_src must have q's dtype"),
    (dict(v_src=torch.randn(2, 10, 2, 16).bfloat16()), TypeError, "v_src must have q's dtype"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be a finite number"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be > 0"),
    (dict(softmax_scale=-0.5), ValueError, "softmax_scale must be > 0"),
    (dict(softmax_scale=torch.tensor(0.25)), TypeError, "softmax_scale must be a real number"),
    (dict(q=torch.randn(2, 8, 4, 16, device="meta")), ValueError, "one device"),
    (dict(q=torch.randn(2, 8, 4, 300), k=torch.randn(2, 10, 2, 300), v=torch.randn(2, 10, 2, 300),
          k_src=None, v_src=None), ValueError, "head_dim must be in"),
    (dict(k=torch.randn(2, 0, 2, 16), v=torch.randn(2, 0, 2, 16), k_src=None, v_src=None, lock=None),
     ValueError, "Skv=0"),
    (dict(q=torch.randn(8, 4, 16)), ValueError, "q must be 4-D"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(layout="sbhd"), ValueError, "layout"),
    (dict(layout=1), TypeError, "layout"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend=None), TypeError, "backend must be one of"),
])
def test_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


def test_bad_input_raises_before_launch(monkeypatch):
    monkeypatch.setattr(KLA_MODULE, "_launch_triton", lambda *a, **k: pytest.fail("kernel launched"))
    with pytest.raises(ValueError):
        _call(lock=torch.full((2, 10), 2.0))
    with pytest.raises(ValueError):
        _call(softmax_scale=math.nan)


def test_check_inputs_false_skips_value_check():
    q, k, v, ks, vs, _ = _good()
    # An out-of-range lock is the caller's business with check_inputs=False: it just blends.
    lock = torch.full((2, 10), 2.0)
    out = kv_lock_attention(q, k, v, ks, vs, lock, backend="torch", check_inputs=False)
    ref = reference.kv_lock_attention(q, k, v, ks, vs, lock)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_public_names():
    assert kvlock_kernels.kv_lock_attention is kv_lock_attention
    assert KLA_MODULE.KERNEL_CONFIGS is KERNEL_CONFIGS
