"""Benchmarks and bench analyses, each run as ``python bench/NAME.py`` (README)."""
