"""Attention with KV-Lock: the blend (``lock_kv``), the blend fused into the q/k/v
epilogue (``qkv_epilogue``), the single-pass fused kernel (``kv_lock_attention``),
partial-state merging, and the routing between them (``routing``)."""
from .epilogue import qkv_epilogue
from .kv_lock_attention import kv_lock_attention
from .lock_kv import lock_kv
from .merge_attention_states import merge_attention_states
from .routing import Route, choose_path, plain_attention, plain_attention_backends

__all__ = [
    "Route",
    "choose_path",
    "kv_lock_attention",
    "lock_kv",
    "merge_attention_states",
    "plain_attention",
    "plain_attention_backends",
    "qkv_epilogue",
]
