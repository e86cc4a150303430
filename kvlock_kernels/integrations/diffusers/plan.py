"""The per-step KV-Lock plan: what every patched self-attention layer does in one call.

A plan is immutable.  The editor (or whoever drives the model: a user loop, the pytest
plugin's per-call plan provider) builds one per step and hands it to the transformer with
``set_plan``; the processors only read it.  Nothing else writes their state.

    mode      "off"      stock attention (the processors' math equals the stock processors')
              "capture"  stock attention; each layer stores the source entry's video K/V
                         (after norm and RoPE) in ``cache`` under (step, layer)
              "lock"     K/V of the video tokens are locked toward the source:
                         K' = K + w (K_src - K), same for V, w = the lock weights
    lock      (1, L) fp32 lock weights over the model's L video tokens, (t, h, w) order,
              computed once per plan on the device (``alpha * (1 - m)`` for a token
              foreground mask m, which may be soft); text tokens of joint-attention models
              are never locked (the processors give them weight 0)
    source    "branch"   batch entry ``SOURCE_INDEX`` of every call is the source branch
                         (read in place; it is not locked itself); ``batch_size`` declares
                         the batch the caller built, and a call with another batch size is
                         refused (a stock pipeline's [uncond, cond] batch has no source)
              "cache"    source K/V come from ``cache`` under (step, layer), captured by an
                         earlier pass (an inversion)
    step      the cache key's first half

``SOURCE_INDEX`` is the one definition of where the source branch sits in the batch; the
editor builds its batch from it and the processors read it from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..._validate import check_bool, check_int, check_tensor, check_values_in_range, describe
from ...control.masks import lock_weights

__all__ = ["SOURCE_INDEX", "MODES", "SOURCES", "KVLockPlan", "KVLockCall", "PlanLike"]

# The source branch's batch entry in "branch" mode: the editor puts the source there and
# the processors read it there.  Defined once.
SOURCE_INDEX = 0

MODES = ("off", "capture", "lock")
SOURCES = ("branch", "cache")


@dataclass(frozen=True)
class KVLockCall:
    """What a per-call plan provider is told about the model call it plans for.

    batch_size: the call's batch; grid: (T, H, W) video token grid of the call;
    num_video_tokens: T * H * W; device: the call's device.
    """

    batch_size: int
    grid: tuple
    num_video_tokens: int
    device: torch.device


def _check_cache(cache):
    from ...cache.ring_buffer import KVRingBuffer

    if not isinstance(cache, KVRingBuffer):
        raise TypeError(f"cache must be a kvlock_kernels.KVRingBuffer, got {describe(cache)}")
    if cache.compact:
        raise ValueError("cache must store full (k, v) entries (KV-Lock captures and reads every video token): "
                         "use a KVRingBuffer without compact=True")


@dataclass(frozen=True, eq=False)
class KVLockPlan:
    """One step's instructions for every KV-Lock processor of a transformer (see the
    module docstring).  Build plans with the class methods; the constructor checks
    types and shapes only (no device reads)."""

    mode: str = "off"
    lock: Optional[torch.Tensor] = None
    source: str = "branch"
    batch_size: Optional[int] = None
    cache: Optional[object] = None
    step: int = 0
    discard_after_use: bool = False

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.source, str) or self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        check_int("step", self.step, low=0)
        check_bool("discard_after_use", self.discard_after_use)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, low=1)
        if self.cache is not None:
            _check_cache(self.cache)
        if self.mode == "capture" and self.cache is None:
            raise ValueError("mode='capture' needs a KVRingBuffer in cache (it stores the source entry's K/V)")
        if self.mode != "lock":
            return
        if self.lock is None:
            raise ValueError("mode='lock' needs lock weights: build the plan with KVLockPlan.branch or "
                             "KVLockPlan.cached from a token foreground mask")
        lock = check_tensor("lock", self.lock, dtypes=(torch.float32,), ndim=(1, 2),
                            layout="(L,) or (1, L) fp32 lock weights over the video tokens")
        if lock.dim() == 2 and lock.shape[0] != 1:
            raise ValueError(f"lock must be (L,) or (1, L) (one weight per video token, shared by the batch), "
                             f"got shape {tuple(lock.shape)}")
        object.__setattr__(self, "lock", lock.reshape(1, -1))
        if self.source == "branch":
            if self.batch_size is None:
                raise ValueError(
                    "source='branch' needs batch_size: batch entry SOURCE_INDEX=0 of every call must be the source "
                    "branch the caller put there, and batch_size says which batch that is (a stock pipeline's "
                    "[uncond, cond] batch has no source branch)")
        elif self.cache is None:
            raise ValueError("source='cache' needs a KVRingBuffer in cache holding the captured source K/V")

    # ------------------------------------------------------------------ builders
    @classmethod
    def off(cls) -> "KVLockPlan":
        """Stock attention."""
        return cls()

    @classmethod
    def capture(cls, cache, step: int) -> "KVLockPlan":
        """Stock attention, and every layer stores the source entry's video K/V (batch
        entry SOURCE_INDEX) in ``cache`` under (step, layer)."""
        return cls(mode="capture", cache=cache, step=step)

    @classmethod
    def branch(cls, token_mask: torch.Tensor, alpha=1.0, *, batch_size: int, check_inputs: bool = True
               ) -> "KVLockPlan":
        """Lock toward the in-batch source branch (batch entry SOURCE_INDEX).

        Arguments:
            token_mask: (L,) foreground mask over the video tokens ((t, h, w) order, see
                ``masks.latent_mask_to_tokens``); bool/uint8 (nonzero = foreground) or float
                in [0, 1]: soft values give partial locks ``alpha * (1 - m)``.
            alpha: the fusion ratio in [0, 1], a Python number or a 0-dim tensor on the
                mask's device (the scheduler's alpha: stays on the device).
            batch_size: the batch of every call this plan serves (source + targets).
            check_inputs: read a float mask / tensor alpha once to check their range
                (a host sync; pass False in a per-step loop after checking once).
        """
        return cls(mode="lock", lock=_weights(token_mask, alpha, check_inputs), source="branch",
                   batch_size=batch_size)

    @classmethod
    def cached(cls, token_mask: torch.Tensor, alpha=1.0, *, cache, step: int, discard_after_use: bool = False,
               check_inputs: bool = True) -> "KVLockPlan":
        """Lock toward source K/V captured in ``cache`` under (step, layer);
        ``discard_after_use`` frees each entry once its layer has read it."""
        return cls(mode="lock", lock=_weights(token_mask, alpha, check_inputs), source="cache", cache=cache,
                   step=step, discard_after_use=discard_after_use)

    @classmethod
    def from_weights(cls, lock: torch.Tensor, *, source: str = "branch", batch_size: Optional[int] = None,
                     cache=None, step: int = 0, discard_after_use: bool = False, check_inputs: bool = True
                     ) -> "KVLockPlan":
        """A lock plan from ready lock weights (L,) or (1, L) in [0, 1] (any float or bool
        dtype; converted to fp32)."""
        check_tensor("lock", lock, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool),
                     ndim=(1, 2), layout="(L,) or (1, L)")
        check_values_in_range("lock", lock, low=0.0, high=1.0, check_values=check_inputs)
        return cls(mode="lock", lock=lock.to(torch.float32), source=source, batch_size=batch_size, cache=cache,
                   step=step, discard_after_use=discard_after_use)

    # ------------------------------------------------------------------ helpers
    @property
    def num_tokens(self) -> Optional[int]:
        """L, the number of video tokens the lock weights cover (None without a lock)."""
        return None if self.lock is None else self.lock.shape[-1]

    @property
    def uses_cache(self) -> bool:
        """The plan writes (capture) or reads (cache source) the host-side ring buffer."""
        return self.mode == "capture" or (self.mode == "lock" and self.source == "cache")

    def check_batch(self, batch: int, where: str = "this call") -> None:
        """ValueError unless a branch-source lock plan serves a batch of ``batch``."""
        if self.mode == "lock" and self.source == "branch" and batch != self.batch_size:
            raise ValueError(
                f"KV-Lock plan locks toward the source branch at batch entry {SOURCE_INDEX} of a batch of "
                f"{self.batch_size}, but {where}'s batch is {batch}: it was not built with a source branch there "
                "(a stock pipeline's batch is [uncond, cond] or a single branch). Use KVLockEditor, a plan built "
                "for this batch (a plan provider gets each call's batch), or KVLockPlan.cached with captured source "
                "K/V")

    def replace(self, **changes) -> "KVLockPlan":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def _weights(token_mask, alpha, check_inputs) -> torch.Tensor:
    """``lock_weights`` (which checks check_inputs, the mask's values and alpha) of a (L,)
    token mask."""
    if not isinstance(token_mask, torch.Tensor):
        raise TypeError(f"token_mask must be a torch.Tensor (L,) (e.g. torch.from_numpy(mask)), "
                        f"got {describe(token_mask)}")
    if token_mask.dim() != 1:
        raise ValueError(f"token_mask must be (L,): one value per video token, got shape {tuple(token_mask.shape)} "
                         "(a latent (F, H, W) mask becomes one with masks.latent_mask_to_tokens(mask, patch) and "
                         "the patch of adapter_for(transformer).patch_size(transformer))")
    return lock_weights(token_mask, alpha, check_inputs=check_inputs)


# What enable_kvlock / set_plan accept: a plan, or a provider building one per model call.
PlanLike = Union[KVLockPlan, Callable[[KVLockCall], KVLockPlan]]
