"""Installing KV-Lock on a diffusers transformer: ``enable_kvlock``, ``set_plan``,
``disable_kvlock``.

``enable_kvlock`` puts a KV-Lock processor on every self-attention module the model's
adapter names (taking over the module's attention backend and parallel config) and a
forward pre-hook on the transformer that, before any block runs:
- checks the KV-Lock processors are still in place.  One replaced by the family's stock
  processor (``fuse_qkv_projections`` on CogVideoX does that, and so does a user's
  ``set_attn_processor`` with a stock processor) is re-installed on top of it, with a
  warning, and the new one is what ``disable_kvlock`` restores; one replaced by any other
  processor is an error while a plan is active (never a silent no-op);
- asks a plan provider (if one was given) for this call's plan;
- checks the plan against the call: the lock weights cover the model's video tokens at
  this resolution, the batch is the plan's (branch mode), and the context-parallel config
  is one KV-Lock serves.

``disable_kvlock`` puts back, on each module that still holds its KV-Lock processor, the
processor it replaced; a processor the user set since is left alone.  Backend and parallel
settings made while KV-Lock was on are carried over to the restored processors.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from typing import Optional

import torch

from ..._validate import check_choice, describe
from .adapters import adapter_for
from .parallel import check_servable, cp_config
from .plan import KVLockCall, KVLockPlan, PlanLike
from .processors import KVLockProcessor

__all__ = ["enable_kvlock", "disable_kvlock", "set_plan", "get_plan", "is_kvlock_enabled", "installed",
           "check_attention", "ATTENTION_PATHS"]

ATTENTION_PATHS = ("diffusers", "fused")
_INSTALL_ATTR = "_kvlock_install"


class _Install:
    """Per-transformer state of KV-Lock: written by enable_kvlock / set_plan / the
    pre-hook (plan providers), read by the processors."""

    def __init__(self, adapter, modules, attention, kernel_backend, epilogue_backend):
        self.adapter = adapter
        self.modules = modules  # [(name, attention module)]
        self.attention = attention
        self.kernel_backend = kernel_backend
        self.epilogue_backend = epilogue_backend
        self.plan = KVLockPlan.off()
        self.provider = None
        self.processors: list = []
        self.heads = 0
        self.dispatch_module = _ModuleRef(None)


class _PreForward:
    """The transformer's forward pre-hook (a callable object: deep copies of the model
    get their own)."""

    def __init__(self, install: _Install):
        self.install = install

    def __call__(self, module, args, kwargs):
        install = self.install
        hidden_states = install.adapter.hidden_states_of(args, kwargs)
        if install.provider is not None:
            grid = install.adapter.video_grid(module, hidden_states)
            call = KVLockCall(batch_size=int(hidden_states.shape[0]), grid=grid, num_video_tokens=math.prod(grid),
                              device=hidden_states.device)
            plan = install.provider(call)
            if not isinstance(plan, KVLockPlan):
                raise TypeError(f"the KV-Lock plan provider must return a KVLockPlan, got {describe(plan)}")
            install.plan = plan
        # After the provider: a replaced processor is refused under the plan of THIS call.
        _check_processors(install)
        _check_call(module, install, hidden_states)
        return None


def _unwrap(transformer):
    """The model behind a ``torch.compile`` wrapper (OptimizedModule)."""
    return getattr(transformer, "_orig_mod", transformer)


def _get(transformer) -> Optional[_Install]:
    return getattr(_unwrap(transformer), "__dict__", {}).get(_INSTALL_ATTR)


def is_kvlock_enabled(transformer) -> bool:
    return _get(transformer) is not None


def _new_processor(install: _Install, layer: int, replaced):
    return install.adapter.processor_cls(install, layer, replaced=replaced)


def _check_processors(install: _Install) -> None:
    stock = None
    for i, (name, attn) in enumerate(install.modules):
        current = attn.processor
        if current is install.processors[i]:
            continue
        if isinstance(current, KVLockProcessor) and current._install is install:
            install.processors[i] = current  # ours again (e.g. unfuse_qkv_projections put it back)
            continue
        stock = install.adapter.stock_processor_classes() if stock is None else stock
        if isinstance(current, stock):
            warnings.warn(f"KV-Lock processor of {name} was replaced by {type(current).__name__} (e.g. by "
                          "fuse_qkv_projections or set_attn_processor); KV-Lock re-installs itself on top of it "
                          "(disable_kvlock restores it)", UserWarning, stacklevel=4)
            attn.processor = install.processors[i] = _new_processor(install, i, current)
            continue
        if install.plan.mode != "off":
            raise RuntimeError(
                f"KV-Lock's processor on {name} was replaced by {type(current).__name__} after enable_kvlock, so "
                f"this layer would silently run without KV-Lock (plan mode {install.plan.mode!r}). Call "
                "enable_kvlock again to install KV-Lock over it, or disable_kvlock first")


def _check_call(transformer, install: _Install, hidden_states) -> None:
    plan = install.plan
    if plan.mode == "off":
        return
    adapter = install.adapter
    first = install.processors[0] if install.processors else None
    check_servable(cp_config(first), family=adapter.family, supports_cp=adapter.supports_context_parallel,
                   attention=install.attention, processor_backend=getattr(first, "_attention_backend", None),
                   heads=install.heads)
    if plan.uses_cache and torch.compiler.is_compiling():
        raise RuntimeError(
            "KV-Lock's capture and cache modes write / read the host-side KVRingBuffer, which torch.compile cannot "
            "put in a graph: compile without fullgraph=True (the ring-buffer calls then run eagerly between "
            "graphs), or lock toward an in-batch source branch (KVLockPlan.branch, KVLockEditor(source='branch'))")
    if plan.mode == "capture":
        return
    if plan.source == "cache":
        missing = [layer for layer in range(len(install.modules)) if (plan.step, layer) not in plan.cache]
        if missing:
            raise ValueError(f"KV-Lock plan reads the source K/V of step {plan.step} from its cache, but layers "
                             f"{missing} of this step were never captured there (or were discarded / evicted "
                             "without host_spill): capture them first with KVLockPlan.capture(cache, step)")
    tokens = adapter.num_video_tokens(transformer, hidden_states)
    if plan.num_tokens != tokens:
        grid = adapter.video_grid(transformer, hidden_states)
        raise ValueError(
            f"KV-Lock lock weights cover {plan.num_tokens} video tokens but this {adapter.family} call has {tokens} "
            f"(token grid (T, H, W) = {grid} for latents {tuple(adapter.latent_dims(hidden_states))} and patch "
            f"{adapter.patch_size(transformer)}): build the token mask at the model's latent size "
            "(masks.latent_mask_to_tokens with the transformer's patch size)")
    plan.check_batch(int(hidden_states.shape[0]))


class _ModuleRef:
    """A module reference that deep copies of the model share (modules cannot be copied)."""

    def __init__(self, module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


def _dispatch_module(adapter) -> _ModuleRef:
    """The module whose ``dispatch_attention_fn`` the family's stock processor calls."""
    return _ModuleRef(None if adapter.dispatch_module is None else importlib.import_module(adapter.dispatch_module))


