"""kvlock-kernels: fused Triton kernels for KV-Lock video editing on video DiTs.

Install the CPU torch wheel (or your CUDA build) first; the requirement below is a
range that an installed torch satisfies, so pip never swaps in another build.
"""
from setuptools import find_packages, setup

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
        "test": ["pytest>=8", "pytest-benchmark>=4"],
        "bench": ["matplotlib"],
        "flash": ["flash-attn>=2.6"],
    },
)
