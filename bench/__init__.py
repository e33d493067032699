"""Benchmarks: `make bench` runs bench/run.py; docs/performance.md records the results."""
