"""Attention with KV-Lock: the fused single-pass kernel, the blend, partial-state merging."""
from .kv_lock_attention import kv_lock_attention
from .merge_attention_states import merge_attention_states

__all__ = ["kv_lock_attention", "merge_attention_states"]
