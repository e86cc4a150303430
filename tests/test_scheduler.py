import math

import numpy as np
import pytest
import torch

from kvlock_kernels import KVLockScheduler


def spec_transcription(x0_hats, mask, num_steps, kappa=20, window=10, tau=0.01, omega0=5.0, b=2.0,
                       alpha_pre=1.0, omega_lower=1.0):
    """SPEC section 5 in plain Python/NumPy float64: the controls of each step k."""
    m = mask.numpy().astype(np.float64)  # (F, H, W)
    hs, out = [], []
    for k in range(num_steps):
        if k < num_steps - kappa or len(hs) < window:
            alpha, omega = alpha_pre, omega0
        else:
            last = np.stack(hs[-window:])                    # (W, C, F, H, W)
            var = last.var(axis=0, ddof=1)                   # per element
            fg = np.broadcast_to(m[None] != 0, var.shape)
            sigma2 = float(var[fg].mean())
            alpha = min(max(sigma2 / tau, 0.0), 1.0)
            omega = omega0 * min(max(sigma2 / tau, omega_lower), b)
        out.append((alpha, omega))
        x0 = x0_hats[k].numpy().astype(np.float64)          # (B, C, F, H, W)
        hs.append((x0 * m[None, None]).mean(axis=0))
    return out


