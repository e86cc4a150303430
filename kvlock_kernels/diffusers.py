"""Public entry point of the diffusers integration: ``from kvlock_kernels.diffusers import ...``.
The code lives in ``kvlock_kernels.integrations.diffusers``."""
from .integrations.diffusers import *  # noqa: F401,F403
from .integrations.diffusers import __all__  # noqa: F401
