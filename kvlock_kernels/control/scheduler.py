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

import warnings
from typing import Optional

import torch

from .._utils import host_checks_allowed
from .._validate import MASK_DTYPES, check_int, check_real, check_tensor, check_values_in_range, describe
from .branch_variance import branch_variance

__all__ = ["KVLockScheduler"]

# SPEC section 5's defaults are for 50 steps: kappa 20 (40 %), window 10 (20 %).
KAPPA_FRACTION = 0.4
WINDOW_FRACTION = 0.2


def _scaled_kappa(num_steps: int) -> int:
    return round(KAPPA_FRACTION * num_steps)


def _scaled_window(num_steps: int) -> int:
    return max(2, round(WINDOW_FRACTION * num_steps))


def _first_active_step(num_steps: int, kappa: int, window: int) -> Optional[int]:
    """First step whose controls come from sigma2: it must lie in the last kappa steps
    and see ``window`` recorded steps (steps 0 .. k-1 recorded before step k)."""
    first = max(num_steps - kappa, window)
    return first if kappa > 0 and first < num_steps else None


class KVLockScheduler:
    """Per-step KV-Lock controls from the foreground x0-hat variance.

    Arguments:
        num_steps: denoising steps of the run (>= 1).
        kappa: the scheduler is active in the last kappa steps (0 <= kappa <= num_steps).
        window: W, the number of past steps whose x0-hat variance is measured (>= 2).
        tau: variance scale (> 0); sigma2 = tau gives full lock and omega0 * 1 guidance.
        omega0: base guidance scale (>= 0; Wan's default 5.0).
        b: upper bound of omega / omega0 (>= omega_lower).
        alpha_pre: alpha outside the active steps and before the window fills (1.0: full lock).
        omega_lower: lower bound of omega / omega0 (1.0: guidance never drops below omega0).
        device: where the controls and the history live (default: CUDA when available).

    The defaults (kappa 20, window 10) are SPEC's for 50 steps; ``for_steps`` scales them
    to another step count.  Step k's controls can come from sigma2 only when k is one of
    the last kappa steps and k >= window (W recorded steps exist): see
    ``first_active_step`` and ``can_activate``.

    Use per step k: ``alpha, omega = sched.controls(k)`` before the model call, then
    ``sched.update(k, x0_hat, fg_latent_mask)`` after it.  ``sched.trace`` lists
    (k, sigma2, alpha, omega) per controls() call, read from the device only then.
    """

    def __init__(self, num_steps: int, *, kappa: int = 20, window: int = 10, tau: float = 0.01,
                 omega0: float = 5.0, b: float = 2.0, alpha_pre: float = 1.0, omega_lower: float = 1.0,
                 device: Optional[torch.device | str] = None):
        num_steps = check_int("num_steps", num_steps, low=1)
        kappa = check_int("kappa", kappa, low=0)
        if kappa > num_steps:
            raise ValueError(f"kappa must be <= num_steps ({num_steps}), got {kappa} (the defaults kappa=20, "
                             f"window=10 are SPEC's for 50 steps; KVLockScheduler.for_steps({num_steps}) scales them)")
        window = check_int("window", window, low=2)
        tau = check_real("tau", tau, low=0.0, low_open=True)
        omega0 = check_real("omega0", omega0, low=0.0)
        omega_lower = check_real("omega_lower", omega_lower, low=0.0)
        b = check_real("b", b)
        if b < omega_lower:
            raise ValueError(f"b must be >= omega_lower ({omega_lower:g}): the bounds of omega / omega0 are "
                             f"[omega_lower, b], got b={b:g}, omega_lower={omega_lower:g}")
        alpha_pre = check_real("alpha_pre", alpha_pre, low=0.0, high=1.0)
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a torch.device, a string or None, got {describe(device)}")
        self.num_steps, self.kappa, self.window = num_steps, kappa, window
        self.tau, self.omega0, self.b = tau, omega0, b
        self.alpha_pre, self.omega_lower = alpha_pre, omega_lower
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device must name a torch device, got {device!r}: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device} but CUDA is not available (torch.cuda.is_available() is "
                             "False); leave device=None to use the CPU")
        if self.device.type == "cuda" and self.device.index is None:
            # CUDA tensors always carry an index: compare against the same form.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._alpha_pre_t = torch.tensor(self.alpha_pre, dtype=torch.float32, device=self.device)
        self._omega0_t = torch.tensor(self.omega0, dtype=torch.float32, device=self.device)
        self._undefined = torch.tensor(float("nan"), dtype=torch.float32, device=self.device)
        self._checked_mask = None
        self.reset()

    @classmethod
    def for_steps(cls, num_steps: int, *, kappa: Optional[int] = None, window: Optional[int] = None,
                  **kwargs) -> "KVLockScheduler":
        """A scheduler for ``num_steps`` steps with SPEC's 50-step defaults scaled.

        Unless given: ``kappa = round(0.4 * num_steps)`` (SPEC: 20 of 50, the last 40 %)
        and ``window = max(2, round(0.2 * num_steps))`` (SPEC: 10 of 50, 20 %), so 50 steps
        give exactly kappa 20 and window 10 (``round`` to the nearest int: no ties arise for
        integer step counts).  Other keyword arguments go to the constructor.

        When no step can take its controls from sigma2 (no step k in the last kappa steps
        with k >= window: e.g. fewer than 3 steps with the scaled defaults), it warns
        (``UserWarning``: alpha stays alpha_pre and omega stays omega0 for the whole run,
        and the minimum step count) and returns the scheduler anyway.  An explicit
        ``kappa=0`` asks for exactly that and does not warn.
        """
        num_steps = check_int("num_steps", num_steps, low=1)
        sched = cls(num_steps, kappa=_scaled_kappa(num_steps) if kappa is None else kappa,
                    window=_scaled_window(num_steps) if window is None else window, **kwargs)
        if not sched.can_activate and not (kappa is not None and sched.kappa == 0):
            need = cls.min_active_steps(kappa=kappa, window=window)
            warnings.warn(
                f"KVLockScheduler.for_steps({num_steps}): with kappa={sched.kappa} and window={sched.window} no step "
                f"can see {sched.window} recorded steps inside the last {sched.kappa} steps, so alpha stays "
                f"alpha_pre={sched.alpha_pre:g} and omega stays omega0={sched.omega0:g} for the whole run; "
                + (f"the schedule needs at least {need} steps with these settings "
                   "(kappa = round(0.4 * num_steps) and window = max(2, round(0.2 * num_steps)) unless given)"
                   if need is not None else "no step count makes it activate with these settings"),
                UserWarning, stacklevel=2)
        return sched

    @classmethod
    def min_active_steps(cls, *, kappa: Optional[int] = None, window: Optional[int] = None) -> Optional[int]:
        """The fewest steps for which ``for_steps(num_steps, kappa=kappa, window=window)``
        can activate (3 with the scaled defaults); None when no step count can (kappa=0).
        For an existing scheduler, see ``can_activate`` and ``first_active_step``."""
        if kappa is not None:
            kappa = check_int("kappa", kappa, low=0)
            if kappa == 0:
                return None
        if window is not None:
            window = check_int("window", window, low=2)
        # Activation needs num_steps >= kappa and num_steps > window; the scaled values
        # grow slower than num_steps, so this bound is never reached without a hit.
        bound = 2 * ((kappa or 0) + (window or 0)) + 10
        for n in range(1, bound + 1):
            k = _scaled_kappa(n) if kappa is None else kappa
            w = _scaled_window(n) if window is None else window
            if k <= n and _first_active_step(n, k, w) is not None:
                return n
        return None

    @property
    def first_active_step(self) -> Optional[int]:
        """The first step whose controls come from sigma2 (when every earlier step was
        recorded): ``max(num_steps - kappa, window)``, or None when no step can (then
        alpha stays alpha_pre and omega stays omega0 for the whole run)."""
        return _first_active_step(self.num_steps, self.kappa, self.window)

    @property
    def can_activate(self) -> bool:
        """Whether any step's controls can come from sigma2 (see ``first_active_step``)."""
        return self.first_active_step is not None

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
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"step k must be an int in [0, {self.num_steps}), got {describe(k)}")
        if not 0 <= k < self.num_steps:
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
            x0_hat: (B, C, F, H, W) x0 prediction of step k (fp16/bf16/fp32/fp64).
            fg_latent_mask: (F, H, W) or (B | 1, F, H, W) latent-resolution foreground
                mask (``masks.pixel_mask_to_latent``): bool/uint8 (nonzero = foreground,
                weight 1) or float in [0, 1] (soft: h is weighted by the mask value).
                sigma2 averages over positions where any batch entry's mask is nonzero.
                A float mask's values are checked once per mask object (one host read,
                skipped under torch.compile and CUDA-graph capture).
        """
        self._check_step(k)
        if k <= self._last_update:
            raise ValueError(f"steps must be recorded in increasing order: step {k} after step {self._last_update}")
        check_tensor("x0_hat", x0_hat, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                     ndim=5, layout="(B, C, F, H, W)")
        check_tensor("fg_latent_mask", fg_latent_mask, dtypes=MASK_DTYPES, ndim=(3, 4),
                     layout="(F, H, W) or (B | 1, F, H, W)")
        B, C, *spatial = x0_hat.shape
        m = fg_latent_mask[None] if fg_latent_mask.dim() == 3 else fg_latent_mask
        if list(m.shape[1:]) != spatial or m.shape[0] not in (1, B):
            raise ValueError(f"fg_latent_mask must be (F, H, W) or (B | 1, F, H, W) = ({B} | 1, "
                             f"{', '.join(map(str, spatial))}) to match x0_hat of shape {tuple(x0_hat.shape)}, "
                             f"got {tuple(fg_latent_mask.shape)}")
        if x0_hat.device != self.device or m.device != self.device:
            raise ValueError(f"x0_hat and fg_latent_mask must be on the scheduler's device {self.device}, "
                             f"got {x0_hat.device} and {m.device}")
        if m.is_floating_point() and host_checks_allowed():
            key = (id(fg_latent_mask), fg_latent_mask._version, fg_latent_mask.data_ptr())
            if key != self._checked_mask:
                check_values_in_range("fg_latent_mask", fg_latent_mask, low=0.0, high=1.0)
                self._checked_mask = key
        weight = m.float() if m.is_floating_point() else (m != 0).float()
        if self._history is None or tuple(self._history.shape[1:]) != (C, *spatial):
            if self._recorded:
                raise ValueError(f"x0_hat latent shape changed from {tuple(self._history.shape[1:])} "
                                 f"to {(C, *spatial)}; call reset() for a new edit")
            self._history = torch.zeros(self.window, C, *spatial, dtype=torch.float32, device=self.device)
        h = (x0_hat.float() * weight[:, None]).mean(dim=0)
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
