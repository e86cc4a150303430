"""KV-Lock inside diffusers video transformers (imported lazily: diffusers is an extra)."""
from .editor import SUPPORTED_TRANSFORMERS, KVLockController, KVLockEditor, disable_kvlock, enable_kvlock  # noqa: F401

__all__ = ["KVLockController", "KVLockEditor", "SUPPORTED_TRANSFORMERS", "disable_kvlock", "enable_kvlock"]