def check_attention(adapter, attention) -> None:
    """``attention`` is one of ATTENTION_PATHS and serves the adapter's family."""
    check_choice("attention", attention, ATTENTION_PATHS)
    if attention == "fused" and adapter.model_attention_mask:
        raise ValueError(f"{adapter.family} passes its own attention mask (text padding) to every locked layer and "
                         "the fused kernel takes no mask: use attention='diffusers'")


def _check_plan_like(plan) -> None:
    if not isinstance(plan, KVLockPlan) and not callable(plan):
        raise TypeError(f"plan must be a KVLockPlan or a callable returning one, got {describe(plan)}")


def enable_kvlock(transformer, plan: Optional[PlanLike] = None, *, attention: str = "diffusers",
                  kernel_backend: str = "auto", epilogue_backend: str = "auto") -> None:
    """Install KV-Lock processors on every self-attention module of ``transformer``.

    Arguments:
        transformer: a supported diffusers video transformer (``adapter_for``).
        plan: the first ``KVLockPlan`` (default: off), or a plan provider: a callable
            ``provider(call: KVLockCall) -> KVLockPlan`` asked before every forward
            (e.g. a lock whose token mask depends on the call's resolution).
        attention: "diffusers" (default): lock in the fused epilogue, then diffusers'
            ``dispatch_attention_fn`` with the module's backend and parallel config;
            "fused": the library's single-pass kernel ``kv_lock_attention``.
        kernel_backend: ``kv_lock_attention``'s backend with attention="fused".
        epilogue_backend: the epilogue's backend ("auto": the PyTorch path on CPU, the
            Triton kernel on CUDA; "torch"; "triton").
    Calling it again re-installs with the new options (and plan).
    """
    transformer = _unwrap(transformer)
    adapter = adapter_for(transformer)
    check_attention(adapter, attention)
    check_choice("kernel_backend", kernel_backend, ("auto", "triton", "torch"))
    check_choice("epilogue_backend", epilogue_backend, ("auto", "triton", "torch"))
    if plan is not None:
        _check_plan_like(plan)  # before anything is installed
    old = _get(transformer)
    modules = adapter.attention_modules(transformer)
    install = _Install(adapter, modules, attention, kernel_backend, epilogue_backend)
    install.heads = adapter.heads(transformer)
    install.dispatch_module = _dispatch_module(adapter)
    for i, (_, attn) in enumerate(modules):
        current = attn.processor
        if isinstance(current, KVLockProcessor):  # re-enable: keep what the old one replaced
            current = current._replaced
        install.processors.append(_new_processor(install, i, current))
    if old is not None:
        old.hook.remove()
    for (_, attn), proc in zip(modules, install.processors):
        attn.processor = proc
    install.hook = transformer.register_forward_pre_hook(_PreForward(install), with_kwargs=True)
    transformer.__dict__[_INSTALL_ATTR] = install
    if plan is not None:
        set_plan(transformer, plan)


