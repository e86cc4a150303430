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
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), rx0, rtol=1e-5, atol=1e-5)


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_per_sample_controls(backend):
    """Issue 12 item 6: a (B,) omega, sigma or s_star that is a strided view is read with
    its stride (the kernel used to read it as contiguous: off by 1.59)."""
    vc, vu, lat = torch.randn(2, 3, 40), torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    omega = torch.tensor([1.0, 5.0, 3.0, 7.0])[::2]
    sigma = torch.tensor([0.9, 0.1, 0.4, 0.2])[::2]
    s_star = torch.tensor([[0.5, 9.0], [1.5, 9.0]])[:, 0]
    assert omega.stride(0) == 2 and s_star.stride(0) == 2
    g, x0 = kvlock_guidance(vc, vu, omega, s_star=s_star, latents=lat, sigma=sigma, backend=backend)
    rg, rx0 = formula(vc, vu, omega.contiguous(), s_star.contiguous(), lat, sigma.contiguous())
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), rx0, rtol=1e-5, atol=1e-5)
    # An expanded (stride 0) per-sample omega equals the shared scalar.
    g2 = kvlock_guidance(vc, vu, torch.tensor(4.0).expand(2), backend=backend)
    torch.testing.assert_close(g2, kvlock_guidance(vc, vu, 4.0, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_tensors_and_edges(backend):
    """Strided v / latents, 1-D inputs, B = 0 and empty samples: one contract."""
    vc = torch.randn(2, 10, 6).transpose(1, 2)
    vu = torch.randn(2, 6, 20)[..., ::2]
    lat = torch.randn(1, 6, 10).expand(2, 6, 10)
    g, x0 = kvlock_guidance(vc, vu, 3.0, latents=lat, sigma=0.5, backend=backend)
    rg, rx0 = formula(vc, vu, 3.0, None, lat, 0.5)
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), rx0, rtol=1e-5, atol=1e-5)
    assert g.is_contiguous() and x0.is_contiguous()
    v1, u1, l1 = torch.randn(3), torch.randn(3), torch.randn(3)
    g, x0 = kvlock_guidance(v1, u1, torch.tensor([1.0, 2.0, 3.0]), latents=l1, sigma=0.2, backend=backend)
    rg, rx0 = formula(v1, u1, torch.tensor([1.0, 2.0, 3.0]), None, l1, 0.2)
    torch.testing.assert_close(g.double(), rg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0.double(), rx0, rtol=1e-6, atol=1e-6)
    for shape in [(0,), (0, 4, 5), (2, 0, 5)]:
        e = torch.randn(shape)
        g, x0 = kvlock_guidance(e, e.clone(), torch.ones(shape[0]), s_star=torch.ones(shape[0]), latents=e.clone(),
                                sigma=0.3, backend=backend)
        assert g.shape == shape and x0.shape == shape


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_propagate_as_ieee(backend):
    """No masking: a NaN/inf element makes that output element non-finite as the fp32
    formula gives it; a NaN s* makes its whole sample NaN; other samples are untouched."""
    vc, vu, lat = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    vc[0, 1] = float("nan")
    vu[0, 2] = float("inf")
    lat[0, 3] = float("-inf")
    s_star = torch.tensor([1.0, 1.0, float("nan")])
    g, x0 = kvlock_guidance(vc, vu, 5.0, s_star=s_star, latents=lat, sigma=0.5, backend=backend)
    assert torch.isnan(g[0, 1]) and g[0, 2] == float("-inf")  # (1 - 5) * inf
    assert torch.isnan(x0[0, 1]) and x0[0, 2] == float("inf") and x0[0, 3] == float("-inf")
    keep = [0, 4, 5, 6, 7]
    torch.testing.assert_close(g[0, keep].double(), formula(vc, vu, 5.0, None)[0, keep], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(g[1]).all() and torch.isnan(g[2]).all() and torch.isnan(x0[2]).all()
    # omega = 1 with an infinite v_uncond: 0 * inf is NaN, as IEEE says.
    g = kvlock_guidance(vc, vu, 1.0, backend=backend)
    assert torch.isnan(g[0, 2])
    # Both backends give the same non-finite pattern.
    other = "torch" if backend == "triton" else "triton"
    g2, x02 = kvlock_guidance(vc, vu, 5.0, s_star=s_star, latents=lat, sigma=0.5, backend=other)
    g, x0 = kvlock_guidance(vc, vu, 5.0, s_star=s_star, latents=lat, sigma=0.5, backend=backend)
    torch.testing.assert_close(g, g2, equal_nan=True, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x0, x02, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(v_uncond=torch.randn(2, 3, 4)), ValueError, "v_uncond must have v_cond's shape"),
    (dict(v_uncond=torch.randn(2, 3, 5).half()), TypeError, "v_uncond must have v_cond's dtype"),
    (dict(v_cond=[1.0, 2.0]), TypeError, "v_cond must be a torch.Tensor"),
    (dict(omega=-1.0), ValueError, "omega must be >= 0"),
    (dict(omega=float("nan")), ValueError, "omega must be a finite number"),
    (dict(omega=float("inf")), ValueError, "omega must be a finite number"),
    (dict(omega=torch.tensor([1.0, float("nan")])), ValueError, r"omega values must be >= 0 \(no NaN\)"),
    (dict(omega=torch.tensor([1.0, -2.0])), ValueError, r"omega values must be >= 0"),
    (dict(omega=torch.tensor([1.0, 2.0, 3.0])), ValueError, r"omega must have shape \(\) or \(B,\)"),
    (dict(omega=torch.tensor([1, 2])), TypeError, "omega must be a Python number or a floating-point tensor"),
    (dict(omega="5"), TypeError, "omega must be a Python number or a tensor"),
    (dict(omega=True), TypeError, "omega must be a Python number or a tensor"),
    (dict(omega=torch.ones(2, device="meta")), ValueError, "omega must be on cpu"),
    (dict(latents=torch.randn(2, 3, 5), sigma=torch.ones(3)), ValueError, r"sigma must have shape \(\) or \(B,\)"),
    (dict(latents=torch.randn(2, 3, 5), sigma=torch.ones(2, 1)), ValueError, r"sigma must have shape"),
    (dict(latents=torch.randn(2, 3, 5), sigma=-0.5), ValueError, "sigma must be >= 0"),
    (dict(latents=torch.randn(2, 3, 5), sigma=[0.5]), TypeError, "sigma must be a Python number or a tensor"),
    (dict(latents=torch.randn(2, 3, 5)), ValueError, "latents and sigma must be given together"),
    (dict(sigma=0.5), ValueError, "latents and sigma must be given together"),
    (dict(latents=torch.randn(2, 3, 6), sigma=0.5), ValueError, "latents must have v_cond's shape"),
    (dict(latents=torch.randn(2, 3, 5).double(), sigma=0.5), TypeError, "latents must have dtype"),
    (dict(latents=torch.randn(2, 3, 5).numpy(), sigma=0.5), TypeError, "latents must be a torch.Tensor"),
    (dict(s_star=torch.ones(3)), ValueError, r"s_star must have shape \(B,\)"),
    (dict(s_star=torch.ones(2, dtype=torch.int64)), TypeError, "s_star must have dtype"),
    (dict(s_star=1.0), TypeError, "s_star must be a torch.Tensor"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(check_inputs=1), TypeError, "check_inputs must be a bool"),
])
def test_bad_input(kwargs, exc, msg):
    args = dict(v_cond=torch.randn(2, 3, 5), v_uncond=torch.randn(2, 3, 5), omega=5.0, backend="triton")
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        kvlock_guidance(args.pop("v_cond"), args.pop("v_uncond"), args.pop("omega"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_the_reference(backend):
    """Gradients reach v_cond, v_uncond, latents and the tensor controls."""
    leaves = [torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6), torch.rand(2) * 5, torch.rand(2),
              torch.rand(2)]
    got = [t.clone().requires_grad_() for t in leaves]
    want = [t.clone().requires_grad_() for t in leaves]
    gg, gx = torch.randn(2, 6), torch.randn(2, 6)
    vc, vu, lat, om, s, sg = got
    torch.autograd.backward(kvlock_guidance(vc, vu, om, s_star=s, latents=lat, sigma=sg, backend=backend), [gg, gx])
    vc, vu, lat, om, s, sg = want
    torch.autograd.backward(reference.kvlock_guidance(vc, vu, om, s_star=s, latents=lat, sigma=sg), [gg, gx])
    for a, b in zip(got, want):
        assert a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad)


