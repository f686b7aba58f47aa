"""Benchmark harness behind ``fastclip bench``: shared utilities in ``common``, one module per op."""
