import pytest
import torch

from kvlock_kernels import cfg_zero_star_scale, reference


def explicit(vc, vu, eps=1e-8):
    """s* per sample with torch.dot in float64."""
    out = []
    for b in range(vc.shape[0]):
        c, u = vc[b].double().flatten(), vu[b].double().flatten()
        out.append(torch.dot(c, u) / (torch.dot(u, u) + eps))
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 3, 10, 13), (3, 9000), (1, 5)])
def test_matches_explicit_dot_products(backend, dtype, shape):
    vu = torch.randn(shape).to(dtype)
    vc = (0.7 * vu.float() + 0.3 * torch.randn(shape)).to(dtype)
    s = cfg_zero_star_scale(vc, vu, backend=backend)
    assert s.shape == (shape[0],) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), explicit(vc, vu), rtol=1e-5, atol=1e-6)


def test_zero_uncond_is_finite():
    vc, vu = torch.randn(2, 100), torch.zeros(2, 100)
    assert torch.equal(cfg_zero_star_scale(vc, vu, backend="triton"), torch.zeros(2))


def test_deterministic_bits():
    vc, vu = torch.randn(2, 50000), torch.randn(2, 50000)
    assert torch.equal(cfg_zero_star_scale(vc, vu, backend="triton"), cfg_zero_star_scale(vc, vu, backend="triton"))


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges_one_contract(backend):
    """Issue 12 item 8: 1-D inputs (B one-element samples), B = 0, empty samples."""
    vc, vu = torch.randn(3), torch.randn(3)
    s = cfg_zero_star_scale(vc, vu, backend=backend)
    torch.testing.assert_close(s.double(), explicit(vc[:, None], vu[:, None]), rtol=1e-6, atol=1e-7)
    for shape in [(0,), (0, 4), (0, 3, 5)]:
        s = cfg_zero_star_scale(torch.randn(shape), torch.randn(shape), backend=backend)
        assert s.shape == (0,) and s.dtype == torch.float32
    s = cfg_zero_star_scale(torch.randn(2, 0, 3), torch.randn(2, 0, 3), backend=backend)
    assert torch.equal(s, torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    vc = torch.randn(3, 8, 10).transpose(1, 2)[:, ::3]
    vu = torch.randn(3, 10, 8)[:, ::3]
    vc_e = torch.randn(1, 40).expand(3, 40)  # batch stride 0
    s = cfg_zero_star_scale(vc, vu, backend=backend)
    torch.testing.assert_close(s.double(), explicit(vc, vu), rtol=1e-5, atol=1e-6)
    vu_r = torch.randn(3, 40)
    s = cfg_zero_star_scale(vc_e, vu_r, backend=backend)
    torch.testing.assert_close(s.double(), explicit(vc_e, vu_r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_gives_nan_for_that_sample(backend):
    """One rule: s*[b] is NaN when sample b holds a NaN or inf, finite otherwise."""
    vc, vu = torch.randn(5, 30), torch.randn(5, 30)
    vc[0, 3] = float("nan")
    vu[1, 4] = float("nan")
    vc[2, 5] = float("inf")     # dot +-inf over a finite norm: would be +-inf
    vu[3, 6] = float("-inf")    # norm inf: would be NaN or 0
    s = cfg_zero_star_scale(vc, vu, backend=backend)
    assert torch.isnan(s[:4]).all() and torch.isfinite(s[4])
    torch.testing.assert_close(s[4].double(), explicit(vc[4:], vu[4:])[0], rtol=1e-5, atol=1e-6)


def test_reference_matches_explicit():
    vc, vu = torch.randn(2, 40), torch.randn(2, 40)
    torch.testing.assert_close(reference.cfg_zero_star_scale(vc, vu).double(), explicit(vc, vu), rtol=1e-6, atol=0)


@pytest.mark.parametrize("args, kwargs, exc, msg", [
    ((torch.randn(2, 4), torch.randn(2, 5)), {}, ValueError, r"v_uncond must have v_cond's shape \(2, 4\)"),
    ((torch.randn(2, 4), torch.randn(2, 4).half()), {}, TypeError, "v_uncond must have v_cond's dtype float32"),
    ((torch.randn(2, 4).double(), torch.randn(2, 4).double()), {}, TypeError, "v_cond must have dtype"),
    ((torch.randn(()), torch.randn(())), {}, ValueError, "v_cond must have at least 1 dims"),
    ((torch.randn(2, 4), [1.0, 2.0]), {}, TypeError, "v_uncond must be a torch.Tensor"),
    ((torch.randn(2, 4), torch.randn(2, 4, device="meta")), {}, ValueError, "one device"),
    ((torch.randn(2, 4), torch.randn(2, 4), -1.0), {}, ValueError, "eps must be > 0"),
    ((torch.randn(2, 4), torch.randn(2, 4), 0.0), {}, ValueError, "eps must be > 0"),
    ((torch.randn(2, 4), torch.randn(2, 4), float("nan")), {}, ValueError, "eps must be a finite number"),
    ((torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1e-8)), {}, TypeError, "eps must be a real number"),
    ((torch.randn(2, 4), torch.randn(2, 4)), dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input(args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        cfg_zero_star_scale(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_the_reference(backend):
    leaves = [torch.randn(2, 7), torch.randn(2, 7)]
    got = [t.clone().requires_grad_() for t in leaves]
    want = [t.clone().requires_grad_() for t in leaves]
    g = torch.randn(2)
    cfg_zero_star_scale(*got, backend=backend).backward(g)
    reference.cfg_zero_star_scale(*want).backward(g)
    for a, b in zip(got, want):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad)
