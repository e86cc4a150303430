"""The KV-Lock scheduler: lock strength alpha and guidance omega per step, on the device.

SPEC section 5.  After each model call the scheduler records

    h_k = mean over the batch of (x0_hat_k * m_latent)          (foreground only)

in a ring of W device slots.  In the last ``kappa`` steps, once W values exist,

    sigma2 = mean over foreground positions of var_W(h)          (branch_variance)
    alpha  = clamp(sigma2 / tau, 0, 1)
    omega  = omega0 * clamp(sigma2 / tau, omega_lower, b)

and otherwise alpha = alpha_pre, omega = omega0.  Step k's controls come from steps
before k (its own x0-hat needs omega first).  Control flow depends only on the step
index and the number of recorded steps (host integers); every value stays a device
tensor, so a step can run under torch.compile(fullgraph=True) or a CUDA graph.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .branch_variance import branch_variance

__all__ = ["KVLockScheduler"]


def _check_number(name, value, *, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class KVLockScheduler:
    """Per-step KV-Lock controls from the foreground x0-hat variance.

    Arguments:
        num_steps: denoising steps of the run.
        kappa: the scheduler is active in the last kappa steps (0 <= kappa <= num_steps).
        window: W, the number of past steps whose x0-hat variance is measured (>= 2).
        tau: variance scale; sigma2 = tau gives full lock and omega0 * 1 guidance.
        omega0: base guidance scale (Wan's default 5.0).
        b: upper bound of omega / omega0.
        alpha_pre: alpha outside the active steps and before the window fills (1.0: full lock).
        omega_lower: lower bound of omega / omega0 (1.0: guidance never drops below omega0).
        device: where the controls and the history live (default: CUDA when available).

    Use per step k: ``alpha, omega = sched.controls(k)`` before the model call, then
    ``sched.update(k, x0_hat, fg_latent_mask)`` after it.  ``sched.trace`` lists
    (k, sigma2, alpha, omega) per controls() call, read from the device only then.
    """

    def __init__(self, num_steps: int, *, kappa: int = 20, window: int = 10, tau: float = 0.01,
                 omega0: float = 5.0, b: float = 2.0, alpha_pre: float = 1.0, omega_lower: float = 1.0,
                 device: Optional[torch.device | str] = None):
        _check_int("num_steps", num_steps, 1)
        _check_int("kappa", kappa, 0)
        if kappa > num_steps:
            raise ValueError(f"kappa must be <= num_steps ({num_steps}), got {kappa}")
        _check_int("window", window, 2)
        _check_number("tau", tau, low=0.0, low_open=True)
        _check_number("omega0", omega0, low=0.0)
        _check_number("omega_lower", omega_lower, low=0.0)
        _check_number("b", b, low=omega_lower)
        _check_number("alpha_pre", alpha_pre, low=0.0, high=1.0)
        self.num_steps, self.kappa, self.window = num_steps, kappa, window
        self.tau, self.omega0, self.b = float(tau), float(omega0), float(b)
        self.alpha_pre, self.omega_lower = float(alpha_pre), float(omega_lower)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            # CUDA tensors always carry an index: compare against the same form.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._alpha_pre_t = torch.tensor(self.alpha_pre, dtype=torch.float32, device=self.device)
        self._omega0_t = torch.tensor(self.omega0, dtype=torch.float32, device=self.device)
        self._undefined = torch.tensor(float("nan"), dtype=torch.float32, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Forget the history (a new edit with the same settings)."""
        self._history: Optional[torch.Tensor] = None  # (W, C, F, H, W) fp32 ring of h_k
        self._fg: Optional[torch.Tensor] = None  # (1, F, H, W) bool, union over the batch
        self._recorded = 0
        self._last_update = -1
        self._trace: list = []

    @property
    def active_from(self) -> int:
        """First step of the active phase."""
        return self.num_steps - self.kappa

    def _check_step(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_steps:
            raise ValueError(f"step k must be an int in [0, {self.num_steps}), got {k!r}")

    def controls(self, k: int):
        """(alpha, omega) for step k: 0-dim fp32 device tensors."""
        self._check_step(k)
        if k < self.active_from or self._recorded < self.window:
            sigma2, alpha, omega = self._undefined, self._alpha_pre_t, self._omega0_t
        else:
            # The ring holds exactly the last W steps; variance ignores their order.
            _, sigma2 = branch_variance(self._history[:, None], mask=self._fg, correction=1)
            sigma2 = sigma2[0]
            ratio = sigma2 / self.tau
            alpha = ratio.clamp(0.0, 1.0)
            omega = self.omega0 * ratio.clamp(self.omega_lower, self.b)
        self._trace.append((k, sigma2, alpha, omega))
        return alpha, omega

    def update(self, k: int, x0_hat: torch.Tensor, fg_latent_mask: torch.Tensor) -> None:
        """Record step k's predicted clean latent.

        Arguments:
            x0_hat: (B, C, F, H, W) x0 prediction of step k (any float dtype).
            fg_latent_mask: (F, H, W) or (B | 1, F, H, W) latent-resolution foreground
                mask (bool/uint8/float; see ``masks.pixel_mask_to_latent``).
        """
        self._check_step(k)
        if k <= self._last_update:
            raise ValueError(f"steps must be recorded in increasing order: step {k} after step {self._last_update}")
        if not isinstance(x0_hat, torch.Tensor) or x0_hat.dim() != 5 or not x0_hat.is_floating_point():
            raise ValueError("x0_hat must be a floating-point (B, C, F, H, W) tensor, got "
                             f"{tuple(x0_hat.shape) if isinstance(x0_hat, torch.Tensor) else type(x0_hat).__name__}")
        if not isinstance(fg_latent_mask, torch.Tensor):
            raise TypeError(f"fg_latent_mask must be a torch.Tensor, got {type(fg_latent_mask).__name__}")
        B, C, *spatial = x0_hat.shape
        m = fg_latent_mask[None] if fg_latent_mask.dim() == 3 else fg_latent_mask
        if m.dim() != 4 or list(m.shape[1:]) != spatial or m.shape[0] not in (1, B):
            raise ValueError(f"fg_latent_mask must be (F, H, W) or (B | 1, F, H, W) = ({B} | 1, "
                             f"{', '.join(map(str, spatial))}), got {tuple(fg_latent_mask.shape)}")
        if x0_hat.device != self.device or m.device != self.device:
            raise ValueError(f"x0_hat and fg_latent_mask must be on the scheduler's device {self.device}, "
                             f"got {x0_hat.device} and {m.device}")
        if self._history is None or tuple(self._history.shape[1:]) != (C, *spatial):
            if self._recorded:
                raise ValueError(f"x0_hat latent shape changed from {tuple(self._history.shape[1:])} "
                                 f"to {(C, *spatial)}; call reset() for a new edit")
            self._history = torch.zeros(self.window, C, *spatial, dtype=torch.float32, device=self.device)
        h = (x0_hat.float() * m[:, None].float()).mean(dim=0)
        self._history[self._recorded % self.window].copy_(h)
        self._fg = (m != 0).any(dim=0, keepdim=True)
        self._recorded += 1
        self._last_update = k

    @property
    def trace(self):
        """[(k, sigma2, alpha, omega), ...] as Python floats (sigma2 NaN where undefined).
        Reading it synchronises with the device once."""
        if not self._trace:
            return []
        values = torch.stack([torch.stack([s, a, o]) for _, s, a, o in self._trace]).tolist()
        return [(k, *v) for (k, *_), v in zip(self._trace, values)]
