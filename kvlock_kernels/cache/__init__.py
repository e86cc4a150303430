"""The KV cache: Python front of the C++ ring buffer (``csrc/``)."""
from .ring_buffer import KVRingBuffer, extension_available

__all__ = ["KVRingBuffer", "extension_available"]
