"""Model adapters: one file per diffusers video transformer family, in ONE table.

``adapter_for(transformer)`` picks the adapter whose diffusers classes the transformer is
an instance of (classes imported lazily, no class-name strings).  Adding a model is adding
one file with an ``ADAPTER`` (a ``ModelAdapter``) and its module name below.
"""
from __future__ import annotations

import importlib

from ...._validate import describe
from .base import LoopContext, ModelAdapter

__all__ = ["ADAPTER_MODULES", "ModelAdapter", "LoopContext", "adapters", "adapter_for", "supported_transformers"]

# The table: module names under this package, each defining ADAPTER.
ADAPTER_MODULES = ("wan", "wan_vace", "cogvideox", "hunyuan_video")


def adapters() -> list:
    """The registered adapters, in table order."""
    return [importlib.import_module(f"{__name__}.{name}").ADAPTER for name in ADAPTER_MODULES]


def supported_transformers() -> list:
    """Names of the diffusers classes KV-Lock supports."""
    return [path.rpartition(":")[2] for a in adapters() for path in a.model_class_paths]


def adapter_for(transformer) -> ModelAdapter:
    """The adapter serving ``transformer``; TypeError naming the supported classes otherwise."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("kvlock_kernels.diffusers needs diffusers: pip install -e .[diffusers]") from e
    transformer = getattr(transformer, "_orig_mod", transformer)  # behind a torch.compile wrapper
    for adapter in adapters():
        if adapter.matches(transformer):
            return adapter
    raise TypeError(f"KV-Lock supports {', '.join(supported_transformers())}; got {describe(transformer)}")
