import pytest
import torch
from helpers import ATOL

from kvlock_kernels import kv_lock_attention, merge_attention_states, reference


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_merge_of_two_halves_is_attention_over_the_whole(backend, dtype, layout):
    B, Sq, Skv, H, D = 3, 37, 130, 2, 72
    q = torch.randn(B, Sq, H, D).to(dtype)
    k = torch.randn(B, Skv, H, D).to(dtype)
    v = torch.randn(B, Skv, H, D).to(dtype)
    ks, vs = torch.randn_like(k), torch.randn_like(v)
    lock = torch.rand(B, Skv)
    split = 57
    tr = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bhsd" else (lambda t: t)
    parts = []
    for sl in (slice(0, split), slice(split, Skv)):
        parts += list(kv_lock_attention(tr(q), tr(k[:, sl]), tr(v[:, sl]), tr(ks[:, sl]), tr(vs[:, sl]),
                                        lock[:, sl], layout=layout, return_lse=True, backend="torch"))
    out, lse = merge_attention_states(*parts, layout=layout, backend=backend)
    whole, whole_lse = reference.kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True)
    whole_same = reference.kv_lock_attention(q, k, v, ks, vs, lock, upcast=False)
    assert out.dtype == dtype and out.shape == tr(q).shape
    out_bshd = out.transpose(1, 2) if layout == "bhsd" else out
    # Two roundings of the partial outputs to the dtype, then the merge: allow 3x.
    err = (out_bshd.float() - whole).abs().max().item()
    base = (whole_same.float() - whole).abs().max().item()
    assert err <= 3 * base + ATOL[dtype], (err, base)
    # The partial lse come from the bf16 torch path (lock rounded to bf16): 2e-3 there.
    torch.testing.assert_close(lse, whole_lse, atol=1e-4 if dtype == torch.float32 else 2e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_merge_with_empty_partials(backend):
    B, S, H, D = 1, 5, 2, 16
    a = torch.randn(B, S, H, D)
    b = torch.randn(B, S, H, D)
    la = torch.randn(B, H, S)
    lb = torch.full((B, H, S), float("-inf"))
    out, lse = merge_attention_states(a, la, b, lb, backend=backend)
    torch.testing.assert_close(out, a)
    torch.testing.assert_close(lse, la)
    out, lse = merge_attention_states(a, lb, b, lb.clone(), backend=backend)  # both empty
    assert torch.equal(out, torch.zeros_like(a))
    assert torch.isneginf(lse).all()


def test_merge_kernel_matches_reference_merge():
    B, S, H, D = 2, 70, 3, 80
    a, b = torch.randn(B, S, H, D).half(), torch.randn(B, S, H, D).half()
    la, lb = torch.randn(B, H, S) * 5, torch.randn(B, H, S) * 5
    out, lse = merge_attention_states(a, la, b, lb, backend="triton")
    ref, ref_lse = reference.merge_attention_states(a, la, b, lb)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("big", [1e4, 1e6, 1e8, -1e8])
def test_large_equal_lse_stay_normalised(backend, big):
    """Issue 12 item 9: ones merged with ones at lse 1e8 gave 2.0 on the CPU path (1.0057
    at 1e6): the weights are computed relative to the larger lse, as in the kernel."""
    a = torch.ones(1, 4, 2, 16)
    lse = torch.full((1, 2, 4), big)
    out, lse_out = merge_attention_states(a, lse, a.clone(), lse.clone(), backend=backend)
    assert torch.equal(out, torch.ones_like(a))
    torch.testing.assert_close(lse_out, torch.full_like(lse, big) + torch.log(torch.tensor(2.0)), rtol=1e-7, atol=0)
    # Unequal large lse: the weights are exactly the softmax of the lse difference.
    la = torch.full((1, 2, 4), big)
    lb = la - max(1.0, abs(big) * 2.0 ** -22)  # a difference fp32 can hold at this magnitude
    b = torch.full_like(a, 3.0)
    out, _ = merge_attention_states(a, la, b, lb, backend=backend)
    wb = 1 / (1 + torch.exp((la - lb).double()))[0, 0, 0].item()
    torch.testing.assert_close(out, torch.full_like(a, (1 - wb) + 3 * wb))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rules(backend):
    """NaN or +inf lse -> NaN row (out and lse); -inf -> empty partial, not read;
    NaN in a read partial's out propagates per element."""
    B, S, H, D = 1, 6, 2, 16
    a, b = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    la, lb = torch.randn(B, H, S), torch.randn(B, H, S)
    la[0, 0, 0] = float("nan")
    lb[0, 1, 1] = float("inf")
    lb[0, 0, 2] = float("-inf")
    b[0, 2, 0] = float("nan")          # row (s=2, h=0): partial b is empty, so not read
    a[0, 3, 1, 5] = float("inf")       # row (s=3, h=1): read, propagates to that element only
    out, lse = merge_attention_states(a, la, b, lb, backend=backend)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isnan(lse[0, 0, 0])
    assert torch.isnan(out[0, 1, 1]).all() and torch.isnan(lse[0, 1, 1])
    torch.testing.assert_close(out[0, 2, 0], a[0, 2, 0])
    torch.testing.assert_close(lse[0, 0, 2], la[0, 0, 2])
    assert out[0, 3, 1, 5] == float("inf") and torch.isfinite(out[0, 3, 1, :5]).all()
    bad = torch.zeros(S, H, dtype=torch.bool)
    bad[0, 0] = bad[1, 1] = True
    assert torch.isfinite(lse[0].T[~bad]).all()
    # Both backends follow the same rule, element for element.
    other = "torch" if backend == "triton" else "triton"
    out2, lse2 = merge_attention_states(a, la, b, lb, backend=other)
    torch.testing.assert_close(out, out2, equal_nan=True)
    torch.testing.assert_close(lse, lse2, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_and_strides(backend):
    # S = 0 and B = 0: empty outputs of the right shapes.
    for shape in [(1, 0, 2, 16), (0, 5, 2, 16)]:
        a = torch.randn(shape)
        lse = torch.randn(shape[0], shape[2], shape[1])
        out, lse_out = merge_attention_states(a, lse, a.clone(), lse.clone(), backend=backend)
        assert out.shape == shape and lse_out.shape == lse.shape
    # Strided partials (a slice of a bigger buffer, a non-unit head-dim stride) and lse.
    big = torch.randn(2, 9, 3, 40)
    a, b = big[:, :, :, :16], big[:, :, :, 20:36]
    c = torch.randn(2, 9, 3, 32)[..., ::2]
    la = torch.randn(2, 9, 3).permute(0, 2, 1)
    lb = torch.randn(2, 3, 9)
    for x in (a, c):
        out, lse = merge_attention_states(x, la, b, lb, backend=backend)
        ref, ref_lse = reference.merge_attention_states(x.contiguous(), la.contiguous(), b.contiguous(), lb)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse)
        assert out.is_contiguous()


@pytest.mark.parametrize("args, exc, msg", [
    (lambda a, lse: (a, lse, a[:, :4], lse), ValueError, "out_b must have out_a's shape"),
    (lambda a, lse: (a, lse, a, lse[:, :1]), ValueError, r"lse_b must have shape \(B, H, S\)"),
    (lambda a, lse: (a, lse[..., None], a, lse), ValueError, "lse_a must be 3-D"),
    (lambda a, lse: (a[0], lse, a, lse), ValueError, "out_a must be 4-D"),
    (lambda a, lse: (a, lse.half(), a, lse), TypeError, "lse_a must have dtype in \\(float32\\)"),
    (lambda a, lse: (a, lse, a.double(), lse), TypeError, "out_b must have dtype"),
    (lambda a, lse: (a, lse, a.half(), lse), TypeError, "out_b must have out_a's dtype float32"),
    (lambda a, lse: (a, 0.0, a, lse), TypeError, "lse_a must be a torch.Tensor"),
    (lambda a, lse: (a.tolist(), lse, a, lse), TypeError, "out_a must be a torch.Tensor"),
    (lambda a, lse: (a, lse, a, lse.to("meta")), ValueError, "one device"),
])
def test_merge_bad_input(args, exc, msg):
    """Each mistake raises exactly one exception type (the policy in _validate)."""
    a, lse = torch.randn(1, 6, 2, 16), torch.randn(1, 2, 6)
    with pytest.raises(exc, match=msg):
        merge_attention_states(*args(a, lse))


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(layout="sbhd"), ValueError, "layout must be one of"),
    (dict(layout=1), TypeError, "layout must be one of"),
    (dict(backend="flash"), ValueError, "backend must be one of"),
])
def test_merge_bad_options(kwargs, exc, msg):
    a, lse = torch.randn(1, 6, 2, 16), torch.randn(1, 2, 6)
    with pytest.raises(exc, match=msg):
        merge_attention_states(a, lse, a, lse, **kwargs)


