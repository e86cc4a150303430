import pytest
import torch
from helpers import ATOL

from kvlock_kernels import cfg_zero_star_scale, kvlock_guidance, reference

SHAPE = (2, 16, 3, 10, 13)


def formula(vc, vu, omega, s, lat=None, sigma=None):
    """SPEC section 6, written per sample in float64."""
    B = vc.shape[0]
    om = torch.as_tensor(omega, dtype=torch.float64).expand(B)
    ss = torch.ones(B, dtype=torch.float64) if s is None else s.double()
    g = torch.stack([(1 - om[b]) * ss[b] * vu[b].double() + om[b] * vc[b].double() for b in range(B)])
    if lat is None:
        return g
    sg = torch.as_tensor(sigma, dtype=torch.float64).expand(B)
    return g, torch.stack([lat[b].double() - sg[b] * g[b] for b in range(B)])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("omega", [5.0, "scalar_tensor", "per_sample"])
@pytest.mark.parametrize("with_s", [False, True])
def test_guidance_and_x0(backend, omega, with_s):
    vc, vu, lat = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    omega = {"scalar_tensor": torch.tensor(4.5), "per_sample": torch.tensor([3.0, 7.5])}.get(omega, omega)
    s = cfg_zero_star_scale(vc, vu) if with_s else None
    sigma = torch.tensor([0.9, 0.3])
    g, x0 = kvlock_guidance(vc, vu, omega, s_star=s, latents=lat, sigma=sigma, backend=backend)
    ref_g, ref_x0 = formula(vc, vu, omega, s, lat, sigma)
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), ref_x0, rtol=1e-5, atol=1e-5)


def test_classic_cfg_when_s_is_none():
    vc, vu = torch.randn(SHAPE), torch.randn(SHAPE)
    g = kvlock_guidance(vc, vu, 5.0, backend="triton")
    torch.testing.assert_close(g, vu + 5.0 * (vc - vu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_round_once(dtype):
    vc, vu, lat = (torch.randn(SHAPE).to(dtype) for _ in range(3))
    g, x0 = kvlock_guidance(vc, vu, 5.0, latents=lat, sigma=0.5, backend="triton")
    ref_g, ref_x0 = reference.kvlock_guidance(vc, vu, 5.0, latents=lat, sigma=0.5)
    assert g.dtype == dtype and x0.dtype == dtype
    # Same fp32 math, one rounding: equal up to one ulp of the output.
    torch.testing.assert_close(g, ref_g, rtol=0, atol=ATOL[dtype] * 16)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert (g.float() - ref_g.float()).abs().max() <= ref_g.float().abs().max() * ulp
    assert (x0.float() - ref_x0.float()).abs().max() <= ref_x0.float().abs().max() * ulp


def test_reference_matches_formula():
    vc, vu, lat = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    s = torch.tensor([0.5, 1.5])
    g, x0 = reference.kvlock_guidance(vc, vu, torch.tensor([2.0, 3.0]), s_star=s, latents=lat, sigma=0.25)
    rg, rx0 = formula(vc, vu, torch.tensor([2.0, 3.0]), s, lat, 0.25)
    torch.testing.assert_close(g.double(), rg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0.double(), rx0, rtol=1e-6, atol=1e-6)


def test_compiles_fullgraph_with_device_omega():
    vc, vu, lat = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)

    def step(vc, vu, lat, omega):
        s = cfg_zero_star_scale(vc, vu)
        return kvlock_guidance(vc, vu, omega, s_star=s, latents=lat, sigma=0.5)

    g, x0 = torch.compile(step, fullgraph=True, backend="aot_eager")(vc, vu, lat, torch.tensor(6.0))
    rg, rx0 = formula(vc, vu, 6.0, cfg_zero_star_scale(vc, vu), lat, 0.5)
    torch.testing.assert_close(x0.double(), rx0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(v_uncond=torch.randn(2, 3, 4)), ValueError, "v_uncond must match v_cond"),
    (dict(v_uncond=torch.randn(2, 3, 5).half()), ValueError, "v_uncond must match v_cond"),
    (dict(omega=-1.0), ValueError, "omega must be a non-negative"),
    (dict(omega=float("nan")), ValueError, "omega must be a non-negative"),
    (dict(omega=torch.tensor([1.0, float("nan")])), ValueError, "omega must be non-negative and not NaN"),
    (dict(omega=torch.tensor([1.0, 2.0, 3.0])), ValueError, r"omega must have shape \(\) or \(B,\)"),
    (dict(omega="5"), TypeError, "omega must be a float or a tensor"),
    (dict(latents=torch.randn(2, 3, 5), sigma=torch.ones(3)), ValueError, r"sigma must have shape \(\) or \(B,\)"),
    (dict(latents=torch.randn(2, 3, 5), sigma=torch.ones(2, 1)), ValueError, r"sigma must have shape"),
    (dict(latents=torch.randn(2, 3, 5)), ValueError, "latents and sigma must be given together"),
    (dict(latents=torch.randn(2, 3, 6), sigma=0.5), ValueError, "latents must have v_cond's shape"),
    (dict(s_star=torch.ones(3)), ValueError, r"s_star must have shape \(B,\)"),
])
def test_bad_input(kwargs, exc, msg):
    args = dict(v_cond=torch.randn(2, 3, 5), v_uncond=torch.randn(2, 3, 5), omega=5.0)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        kvlock_guidance(args.pop("v_cond"), args.pop("v_uncond"), args.pop("omega"), backend="triton", **args)
