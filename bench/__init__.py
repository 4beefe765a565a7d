"""Benchmark harness of medvlm (see bench/run.py and BENCHMARKS.md)."""
