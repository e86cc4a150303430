"""Developer tools: ``python -m kvlock_kernels.tools.gpu_report`` (ahead-of-time SASS report)."""
