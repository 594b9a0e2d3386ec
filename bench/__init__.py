"""Benchmarks (run with `python -m bench.NAME` from the repository root)."""