def test_merge_compiles_fullgraph():
    a, b = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    la, lb = torch.randn(1, 2, 9), torch.randn(1, 2, 9)
    fn = torch.compile(lambda *t: merge_attention_states(*t)[0] * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(a, la, b, lb), 2 * reference.merge_attention_states(a, la, b, lb)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_merge_backward_matches_the_reference(backend, layout):
    """Ring attention merges partials inside the model: training through it needs a
    backward (recomputed through the PyTorch merge), for out and lse."""
    B, S, H, D = 1, 5, 2, 8
    tr = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    leaves = [tr(torch.randn(B, S, H, D)), torch.randn(B, H, S), tr(torch.randn(B, S, H, D)), torch.randn(B, H, S)]
    go, gl = torch.randn(B, S, H, D), torch.randn(B, H, S)
    got = [t.clone().requires_grad_() for t in leaves]
    out, lse = merge_attention_states(*got, layout=layout, backend=backend)
    torch.autograd.backward([tr(out), lse], [go, gl])
    want = [t.clone().requires_grad_() for t in leaves]
    ref_out, ref_lse = reference.merge_attention_states(tr(want[0]), want[1], tr(want[2]), want[3])
    torch.autograd.backward([ref_out, ref_lse], [go, gl])
    for g, w in zip(got, want):
        assert g.grad is not None and g.grad.abs().sum() > 0
        torch.testing.assert_close(g.grad, w.grad)
