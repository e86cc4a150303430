"""kvlock-kernels: fused Triton kernels for KV-Lock video editing on video DiTs.

Metadata, dependencies and extras are in pyproject.toml; this file adds the C++ extension
(kvlock_kernels._C: the KV cache ring buffer) and ships its sources in the package.

- With torch importable at build time (``pip install --no-build-isolation .`` or ``-e .``
  after installing torch), the extension is compiled now, with g++ everywhere and with its
  CUDA copy kernels when torch has CUDA and nvcc is found.
- In an isolated build (plain ``pip install .``) torch is deliberately not a build
  requirement (it would fetch a multi-GB CUDA wheel), so nothing is compiled: the wheel is
  pure Python plus the C++ sources under kvlock_kernels/_csrc, and the first KVRingBuffer
  compiles them once (kvlock_kernels.cache.ring_buffer.load_extension).

KVLOCK_SKIP_EXTENSION=1 skips the ahead-of-time build even when torch is importable.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# csrc/ at the repository root is the one copy of the sources; the wheel gets a copy.
CSRC = sorted(os.path.relpath(p, HERE) for ext in ("cpp", "cu", "h")
              for p in glob.glob(os.path.join(HERE, "csrc", f"*.{ext}")))


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/* into kvlock_kernels/_csrc of the build (so every
    wheel can compile the extension at first use).  Editable installs read csrc/ in place."""

    def _csrc_targets(self):
        if getattr(self, "editable_mode", False):
            return []
        return [(os.path.join(HERE, src), os.path.join(self.build_lib, "kvlock_kernels", "_csrc",
                                                       os.path.basename(src))) for src in CSRC]

    def run(self):
        super().run()
        targets = self._csrc_targets()
        if targets:
            self.mkpath(os.path.dirname(targets[0][1]))
        for src, dst in targets:
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [dst for _, dst in self._csrc_targets()]


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None
    print("kvlock-kernels: torch is not importable in this build environment (an isolated `pip install .`), so "
          "the C++ KV ring buffer extension is not compiled now: the package ships its sources and builds it at "
          "first use (one time, ~1 min, needs a C++ compiler).  To build it now instead: "
          "`pip install --no-build-isolation .` with torch installed.", file=sys.stderr)

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
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
