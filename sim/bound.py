"""Offline hit rates on the chunk sequence a sequential replay plays: each eviction policy (the
server's own classes), Belady's MIN and unlimited memory, without a server.

It models L1 as a sequential replay drives it, one request at a time: the Lookup counts the
leading chunks present (never the whole prompt: vLLM computes at least one token); the hits are
retrieved (locked, then released later chunks first: a use); then every whole chunk of the
prompt that is not present is stored, each reservation evicting the policy's victim when L1 is
full (chunks of this request being written are never victims), and committed later chunks
first. Capacity is what the server's pool holds of one chunk size (slabs x slots per slab).

Belady's MIN evicts the chunk whose next use (the next request whose prompt holds it) is
farthest away; like the server, it admits every stored chunk.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from lmcache._fast.pool import MemoryPool, slot_size

from lmcache.config import GIB, EvictionPolicy
from lmcache.storage.eviction import POLICIES, Policy
from sim.workloads import trace_chunk_keys

Request = tuple[int, list[Hashable]]  # (prompt tokens, the key of each whole chunk)


@dataclass
class Bound:
    policy: str
    capacity_chunks: int
    hit_tokens: int
    prompt_tokens: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def trace_requests(trace: Path, chunk_size: int, requests: int, skip: int = 0) -> list[Request]:
    rows = list(trace_chunk_keys(trace, chunk_size, skip + requests))
    return [(length, list(keys)) for length, keys in rows[skip:]]


def capacity_chunks(l1_size_gb: float, object_bytes: int) -> int:
    """Objects of ``object_bytes`` the server's L1 of that size holds (its pool's rounding)."""
    pool = MemoryPool(int(l1_size_gb * GIB), prefault=False)
    try:
        return pool.n_slabs * (pool.slab_bytes // slot_size(object_bytes))
    finally:
        pool.close()


class _Item:
    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key


def play(requests: Sequence[Request], capacity: int, chunk_size: int, policy: Policy | None) -> tuple[int, int]:
    """(hit tokens, evictions) of one policy; ``None``: Belady's MIN."""
    cache: dict[Hashable, _Item] = {}
    belady = _BeladyOrder(requests) if policy is None else None
    hits = evictions = 0
    for i, (length, keys) in enumerate(requests):
        lead = 0
        while lead < len(keys) and keys[lead] in cache:
            lead += 1
        used = min(lead, (length - 1) // chunk_size)
        hits += used * chunk_size
        if belady is not None:
            belady.referenced(i, [k for k in keys if k in cache])
        elif policy is not None:
            for k in keys[:used]:  # retrieved: locked, then released later chunks first
                policy.remove(cache[k])
            for k in reversed(keys[:used]):
                policy.add(cache[k])
        written: list[Hashable] = []
        for k in keys:
            if k in cache:
                continue
            if len(cache) >= capacity:
                victim = _victim(cache, policy, belady)
                if victim is None:
                    continue  # everything is being written: this chunk is not stored
                del cache[victim]
                evictions += 1
            cache[k] = _Item(k)
            written.append(k)
        for k in reversed(written):  # committed later chunks first
            if belady is not None:
                belady.referenced(i, [k])
            elif policy is not None:
                policy.add(cache[k])
    return hits, evictions


def _victim(cache: dict[Hashable, _Item], policy: Policy | None, belady: _BeladyOrder | None) -> Hashable | None:
    if belady is not None:
        return belady.victim(cache)
    assert policy is not None
    item = policy.victim()
    if item is None:
        return None
    policy.forget(item, evicted=True)
    return cast(_Item, item).key


class _BeladyOrder:
    """Cached keys by next use, farthest first (a heap with stale entries skipped)."""

    def __init__(self, requests: Sequence[Request]) -> None:
        self._uses: dict[Hashable, list[int]] = {}
        for i, (_, keys) in enumerate(requests):
            for k in set(keys):
                self._uses.setdefault(k, []).append(i)
        self._cursor: dict[Hashable, int] = {}
        self._next: dict[Hashable, int] = {}
        self._heap: list[tuple[int, int, Hashable]] = []
        self._seq = 0
        self._never = len(requests) + 1

    def _after(self, key: Hashable, i: int) -> int:
        uses = self._uses[key]
        j = self._cursor.get(key, 0)
        while j < len(uses) and uses[j] <= i:
            j += 1
        self._cursor[key] = j
        return uses[j] if j < len(uses) else self._never

    def _push(self, key: Hashable, i: int) -> None:
        self._next[key] = nxt = self._after(key, i)
        self._seq += 1
        heapq.heappush(self._heap, (-nxt, self._seq, key))

    def referenced(self, i: int, keys: list[Hashable]) -> None:
        """``keys`` are used (looked up or stored) by request ``i``."""
        for k in keys:
            self._push(k, i)

    def victim(self, cache: dict[Hashable, _Item]) -> Hashable | None:
        while self._heap:
            nxt, _, key = self._heap[0]
            if key in cache and self._next.get(key) == -nxt:
                heapq.heappop(self._heap)
                del self._next[key]
                return key
            heapq.heappop(self._heap)  # stale: evicted already, or used since
        return None


def bounds(requests: Sequence[Request], capacity: int, chunk_size: int, policies: Sequence[EvictionPolicy]) -> Iterator[Bound]:
    """One Bound per policy, then Belady's MIN, then unlimited memory."""
    prompt = sum(length for length, _ in requests)
    makers: list[tuple[str, Callable[[], Policy | None]]] = [
        (p.value, lambda p=p: POLICIES[p](lambda item: item.key)) for p in policies  # type: ignore[attr-defined, misc]
    ]
    makers += [("Belady", lambda: None)]
    for name, make in makers:
        hits, evictions = play(requests, capacity, chunk_size, make())
        yield Bound(name, capacity, hits, prompt, evictions)
    hits, _ = play(requests, 1 << 62, chunk_size, POLICIES[EvictionPolicy.LRU](lambda item: item))
    yield Bound("unlimited", 0, hits, prompt, 0)
