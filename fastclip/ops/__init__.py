"""Backends: ``reference`` (the specification), ``torch`` (chunked, any device), ``triton`` and ``cuda``."""
