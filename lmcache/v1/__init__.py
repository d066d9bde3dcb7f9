"""Compatibility package: module paths vLLM's in-tree LMCache connector imports (see custom_types)."""
