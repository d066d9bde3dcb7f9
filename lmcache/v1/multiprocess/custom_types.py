"""Compatibility: vLLM 0.33's in-tree LMCacheMPConnector module imports ``RequestAllocationRecord``
from here at load time (it then uses our connector class, which does not need it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestAllocationRecord:
    request_id: str = ""
    block_ids: list[int] = field(default_factory=list)


BlockAllocationRecord = RequestAllocationRecord
