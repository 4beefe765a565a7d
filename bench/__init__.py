"""Benchmark harness of medvlm (see bench/run.py and docs/benchmarks.md)."""
