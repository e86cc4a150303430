import pytest
import torch

from kvlock_kernels import cfg_zero_star_scale, reference


def explicit(vc, vu, eps=1e-8):
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


def test_reference_matches_explicit():
    vc, vu = torch.randn(2, 40), torch.randn(2, 40)
    torch.testing.assert_close(reference.cfg_zero_star_scale(vc, vu).double(), explicit(vc, vu), rtol=1e-6, atol=0)


def test_zero_uncond_is_finite():
    vc, vu = torch.randn(2, 100), torch.zeros(2, 100)
    assert torch.equal(cfg_zero_star_scale(vc, vu, backend="triton"), torch.zeros(2))


def test_deterministic_bits():
    vc, vu = torch.randn(2, 50000), torch.randn(2, 50000)
    assert torch.equal(cfg_zero_star_scale(vc, vu, backend="triton"), cfg_zero_star_scale(vc, vu, backend="triton"))


@pytest.mark.parametrize("args, exc, msg", [
    ((torch.randn(2, 4), torch.randn(2, 5)), ValueError, "v_uncond must match v_cond"),
    ((torch.randn(2, 4), torch.randn(2, 4).half()), ValueError, "v_uncond must match v_cond"),
    ((torch.randn(2, 4).double(), torch.randn(2, 4).double()), TypeError, "v_cond must have dtype"),
    ((torch.randn(2, 4), torch.randn(2, 4), -1.0), ValueError, "eps must be >= 0"),
])
def test_bad_input(args, exc, msg):
    with pytest.raises(exc, match=msg):
        cfg_zero_star_scale(*args)
