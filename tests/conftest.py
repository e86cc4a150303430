# Without a GPU the Triton kernels run through the interpreter on CPU tensors.  The switch
# is read when a kernel is decorated, so it must be set before kvlock_kernels is imported.
# On a CUDA machine (the `cuda` tier) the kernels compile for the GPU instead.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
