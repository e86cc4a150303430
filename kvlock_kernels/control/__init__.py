"""The control loop: hallucination signal, CFG-Zero* guidance, the alpha/omega scheduler, masks."""
from . import masks
from .branch_variance import branch_variance
from .cfg_zero_star_scale import cfg_zero_star_scale
from .kvlock_guidance import kvlock_guidance
from .scheduler import KVLockScheduler

__all__ = ["KVLockScheduler", "branch_variance", "cfg_zero_star_scale", "kvlock_guidance", "masks"]
