"""kvlock-kernels: fused Triton kernels for KV-Lock video editing on video DiTs.

Install the CPU torch wheel (or your CUDA build) first, then install without build
isolation so the C++ extension builds against that torch:

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The extension (kvlock_kernels._C: the KV cache ring buffer) is built with g++ everywhere;
its CUDA copy kernels are added when torch has CUDA and nvcc is found.  Set
KVLOCK_SKIP_EXTENSION=1 to install the pure-Python part only.
"""
import os

from setuptools import find_packages, setup

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

setup(
    name="kvlock-kernels",
    version="0.1.0",
    description="Fused KV-Lock attention and control kernels for training-free video editing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kvlock_kernels", "kvlock_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.2", "numpy"],
    extras_require={
        # The tests cover the diffusers integration and the examples, so they bring both.
        "test": ["pytest>=8", "pytest-benchmark>=4", "diffusers>=0.35", "tqdm", "matplotlib"],
        "bench": ["matplotlib"],
        "diffusers": ["diffusers>=0.35", "tqdm"],
        "flash": ["flash-attn>=2.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
