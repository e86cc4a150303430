"""kvlock-kernels: fused kernels for KV-Lock, training-free video editing on video DiTs.

Ops (each has a Triton kernel and a PyTorch reference in ``kvlock_kernels.reference``):
    lock_kv                 the locked keys/values K' = k + w (k_src - k), one launch
    qkv_epilogue            q/k/v norm + RoPE + lock fused into one pass (what processors run)
    kv_lock_attention       attention with per-key-token K/V locking toward a source
                            (routes between blend + best plain attention and a fused kernel)
    merge_attention_states  combine partial attentions over disjoint key sets
    branch_variance         per-token variance across stacked predictions + masked mean
    cfg_zero_star_scale     CFG-Zero* projection scale s* per sample
    kvlock_guidance         guided velocity (CFG with s*) fused with the x0-hat prediction
Control and masks:
    KVLockScheduler         alpha / omega per step from the foreground x0-hat variance
    masks                   pixel -> latent -> token masks, lock weights
Cache:
    KVRingBuffer            (step, layer)-keyed K/V slots with host spill (C++ extension)

Layout: ``attention/`` (attention ops), ``control/`` (control loop, masks), ``cache/``
(ring buffer), ``integrations/diffusers/`` (processors, adapters, editor; the public
entry is ``kvlock_kernels.diffusers``), ``reference/`` (oracles and CPU paths),
``tools/`` (GPU report).
"""
import sys as _sys

from . import reference
from .attention.epilogue import qkv_epilogue
from .attention.kv_lock_attention import kv_lock_attention
from .attention.lock_kv import lock_kv
from .attention.merge_attention_states import merge_attention_states
from .attention.routing import Route, choose_path, plain_attention, plain_attention_backends
from .cache.ring_buffer import KeyRangeError, KVRingBuffer
from .control import masks
from .control.branch_variance import branch_variance
from .control.cfg_zero_star_scale import cfg_zero_star_scale
from .control.kvlock_guidance import kvlock_guidance
from .control.scheduler import KVLockScheduler

# The flat module paths of earlier releases (``kvlock_kernels.kv_lock_attention`` and so
# on) name the same module objects, so ``import kvlock_kernels.masks`` keeps working.
# (The package attributes of the op names are the functions, so the modules are taken
# from sys.modules.)
for _name, _where in (("kv_lock_attention", "attention"), ("merge_attention_states", "attention"),
                      ("branch_variance", "control"), ("cfg_zero_star_scale", "control"),
                      ("kvlock_guidance", "control"), ("masks", "control"), ("scheduler", "control"),
                      ("ring_buffer", "cache")):
    _sys.modules[f"{__name__}.{_name}"] = _sys.modules[f"{__name__}.{_where}.{_name}"]
del _name, _where

__version__ = "0.2.0"
__all__ = [
    "KVLockScheduler",
    "KVRingBuffer",
    "KeyRangeError",
    "Route",
    "branch_variance",
    "cfg_zero_star_scale",
    "choose_path",
    "kv_lock_attention",
    "kvlock_guidance",
    "lock_kv",
    "masks",
    "merge_attention_states",
    "plain_attention",
    "plain_attention_backends",
    "qkv_epilogue",
    "reference",
    "__version__",
]
