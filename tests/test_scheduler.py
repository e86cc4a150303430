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
    assert sched.trace[4][1] == sched.trace[4][1]  # sigma2 defined from step 4 (not NaN)
    assert math.isnan(sched.trace[3][1])


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


@pytest.mark.parametrize("kwargs, msg", [
    (dict(num_steps=10, window=1, kappa=5), "window must be an int >= 2"),
    (dict(num_steps=10, kappa=11), "kappa must be <= num_steps"),
    (dict(num_steps=0), "num_steps must be an int >= 1"),
    (dict(num_steps=10, tau=0.0, kappa=5), "tau must be >"),
    (dict(num_steps=10, alpha_pre=1.5, kappa=5), "alpha_pre must be <= 1"),
    (dict(num_steps=10, b=0.5, kappa=5), "b must be >= 1.0"),
])
def test_bad_construction(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        KVLockScheduler(**{"device": "cpu", **kwargs})


def test_bad_steps_and_inputs():
    sched = KVLockScheduler(10, kappa=5, device="cpu")
    mask = torch.ones(3, 6, 8)
    x0 = torch.randn(2, 4, 3, 6, 8)
    for k in (-1, 10, 2.0):
        with pytest.raises(ValueError, match=r"step k must be an int in \[0, 10\)"):
            sched.controls(k)
    sched.update(3, x0, mask)
    with pytest.raises(ValueError, match="increasing order"):
        sched.update(3, x0, mask)
    with pytest.raises(ValueError, match="fg_latent_mask must be"):
        sched.update(4, x0, torch.ones(3, 6, 9))
    with pytest.raises(ValueError, match="x0_hat must be"):
        sched.update(4, x0[0], mask)
    with pytest.raises(ValueError, match="latent shape changed"):
        sched.update(4, torch.randn(2, 4, 3, 6, 9), torch.ones(3, 6, 9))
    assert sched._recorded == 1  # failed updates left the history untouched
