"""kvlock-kernels: fused Triton kernels for KV-Lock video editing on video DiTs.

Install the CPU torch wheel (or your CUDA build) first, then install without build
isolation so the C++ extension builds against that torch:

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The extension (kvlock_kernels._C: the KV cache ring buffer) is built with g++ everywhere;
its CUDA copy kernels are added when torch has CUDA and nvcc is found.  Set
KVLOCK_SKIP_EXTENSION=1 to install the pure-Python part only.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # building without torch (e.g. an isolated build): Python part only
    torch = None

if torch is not None and os.environ.get("KVLOCK_SKIP_EXTENSION") != "1":
    sources = ["csrc/kv_ring_buffer.cpp"]
    cxx_flags = ["-O3", "-std=c++20"]  # torch 2.13 headers use C++20 bit-field initialisers
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_modules.append(CUDAExtension(
            "kvlock_kernels._C", sources + ["csrc/copy_kernels.cu"],
            define_macros=[("KVLOCK_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags,
                                # sm_80 / sm_90 binaries plus PTX so newer GPUs can JIT it.
                                "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80",
                                         "-gencode=arch=compute_90,code=sm_90",
                                         "-gencode=arch=compute_90,code=compute_90"]}))
    else:
        ext_modules.append(CppExtension("kvlock_kernels._C", sources, extra_compile_args=cxx_flags))
    cmdclass = {"build_ext": BuildExtension}

# Metadata, dependencies and extras are in pyproject.toml; this file adds the extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
