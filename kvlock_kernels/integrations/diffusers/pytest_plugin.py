"""Run diffusers' own test suites with KV-Lock installed.

    cd diffusers && pytest -p kvlock_kernels.integrations.diffusers.pytest_plugin tests/models/transformers

Every model of a supported class (``adapter_for``: Wan, WanVACE, CogVideoX, HunyuanVideo)
that the tests construct (directly, ``from_config`` or ``from_pretrained``) gets
``enable_kvlock`` right after its ``__init__``, with a plan provider asked before every
forward: the lock weights are derived per call from that call's video token count (test
resolutions vary), so the lock always matches the model's sequence.

Settings (environment variables):
    KVLOCK_PYTEST_MODE       "lock" (default) or "off" (KV-Lock processors installed, stock math)
    KVLOCK_PYTEST_ALPHA      the lock's alpha in [0, 1] (default 1.0; 0 must equal stock bit for bit)
    KVLOCK_PYTEST_ATTENTION  "diffusers" (default) or "fused" (the library's single-pass kernel)

In lock mode batch entry 0 of every call is the source branch (``SOURCE_INDEX``): the
other entries lock their video K/V toward it with weights ``alpha * (1 - m)`` where the
token foreground mask m is a deterministic soft ramp (m_j = j / (L - 1)).  A batch of one
runs the full lock path with the entry as its own source (output equal to stock).
"""
from __future__ import annotations

import functools
import os

import torch

from .adapters import adapters
from .install import enable_kvlock
from .plan import KVLockCall, KVLockPlan

__all__ = ["plugin_settings", "ramp_mask", "plan_for_call", "install_on_model_classes", "uninstall"]

_PATCHED: dict = {}


def plugin_settings() -> dict:
    mode = os.environ.get("KVLOCK_PYTEST_MODE", "lock")
    if mode not in ("lock", "off"):
        raise ValueError(f"KVLOCK_PYTEST_MODE must be 'lock' or 'off', got {mode!r}")
    alpha = float(os.environ.get("KVLOCK_PYTEST_ALPHA", "1.0"))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"KVLOCK_PYTEST_ALPHA must be in [0, 1], got {alpha}")
    attention = os.environ.get("KVLOCK_PYTEST_ATTENTION", "diffusers")
    if attention not in ("diffusers", "fused"):
        raise ValueError(f"KVLOCK_PYTEST_ATTENTION must be 'diffusers' or 'fused', got {attention!r}")
    return dict(mode=mode, alpha=alpha, attention=attention)


def ramp_mask(num_tokens: int, device=None) -> torch.Tensor:
    """A soft token foreground mask m_j = j / (L - 1): every lock weight from alpha to 0."""
    return torch.linspace(0.0, 1.0, num_tokens, device=device)


def plan_for_call(call: KVLockCall, *, mode: str = "lock", alpha: float = 1.0) -> KVLockPlan:
    """The plugin's plan for one model call."""
    if mode == "off":
        return KVLockPlan.off()
    return KVLockPlan.branch(ramp_mask(call.num_video_tokens, call.device), alpha, batch_size=call.batch_size,
                             check_inputs=False)


def install_on_model_classes(mode: str = "lock", alpha: float = 1.0, attention: str = "diffusers") -> None:
    """Wrap ``__init__`` of every supported class so new models get KV-Lock."""
    provider = functools.partial(plan_for_call, mode=mode, alpha=alpha)
    for adapter in adapters():
        for cls in adapter.model_classes():
            if cls in _PATCHED:
                continue
            original = cls.__init__

            # The fused kernel takes no mask: families that pass their own keep diffusers' path.
            use = "diffusers" if adapter.model_attention_mask else attention

            @functools.wraps(original)
            def __init__(self, *args, __original=original, __cls=cls, __use=use, **kwargs):
                __original(self, *args, **kwargs)
                if type(self) is __cls:  # subclasses of other families choose their own adapter
                    enable_kvlock(self, provider, attention=__use)

            _PATCHED[cls] = original
            cls.__init__ = __init__


def uninstall() -> None:
    """Restore the original ``__init__`` methods."""
    for cls, original in _PATCHED.items():
        cls.__init__ = original
    _PATCHED.clear()


def pytest_configure(config):
    install_on_model_classes(**plugin_settings())
    config.addinivalue_line("markers", "kvlock: KV-Lock is installed on every supported diffusers transformer")


def pytest_unconfigure(config):
    uninstall()


def pytest_report_header(config):
    s = plugin_settings()
    return (f"kvlock-kernels: KV-Lock installed on every supported diffusers transformer (mode={s['mode']}, "
            f"alpha={s['alpha']}, attention={s['attention']})")
