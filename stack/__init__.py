"""Local stand-ins for the external services, so the demo, tests and benchmarks run offline."""
