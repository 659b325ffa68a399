"""One-machine simulated runs, experiment suites and benchmarks."""
