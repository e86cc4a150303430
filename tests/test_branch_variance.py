import numpy as np
import pytest
import torch

from kvlock_kernels import branch_variance, reference


def torch_formula(x, mask, correction):
    """Independent formula: torch.var over N, channel mean, masked mean by hand."""
    var_map = torch.var(x.double(), dim=0, correction=correction).mean(dim=1)
    if mask is None:
        return var_map, var_map.flatten(1).mean(1)
    sel = (mask != 0).expand_as(var_map).flatten(1).double()
    count = sel.sum(1)
    mean = (var_map.flatten(1) * sel).sum(1) / count.clamp_min(1)
    return var_map, torch.where(count > 0, mean, torch.zeros_like(mean))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("N, shape", [(2, (2, 16, 3, 10, 13)), (10, (1, 4, 5, 6, 7)), (3, (3, 2, 1100))])
@pytest.mark.parametrize("mask_kind", ["none", "per_sample", "shared"])
def test_matches_formula(backend, N, shape, mask_kind):
    x = torch.randn(N, *shape)
    B, spatial = shape[0], shape[2:]
    mask = {"none": None,
            "per_sample": torch.rand(B, *spatial) > 0.6,
            "shared": (torch.rand(1, *spatial) > 0.3).float()}[mask_kind]
    var_map, mean = branch_variance(x, mask=mask, backend=backend)
    ref_map, ref_mean = torch_formula(x, mask, 1)
    assert var_map.dtype == torch.float32 and var_map.shape == (B, *spatial) and mean.shape == (B,)
    torch.testing.assert_close(var_map.double(), ref_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("correction", [0, 1, 2])
def test_correction(correction):
    x = torch.randn(4, 2, 3, 50)
    var_map, mean = branch_variance(x, correction=correction, backend="triton")
    ref_map, ref_mean = torch_formula(x, None, correction)
    torch.testing.assert_close(var_map.double(), ref_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    x = torch.randn(5, 2, 4, 300).to(dtype)
    mask = torch.rand(2, 300) > 0.5
    var_map, mean = branch_variance(x, mask=mask, backend="triton")
    ref_map, ref_mean = torch_formula(x.float(), mask, 1)  # same rounded inputs, exact math
    torch.testing.assert_close(var_map.double(), ref_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)


def test_stable_for_large_means():
    """x0-hat values far from zero with tiny spread: a sum of squares in fp32 cancels
    catastrophically (and even goes negative); sums shifted by the first prediction
    (what the kernel accumulates) keep the variance."""
    torch.manual_seed(0)
    x = 3000.0 + 1e-2 * torch.randn(10, 2, 4, 500, dtype=torch.float64)
    var_map, _ = branch_variance(x.float(), backend="triton")
    exact = np.var(x.float().double().numpy(), axis=0, ddof=1).mean(axis=1)
    rel = (var_map.double().numpy() - exact) / exact
    assert np.abs(rel).max() < 1e-3
    naive = ((x.float() ** 2).mean(0) - x.float().mean(0) ** 2).mean(1) * 10 / 9
    assert (naive.double().numpy() - exact).__abs__().max() / exact.max() > 1.0  # the trap is real


def test_empty_mask_gives_zero_not_nan():
    x = torch.randn(2, 3, 2, 5, 5)
    mask = torch.zeros(3, 5, 5, dtype=torch.bool)
    mask[1, 2, 2] = True
    for backend in ("triton", "torch"):
        _, mean = branch_variance(x, mask=mask, backend=backend)
        assert mean[0] == 0 and mean[2] == 0 and torch.isfinite(mean).all() and mean[1] > 0


def test_deterministic_bits():
    x = torch.randn(3, 2, 4, 5000)
    mask = torch.rand(2, 5000) > 0.5
    a_map, a_mean = branch_variance(x, mask=mask, backend="triton")
    b_map, b_mean = branch_variance(x, mask=mask, backend="triton")
    assert torch.equal(a_map, b_map) and torch.equal(a_mean, b_mean)


def test_reference_matches_formula():
    x = torch.randn(3, 2, 4, 6, 7)
    mask = torch.rand(2, 6, 7) > 0.5
    ref_map, ref_mean = reference.branch_variance(x, mask=mask)
    f_map, f_mean = torch_formula(x, mask, 1)
    torch.testing.assert_close(ref_map.double(), f_map)
    torch.testing.assert_close(ref_mean.double(), f_mean)


def test_compiles_fullgraph():
    x = torch.randn(3, 2, 4, 6, 7)
    mask = torch.rand(1, 6, 7) > 0.5
    fn = torch.compile(lambda x, m: [2 * t for t in branch_variance(x, mask=m)], fullgraph=True, backend="aot_eager")
    got, want = fn(x, mask), reference.branch_variance(x, mask=mask)
    torch.testing.assert_close(got[0], 2 * want[0])
    torch.testing.assert_close(got[1], 2 * want[1])


BACKENDS = ["triton", "torch"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_the_torch_path(backend):
    """Issue 12 item 7: a NaN (or inf) in x gives NaN at its position, and a NaN masked
    mean where that position counts; the Triton kernel used to clamp it to a number."""
    x = torch.randn(3, 2, 4, 6, 5)
    x[1, 0, 2, 3, 4] = float("nan")
    x[0, 1, 0, 1, 1] = float("inf")
    x[2, 1, 3, 5, 0] = float("-inf")
    var_map, mean = branch_variance(x, backend=backend)
    bad = torch.zeros(2, 6, 5, dtype=torch.bool)
    bad[0, 3, 4] = bad[1, 1, 1] = bad[1, 5, 0] = True
    assert torch.equal(torch.isnan(var_map), bad)
    assert torch.isnan(mean).all()
    # An uncounted NaN position does not touch the masked mean; a counted one does.
    mask = ~bad
    mask[1, 1, 1] = True
    _, mean = branch_variance(x, mask=mask, backend=backend)
    assert torch.isfinite(mean[0]) and torch.isnan(mean[1])
    clean = torch.where(bad, torch.zeros(()), var_map)[0].double()
    torch.testing.assert_close(mean[0].double(), clean[mask[0]].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_one_contract(backend):
    """Issue 12 item 8: the shapes the checks accept run on both backends."""
    # No spatial dims: x (N, B, C) -> var_map (B,), masked_mean = var_map.
    x = torch.randn(2, 3, 4)
    var_map, mean = branch_variance(x, backend=backend)
    assert var_map.shape == (3,) and mean.shape == (3,)
    ref = x.double().var(dim=0).mean(dim=1)
    torch.testing.assert_close(var_map.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, var_map)
    _, mean = branch_variance(x, mask=torch.tensor([True, False, True]), backend=backend)
    assert mean[1] == 0 and mean[0] == var_map[0]
    # B = 0.
    var_map, mean = branch_variance(torch.randn(3, 0, 4, 5, 6), backend=backend)
    assert var_map.shape == (0, 5, 6) and mean.shape == (0,)
    var_map, mean = branch_variance(torch.randn(3, 0, 4, 5), mask=torch.ones(1, 5), backend=backend)
    assert var_map.shape == (0, 5) and mean.shape == (0,)
    # Empty spatial dims: nothing counted -> 0, never NaN.
    var_map, mean = branch_variance(torch.randn(3, 2, 4, 0, 7), backend=backend)
    assert var_map.shape == (2, 0, 7) and torch.equal(mean, torch.zeros(2))
    var_map, mean = branch_variance(torch.randn(3, 2, 4, 0), mask=torch.ones(2, 0), backend=backend)
    assert torch.equal(mean, torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    base = torch.randn(4, 3, 5, 12, 14)
    x = base.permute(0, 1, 2, 4, 3)[..., ::2]  # (4, 3, 5, 14, 6), no unit stride anywhere useful
    mask = (torch.rand(6, 14, 3) > 0.5).permute(2, 1, 0)  # (3, 14, 6) strided
    var_map, mean = branch_variance(x, mask=mask, backend=backend)
    ref_map, ref_mean = torch_formula(x.contiguous(), mask.contiguous(), 1)
    torch.testing.assert_close(var_map.double(), ref_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    # An expanded (batch stride 0) x and mask.
    xe = torch.randn(3, 1, 2, 9).expand(3, 4, 2, 9)
    me = (torch.rand(1, 9) > 0.3).expand(4, 9)
    var_map, mean = branch_variance(xe, mask=me, backend=backend)
    ref_map, ref_mean = torch_formula(xe.contiguous(), me.contiguous(), 1)
    torch.testing.assert_close(var_map.double(), ref_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)


def test_backends_agree_on_odd_masks():
    x = torch.randn(3, 2, 3, 7, 5)
    for mask in (torch.randint(0, 3, (2, 7, 5)), torch.rand(1, 7, 5).round().half(),
                 torch.where(torch.rand(2, 7, 5) > 0.5, float("nan"), 0.0)):
        a = branch_variance(x, mask=mask, backend="triton")
        b = branch_variance(x, mask=mask, backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(x=torch.randn(1, 2, 3, 4)), ValueError, "N >= 2"),
    (dict(x=torch.randn(2, 3)), ValueError, "x must have at least 3 dims"),
    (dict(x=torch.randn(4)), ValueError, "x must have at least 3 dims"),
    (dict(x=torch.randn(2, 2, 0, 4)), ValueError, "C >= 1"),
    (dict(x=torch.randn(2, 2, 3, 4, 5), mask=torch.ones(2, 4, 6)), ValueError, "mask must have shape"),
    (dict(x=torch.randn(2, 2, 3, 4, 5), mask=torch.ones(3, 4, 5)), ValueError, "mask must have shape"),
    (dict(x=torch.randn(2, 2, 3, 4, 5), mask=torch.ones(4, 5)), ValueError, "mask must have shape"),
    (dict(x=torch.randn(2, 2, 3, 4), correction=2), ValueError, r"correction must be an int in \[0, 1\]"),
    (dict(x=torch.randn(2, 2, 3, 4), correction=-1), ValueError, "correction must be an int in"),
    (dict(x=torch.randn(2, 2, 3, 4), correction=1.0), TypeError, "correction must be an int"),
    (dict(x=torch.randn(2, 2, 3, 4), correction=True), TypeError, "correction must be an int"),
    (dict(x=torch.randn(2, 2, 3, 4).double()), TypeError, "x must have dtype"),
    (dict(x=[[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(2, 2, 3, 4), mask=[1, 0, 1, 1]), TypeError, "mask must be a torch.Tensor"),
    (dict(x=torch.randn(2, 2, 3, 4), mask=torch.ones(2, 4, device="meta")), ValueError, "one device"),
    (dict(x=torch.randn(2, 2, 3, 4), backend="cuda"), ValueError, "backend must be one of"),
    (dict(x=torch.randn(2, 2, 3, 4), backend=None), TypeError, "backend must be one of"),
])
def test_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        branch_variance(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_the_reference(backend):
    x = torch.randn(3, 2, 4, 5)
    mask = torch.rand(2, 5) > 0.4
    got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
    gv, gm = torch.randn(2, 5), torch.randn(2)
    torch.autograd.backward(branch_variance(got, mask=mask, backend=backend), [gv, gm])
    torch.autograd.backward(reference.branch_variance(want, mask=mask), [gv, gm])
    assert got.grad.abs().sum() > 0
    torch.testing.assert_close(got.grad, want.grad)
