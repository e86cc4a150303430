# Makes `pytest benchmarks/` import the suites as the `benchmarks` package.
