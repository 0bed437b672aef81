"""Benchmarks: `python benchmarks/run.py TASK` (see run.py)."""
