"""Benchmarks of bn_core against torch's references; run with ``python bench/run.py``."""