def synthetic_x0_hats(num_steps, shape=(2, 4, 3, 6, 8), seed=0):
    """A trajectory that converges, with a burst of 'hallucination' late in sampling."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = []
    for k in range(num_steps):
        wobble = 0.3 * (1 - k / num_steps) ** 2
        if 36 <= k < 42:
            wobble = 0.25
        out.append(base + wobble * torch.randn(shape, generator=g))
    return out


def test_fifty_steps_match_spec():
    num_steps = 50
    x0_hats = synthetic_x0_hats(num_steps)
    mask = torch.zeros(3, 6, 8, dtype=torch.bool)
    mask[:, 2:5, 3:7] = True
    sched = KVLockScheduler(num_steps, device="cpu")
    got = []
    for k in range(num_steps):
        alpha, omega = sched.controls(k)
        assert alpha.dim() == 0 and omega.dim() == 0 and alpha.dtype == torch.float32
        got.append((alpha.item(), omega.item()))
        sched.update(k, x0_hats[k], mask)
    want = spec_transcription(x0_hats, mask, num_steps)
    for k, ((a, o), (wa, wo)) in enumerate(zip(got, want)):
        assert math.isclose(a, wa, rel_tol=1e-4, abs_tol=1e-6), (k, a, wa)
        assert math.isclose(o, wo, rel_tol=1e-4, abs_tol=1e-5), (k, o, wo)
    # The run exercises every regime: pre-phase, partial lock, full lock, raised guidance.
    active = got[30:]
    assert all(a == 1.0 and o == 5.0 for a, o in got[:30])
    assert any(0 < a < 1 for a, _ in active) and any(a == 1.0 for a, _ in active)
    assert any(o > 5.0 for _, o in active) and any(o == 5.0 for _, o in active)
    trace = sched.trace
    assert [t[0] for t in trace] == list(range(num_steps))
    assert math.isnan(trace[0][1]) and not math.isnan(trace[-1][1])


def test_window_not_full_uses_pre_values():
    """kappa = num_steps: active from step 0, but sigma2 is undefined until W steps exist."""
    sched = KVLockScheduler(12, kappa=12, window=4, alpha_pre=0.8, omega0=3.0, device="cpu")
    x0 = synthetic_x0_hats(12)
    mask = torch.ones(3, 6, 8)
    for k in range(12):
        alpha, omega = sched.controls(k)
        if k < 4:
            assert (alpha.item(), omega.item()) == pytest.approx((0.8, 3.0))
        sched.update(k, x0[k], mask)
    trace = sched.trace
    assert all(math.isnan(trace[k][1]) for k in range(4))  # sigma2 undefined before W steps
    assert all(math.isfinite(trace[k][1]) and trace[k][1] > 0 for k in range(4, 12))
    assert sched.first_active_step == 4 and sched.can_activate


def test_one_step_compiles_fullgraph():
    """A whole scheduler step traces without a graph break: no host sync inside."""
    sched = KVLockScheduler(30, kappa=20, window=3, device="cpu")
    x0 = synthetic_x0_hats(30)
    mask = torch.ones(3, 6, 8, dtype=torch.bool)
    for k in range(12):
        sched.controls(k)
        sched.update(k, x0[k], mask)

    def step(k, x0_hat):
        alpha, omega = sched.controls(k)
        sched.update(k, x0_hat, mask)
        return alpha, omega

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    alpha, omega = compiled(12, x0[12])
    ref = KVLockScheduler(30, kappa=20, window=3, device="cpu")
    for k in range(13):
        ra, ro = ref.controls(k)
        ref.update(k, x0[k], mask)
    assert torch.allclose(alpha, ra) and torch.allclose(omega, ro)
    assert sched._recorded == 13


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(num_steps=10, window=1, kappa=5), ValueError, "window must be an int >= 2"),
    (dict(num_steps=10, kappa=11), ValueError, "kappa must be <= num_steps"),
    # The defaults are SPEC's 50-step values: the message says how to scale them.
    (dict(num_steps=10), ValueError, r"kappa must be <= num_steps \(10\), got 20 .*for_steps\(10\)"),
    (dict(num_steps=0), ValueError, "num_steps must be an int >= 1"),
    (dict(num_steps=10.0), TypeError, "num_steps must be an int"),
    (dict(num_steps=10, kappa=5.0), TypeError, "kappa must be an int"),
    (dict(num_steps=10, kappa=True), TypeError, "kappa must be an int"),
    (dict(num_steps=10, tau=0.0, kappa=5), ValueError, "tau must be > 0"),
    (dict(num_steps=10, tau=float("nan"), kappa=5), ValueError, "tau must be a finite number"),
    (dict(num_steps=10, tau="0.01", kappa=5), TypeError, "tau must be a real number"),
    (dict(num_steps=10, alpha_pre=1.5, kappa=5), ValueError, "alpha_pre must be <= 1"),
    (dict(num_steps=10, b=0.5, kappa=5), ValueError, r"b must be >= omega_lower \(1\)"),
    (dict(num_steps=10, omega0=-1.0, kappa=5), ValueError, "omega0 must be >= 0"),
    (dict(num_steps=10, kappa=5, device=3.5), TypeError, "device must be"),
    (dict(num_steps=10, kappa=5, device="nonsense"), ValueError, "device must name a torch device"),
    pytest.param(dict(num_steps=10, kappa=5, device="cuda"), ValueError, "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_construction(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        KVLockScheduler(**{"device": "cpu", **kwargs})


def test_bad_steps_and_inputs():
    sched = KVLockScheduler(10, kappa=5, device="cpu")
    mask = torch.ones(3, 6, 8)
    x0 = torch.randn(2, 4, 3, 6, 8)
    for k in (-1, 10):
        with pytest.raises(ValueError, match=r"step k must be an int in \[0, 10\)"):
            sched.controls(k)
    for k in (2.0, None, True):
        with pytest.raises(TypeError, match=r"step k must be an int in \[0, 10\)"):
            sched.controls(k)
    sched.update(3, x0, mask)
    with pytest.raises(ValueError, match="increasing order"):
        sched.update(3, x0, mask)
    with pytest.raises(ValueError, match="fg_latent_mask must be"):
        sched.update(4, x0, torch.ones(3, 6, 9))
    with pytest.raises(ValueError, match="x0_hat must be 5-D"):
        sched.update(4, x0[0], mask)
    with pytest.raises(TypeError, match="x0_hat must be a torch.Tensor"):
        sched.update(4, x0.numpy(), mask)
    with pytest.raises(TypeError, match="x0_hat must have dtype"):
        sched.update(4, x0.long(), mask)
    with pytest.raises(TypeError, match="fg_latent_mask must be a torch.Tensor"):
        sched.update(4, x0, mask.tolist())
    with pytest.raises(TypeError, match="fg_latent_mask must have dtype"):
        sched.update(4, x0, mask.long())
    with pytest.raises(ValueError, match=r"fg_latent_mask values must be in \[0, 1\]"):
        sched.update(4, x0, mask * 255)
    with pytest.raises(ValueError, match="latent shape changed"):
        sched.update(4, torch.randn(2, 4, 3, 6, 9), torch.ones(3, 6, 9))
    assert sched._recorded == 1  # failed updates left the history untouched


def test_uint8_0_255_mask_equals_bool_mask():
    """A uint8 0/255 latent mask is binary (nonzero = foreground), not a weight of 255."""
    x0 = synthetic_x0_hats(6)
    m = torch.zeros(3, 6, 8, dtype=torch.bool)
    m[:, 1:4, 2:6] = True
    got = []
    for mask in (m, m.to(torch.uint8) * 255, m.float()):
        sched = KVLockScheduler(6, kappa=3, window=3, device="cpu")
        for k in range(6):
            sched.controls(k)
            sched.update(k, x0[k], mask)
        got.append([t[1:] for t in sched.trace[sched.first_active_step:]])  # sigma2 defined there
    assert got[0] == got[1] == got[2]
    assert len(got[0]) == 3 and all(math.isfinite(s2) and s2 > 0 for s2, _, _ in got[0])


@pytest.mark.parametrize("num_steps, kappa, window, first", [
    (50, 20, 10, 30), (51, 20, 10, 31), (30, 12, 6, 18), (10, 4, 2, 6), (5, 2, 2, 3), (4, 2, 2, 2),
    (3, 1, 2, 2), (2, 1, 2, None), (1, 0, 2, None),
])
def test_for_steps_scales_kappa_and_window(num_steps, kappa, window, first):
    """kappa = round(0.4 n), window = max(2, round(0.2 n)); 50 steps give SPEC's 20 / 10."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = KVLockScheduler.for_steps(num_steps, device="cpu")
    assert (sched.kappa, sched.window) == (kappa, window)
    assert sched.first_active_step == first and sched.can_activate == (first is not None)
    user = [w for w in caught if issubclass(w.category, UserWarning)]
    if first is None:
        assert len(user) == 1
        text = str(user[0].message)
        assert "alpha stays alpha_pre" in text and "omega stays omega0" in text and "at least 3 steps" in text
    else:
        assert not user


