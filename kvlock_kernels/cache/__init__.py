"""The KV cache: Python front of the C++ ring buffer (``csrc/``)."""
from .ring_buffer import KeyRangeError, KVRingBuffer, extension_available, extension_build_dir, load_extension

__all__ = ["KVRingBuffer", "KeyRangeError", "extension_available", "extension_build_dir", "load_extension"]