def test_samples_past_int32_offsets_take_the_pytorch_path(monkeypatch):
    """Offsets inside one sample are int32 in the kernels of guidance, s* and variance:
    a sample of 2**31 elements or more must not reach them (here the limit is lowered and
    the kernels are replaced by ones that fail if launched)."""
    import importlib

    from kvlock_kernels import branch_variance

    # (importlib: the package attributes of these names are the functions, not the modules)
    bv_mod, cfg_mod, g_mod = (importlib.import_module(f"kvlock_kernels.control.{m}")
                              for m in ("branch_variance", "cfg_zero_star_scale", "kvlock_guidance"))

    class _Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the Triton kernel was launched past its int32 offset limit")

    for mod, name in ((g_mod, "_guidance_kernel"), (cfg_mod, "_dot_and_norm_kernel"),
                      (bv_mod, "_branch_variance_kernel")):
        monkeypatch.setattr(mod, "_INT32_MAX", 1024 + 99)
        monkeypatch.setattr(mod, name, _Refuse())
    vc, vu, lat = torch.randn(2, 100), torch.randn(2, 100), torch.randn(2, 100)
    g, x0 = kvlock_guidance(vc, vu, 3.0, latents=lat, sigma=0.5, backend="triton")
    rg, rx0 = reference.kvlock_guidance(vc, vu, 3.0, latents=lat, sigma=0.5)
    assert torch.equal(g, rg) and torch.equal(x0, rx0)
    assert torch.equal(cfg_zero_star_scale(vc, vu, backend="triton"), reference.cfg_zero_star_scale(vc, vu))
    x = torch.randn(3, 2, 4, 100)
    assert torch.equal(branch_variance(x, backend="triton")[1], reference.branch_variance(x)[1])
    with pytest.raises(AssertionError, match="int32 offset limit"):  # below the limit the kernel runs
        kvlock_guidance(vc[:, :99], vu[:, :99], 3.0, backend="triton")