def test_for_steps_runs_and_activates_where_it_says():
    """The property agrees with the run: sigma2 is defined exactly from first_active_step."""
    n = 8
    sched = KVLockScheduler.for_steps(n, device="cpu", tau=0.05)
    x0 = synthetic_x0_hats(n)
    mask = torch.ones(3, 6, 8)
    for k in range(n):
        sched.controls(k)
        sched.update(k, x0[k], mask)
    defined = [k for k, s2, _, _ in sched.trace if not math.isnan(s2)]
    assert defined == list(range(sched.first_active_step, n))
    # Short runs still run (with a warning), the controls stay at the pre-window values.
    with pytest.warns(UserWarning, match="at least 3 steps"):
        short = KVLockScheduler.for_steps(1, device="cpu")
    alpha, omega = short.controls(0)
    short.update(0, x0[0], mask)
    assert (alpha.item(), omega.item()) == (1.0, 5.0)


def test_for_steps_explicit_values_and_minimum():
    sched = KVLockScheduler.for_steps(50, kappa=10, window=4, tau=0.02, omega0=3.0, device="cpu")
    assert (sched.kappa, sched.window, sched.tau, sched.omega0) == (10, 4, 0.02, 3.0)
    with pytest.warns(UserWarning, match="at least 11 steps"):
        never = KVLockScheduler.for_steps(10, window=10, device="cpu")
    assert not never.can_activate and never.first_active_step is None
    assert KVLockScheduler.min_active_steps() == 3
    assert KVLockScheduler.min_active_steps(window=10) == 11
    assert KVLockScheduler.min_active_steps(kappa=0) is None
    # kappa=0 asks for a fixed schedule: no warning.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not KVLockScheduler.for_steps(20, kappa=0, device="cpu").can_activate
    with pytest.raises(ValueError, match="kappa must be <= num_steps"):
        KVLockScheduler.for_steps(10, kappa=20, device="cpu")
    with pytest.raises(TypeError, match="num_steps must be an int"):
        KVLockScheduler.for_steps("50")
