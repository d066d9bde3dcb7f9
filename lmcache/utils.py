"""Compatibility: vLLM 0.33's in-tree LMCacheMPConnector module imports ``init_logger`` from here
before it picks our connector class. Our code uses lmcache.log directly."""

from lmcache.log import init_logger

__all__ = ["init_logger"]
