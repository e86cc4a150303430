"""Main-job section for the control ops: branch_variance, cfg_zero_star_scale and
kvlock_guidance against the eager PyTorch sequences they replace."""
from __future__ import annotations

import torch

from kvlock_kernels import branch_variance, cfg_zero_star_scale, kvlock_guidance, reference

from .common import bytes_row, synced

# Wan2.1-1.3B latents at 480x832x81: 16 channels x 21 frames x 60 x 104, batch 2.
WAN_LATENT = (2, 16, 21, 60, 104)
# Interpreter-sized stand-in with the same channel count.
SMALL_LATENT = (2, 16, 3, 12, 16)


def make_control_inputs(shape, device, dtype=torch.bfloat16, window=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, F, H, W = shape

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)

    vc = rnd(*shape).to(dtype)
    vu = (0.8 * vc.float() + 0.2 * rnd(*shape)).to(dtype)
    lat = rnd(*shape).to(dtype)
    history = rnd(window, 1, C, F, H, W)  # the scheduler's fp32 window of h
    fg = torch.zeros(1, F, H, W, dtype=torch.bool, device=device)
    fg[:, :, H // 4:3 * H // 4, W // 4:3 * W // 4] = True
    omega = torch.tensor(5.5, device=device)
    sigma = torch.tensor([0.7, 0.7], device=device)
    return dict(vc=vc, vu=vu, lat=lat, history=history, fg=fg, omega=omega, sigma=sigma)


# Eager PyTorch sequences a pipeline would write without this library.
def eager_branch_variance(t):
    var_map = t["history"].var(dim=0).mean(dim=1)
    sel = t["fg"].expand_as(var_map)
    return var_map, (var_map * sel).flatten(1).sum(1) / sel.flatten(1).sum(1)


def eager_cfg_zero_star(t):
    vc, vu = t["vc"].float().flatten(1), t["vu"].float().flatten(1)
    return (vc * vu).sum(1) / ((vu * vu).sum(1) + 1e-8)


def eager_guidance(t, s):
    om = t["omega"]
    shape = (-1,) + (1,) * (t["vc"].dim() - 1)
    guided = (1 - om) * s.view(shape) * t["vu"].float() + om * t["vc"].float()
    x0 = t["lat"].float() - t["sigma"].view(shape) * guided
    return guided.to(t["vc"].dtype), x0.to(t["lat"].dtype)


def fused_calls(backend):
    """op name -> (fused call, eager call) taking the inputs dict."""
    def guidance(t):
        s = cfg_zero_star_scale(t["vc"], t["vu"], backend=backend)
        return kvlock_guidance(t["vc"], t["vu"], t["omega"], s_star=s, latents=t["lat"], sigma=t["sigma"],
                               backend=backend, check_inputs=False)

    def eager_cfg_and_guidance(t):
        return eager_guidance(t, eager_cfg_zero_star(t))

    return {
        "branch_variance (W=10 window)": (
            lambda t: branch_variance(t["history"], mask=t["fg"], backend=backend), eager_branch_variance),
        "cfg_zero_star_scale": (lambda t: cfg_zero_star_scale(t["vc"], t["vu"], backend=backend), eager_cfg_zero_star),
        "s* + kvlock_guidance + x0": (guidance, eager_cfg_and_guidance),
    }


def check_control_ops(t, backend) -> list[tuple[str, bool, str]]:
    """Each op against its reference (fp32 math; outputs compared at their dtype)."""
    rows = []
    var_map, mean = branch_variance(t["history"], mask=t["fg"], backend=backend)
    ref_map, ref_mean = reference.branch_variance(t["history"], mask=t["fg"])
    err = max((var_map - ref_map).abs().max().item(), (mean - ref_mean).abs().max().item())
    rows.append(("branch_variance", err <= 1e-4 * max(1.0, ref_map.abs().max().item()), f"max err {err:.2e}"))
    s = cfg_zero_star_scale(t["vc"], t["vu"], backend=backend)
    ref_s = reference.cfg_zero_star_scale(t["vc"], t["vu"])
    err = (s - ref_s).abs().max().item()
    rows.append(("cfg_zero_star_scale", err <= 1e-5 * ref_s.abs().max().item() + 1e-6, f"max err {err:.2e}"))
    g, x0 = kvlock_guidance(t["vc"], t["vu"], t["omega"], s_star=ref_s, latents=t["lat"], sigma=t["sigma"],
                            backend=backend)
    rg, rx0 = reference.kvlock_guidance(t["vc"], t["vu"], t["omega"], s_star=ref_s, latents=t["lat"],
                                        sigma=t["sigma"])
    # Same fp32 math and one rounding to bf16: at most one bf16 ulp apart.
    err = max((g.float() - rg.float()).abs().max().item() / rg.float().abs().max().item(),
              (x0.float() - rx0.float()).abs().max().item() / rx0.float().abs().max().item())
    rows.append(("kvlock_guidance", err <= 2 ** -8, f"max err {err:.2e} (relative to max |out|)"))
    return rows


def bytes_moved(shape, window=10, elem=2):
    """(fused, eager) bytes read + written, counting each eager op's own traffic.

    n = B*C*F*H*W latent elements of `elem` bytes; P = F*H*W positions.
    branch_variance, fused: the fp32 history once, var map out.  Eager: var over W
      (reads history, writes C*P), channel mean (reads C*P, writes P), mask multiply,
      two sums (about 4 passes over P).
    cfg_zero_star_scale, fused: v_c and v_u once.  Eager: two upcasts, two products,
      two sums, all over fp32 copies.
    s* + guidance + x0, fused: the s* pass plus one read of v_c, v_u, latents and one
      write of guided and x0.  Eager: the eager s*, then 3 upcasts, 6 fp32 binary ops and
      2 downcasts.
    """
    B, C = shape[0], shape[1]
    n = 1
    for d in shape:
        n *= d
    P = n // (B * C)
    hist = window * C * P * 4
    cfg_fused, cfg_eager = 2 * n * elem, 2 * n * (elem + 4) + 8 * n * 4
    return {
        "branch_variance (W=10 window)": (hist + P * 4 + P, hist + 2 * C * P * 4 + 4 * P * 4 + P),
        "cfg_zero_star_scale": (cfg_fused, cfg_eager),
        "s* + kvlock_guidance + x0": (cfg_fused + 3 * n * elem + 2 * n * elem,
                                      cfg_eager + 3 * n * (elem + 4) + 14 * n * 4 + 2 * n * elem),
    }


PROVIDERS = ("kvlock_triton", "kvlock_torch", "eager")


def run_control_benchmark(benchmark, op: str, provider: str):
    """One pytest-benchmark row: `op` (a key of fused_calls) by `provider` at Wan latent size."""
    import pytest

    cuda = torch.cuda.is_available()
    if provider == "kvlock_triton" and not cuda:
        pytest.skip("the Triton kernel is timed on CUDA only (the interpreter is not a timing target)")
    t = make_control_inputs(WAN_LATENT, "cuda" if cuda else "cpu")
    fused, eager = fused_calls("triton" if provider == "kvlock_triton" else "torch")[op]
    call = eager if provider == "eager" else fused
    benchmark.group = f"{op} {WAN_LATENT}"
    benchmark.pedantic(synced(call), args=(t,), rounds=3, warmup_rounds=1)


def run(device, peaks, repeats):
    """Rows for the three control ops at Wan2.1-1.3B latent size: our kernel (GPU), our
    CPU path, and the eager sequence, with the bytes model."""
    cuda = device.type == "cuda"
    t = make_control_inputs(WAN_LATENT, device)
    model = bytes_moved(WAN_LATENT)
    rows = []
    ours = fused_calls("triton" if cuda else "torch")
    for name, (fused, eager) in ours.items():
        fused_b, eager_b = model[name]
        providers = [("kvlock (Triton, fused)" if cuda else "kvlock backend=torch", fused,
                      fused_b if cuda else eager_b),
                     ("eager PyTorch", eager, eager_b)]
        if not cuda:
            providers.insert(0, ("kvlock (Triton, fused)", None, fused_b))
        eager_ms = None
        for provider, fn, nbytes in providers:
            row = dict(op=name, shape=name, provider=provider)  # the section title gives the latent shape
            if fn is None:
                rows.append(dict(row, status="unavailable: Triton needs a GPU"))
                continue
            rows.append(dict(bytes_row(row, lambda fn=fn: fn(t), nbytes, device, peaks, repeats),
                             model_ratio=eager_b / fused_b))
            if provider == "eager PyTorch":
                eager_ms = rows[-1]["median_ms"]
        for r in rows:
            if r["op"] == name and r.get("status") == "ok":
                r["vs_eager"] = eager_ms / r["median_ms"]
    return rows
