"""kvlock-kernels: fused kernels for KV-Lock, training-free video editing on video DiTs.

Ops (each has a Triton kernel and a PyTorch reference in ``kvlock_kernels.reference``):
    kv_lock_attention       attention with per-key-token K/V locking toward a source
    merge_attention_states  combine partial attentions over disjoint key sets
"""
from .kv_lock_attention import kv_lock_attention
from .merge_attention_states import merge_attention_states
from . import reference

__version__ = "0.1.0"
__all__ = ["kv_lock_attention", "merge_attention_states", "reference", "__version__"]
