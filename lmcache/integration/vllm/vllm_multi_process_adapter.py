"""Compatibility: the names vLLM 0.33's in-tree LMCacheMPConnector module imports from here.

That module imports them at load time, then uses our class from lmcache_mp_connector.py instead
of its own; these names only have to exist. They point at our adapters where one matches.
"""

from __future__ import annotations

import enum

from lmcache.integration.vllm.adapter import LoadOp, SchedulerAdapter, WorkerAdapter

LMCacheMPSchedulerAdapter = SchedulerAdapter
LMCacheMPWorkerAdapter = WorkerAdapter
LoadStoreOp = LoadOp


class ParallelStrategy(enum.Enum):
    TENSOR_PARALLEL = "tp"


__all__ = ["LMCacheMPSchedulerAdapter", "LMCacheMPWorkerAdapter", "LoadStoreOp", "ParallelStrategy"]
