"""Pure-PyTorch references: the oracle every kernel is tested against, and the path CPU
tensors run (``backend="torch"``).  One module per op family; every name is re-exported
here, so ``kvlock_kernels.reference.<op>`` is the reference of op ``<op>``."""
from .attention import kv_lock_attention, kv_lock_attention_torch
from .control import branch_variance, cfg_zero_star_scale, kvlock_guidance, masked_mean
from .epilogue import qkv_epilogue
from .lock_kv import blend, lock_kv
from .merge_attention_states import merge_attention_states

__all__ = [
    "blend",
    "branch_variance",
    "cfg_zero_star_scale",
    "kv_lock_attention",
    "kv_lock_attention_torch",
    "kvlock_guidance",
    "lock_kv",
    "masked_mean",
    "merge_attention_states",
    "qkv_epilogue",
]
