"""KV-Lock inside diffusers video transformers (imported lazily: diffusers is an extra).

Modules: ``plan`` (the immutable per-step plan), ``processors`` (the KV-Lock processors'
shared math), ``adapters/`` (one file per model family, one table), ``parallel``
(context parallelism), ``install`` (enable / disable / set_plan), ``editor``
(KVLockEditor), ``pytest_plugin`` (KV-Lock under diffusers' own test suites).
"""
from .adapters import ModelAdapter, adapter_for, adapters, supported_transformers
from .editor import KVLockEditor
from .install import disable_kvlock, enable_kvlock, get_plan, is_kvlock_enabled, set_plan
from .plan import MODES, SOURCE_INDEX, SOURCES, KVLockCall, KVLockPlan
from .processors import KVLockProcessor

__all__ = [
    "KVLockCall",
    "KVLockEditor",
    "KVLockPlan",
    "KVLockProcessor",
    "MODES",
    "ModelAdapter",
    "SOURCES",
    "SOURCE_INDEX",
    "SUPPORTED_TRANSFORMERS",
    "adapter_for",
    "adapters",
    "disable_kvlock",
    "enable_kvlock",
    "get_plan",
    "is_kvlock_enabled",
    "set_plan",
    "supported_transformers",
]

# The supported class names, from the adapter table (no diffusers import).
SUPPORTED_TRANSFORMERS = tuple(supported_transformers())
