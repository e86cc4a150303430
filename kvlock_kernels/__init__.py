"""kvlock-kernels: fused kernels for KV-Lock, training-free video editing on video DiTs.

Ops (each has a Triton kernel and a PyTorch reference in ``kvlock_kernels.reference``):
    kv_lock_attention       attention with per-key-token K/V locking toward a source
    merge_attention_states  combine partial attentions over disjoint key sets
    branch_variance         per-token variance across stacked predictions + masked mean
    cfg_zero_star_scale     CFG-Zero* projection scale s* per sample
    kvlock_guidance         guided velocity (CFG with s*) fused with the x0-hat prediction
Control and masks:
    KVLockScheduler         alpha / omega per step from the foreground x0-hat variance
    masks                   pixel -> latent -> token masks, lock weights
Cache:
    KVRingBuffer            (step, layer)-keyed K/V slots with host spill (C++ extension)
"""
from . import masks, reference
from .branch_variance import branch_variance
from .cfg_zero_star_scale import cfg_zero_star_scale
from .kv_lock_attention import kv_lock_attention
from .kvlock_guidance import kvlock_guidance
from .merge_attention_states import merge_attention_states
from .ring_buffer import KVRingBuffer
from .scheduler import KVLockScheduler

__version__ = "0.1.0"
__all__ = [
    "KVLockScheduler",
    "KVRingBuffer",
    "branch_variance",
    "cfg_zero_star_scale",
    "kv_lock_attention",
    "kvlock_guidance",
    "masks",
    "merge_attention_states",
    "reference",
    "__version__",
]
