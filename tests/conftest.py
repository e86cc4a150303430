# The Triton kernels run through the interpreter on CPU tensors.  The switch is read when a
# kernel is decorated, so it must be set before kvlock_kernels is imported.  The GPU tier
# compiles the kernels instead: `TRITON_INTERPRET=0 python -m pytest -m cuda` on a CUDA
# machine (an explicit value is never overridden here).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
