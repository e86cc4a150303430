"""Benchmarks and the verification harness (``python -m benchmarks``)."""