def set_plan(transformer, plan: PlanLike) -> None:
    """Hand ``transformer``'s KV-Lock processors the plan for the next calls (a
    ``KVLockPlan``), or a plan provider called before every forward."""
    install = _get(transformer)
    if install is None:
        raise RuntimeError("KV-Lock is not enabled on this transformer: call enable_kvlock(transformer) first")
    _check_plan_like(plan)
    if isinstance(plan, KVLockPlan):
        install.provider = None
        install.plan = plan
    else:
        install.provider = plan
        install.plan = KVLockPlan.off()


def get_plan(transformer) -> KVLockPlan:
    """The plan the processors read now (off when KV-Lock is not enabled)."""
    install = _get(transformer)
    return KVLockPlan.off() if install is None else install.plan


def disable_kvlock(transformer) -> None:
    """Remove KV-Lock: each module still holding its KV-Lock processor gets back the
    processor that one replaced (with the attention backend / parallel config set while
    KV-Lock was on); processors set by the user since are kept."""
    install = _get(transformer)
    if install is None:
        return
    transformer = _unwrap(transformer)
    install.hook.remove()
    # A KV-Lock processor kept elsewhere (CogVideoX's fuse_qkv_projections records the
    # processors it replaces and unfuse puts them back) runs the stock math from now on.
    install.provider = None
    install.plan = KVLockPlan.off()
    for _, attn in install.modules:
        current = attn.processor
        if isinstance(current, KVLockProcessor) and current._install is install:
            restored = current._replaced
            for name in ("_attention_backend", "_parallel_config"):
                if name in current.__dict__ and restored is not None and hasattr(restored, name):
                    setattr(restored, name, current.__dict__[name])
            attn.processor = restored
    del transformer.__dict__[_INSTALL_ATTR]


@contextlib.contextmanager
def installed(transformer, **options):
    """KV-Lock enabled with ``options`` (``enable_kvlock``'s) for the duration of the block;
    afterwards disabled, or re-installed as it was before (options and plan) if the caller
    had enabled it."""
    before = _get(transformer)
    enable_kvlock(transformer, **options)
    try:
        yield
    finally:
        if is_kvlock_enabled(transformer):
            disable_kvlock(transformer)
        if before is not None:
            enable_kvlock(transformer, before.provider or before.plan, attention=before.attention,
                          kernel_backend=before.kernel_backend, epilogue_backend=before.epilogue_backend)
