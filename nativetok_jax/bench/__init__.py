"""Benchmarks: each writes a JSON report and prints a table (``python -m nativetok_jax.bench NAME``)."""
