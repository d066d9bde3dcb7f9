"""Eviction policies: which evictable object goes first when L1 needs room.

A policy only ever holds evictable objects (ready and not locked); the L1 cache adds an
object when it becomes evictable and removes it when it is locked or freed. So a victim is
always safe to free, and picking one is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from lmcache.config import EvictionPolicy


class Policy(Protocol):
    def add(self, item: Hashable) -> None:
        """``item`` became evictable (as if just used)."""

    def remove(self, item: Hashable) -> None:
        """``item`` is no longer evictable; unknown items are ignored."""

    def victim(self) -> Hashable | None:
        """The item to evict next (not removed), or None when nothing is evictable."""

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used first; every operation O(1)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, item: Hashable) -> None:
        self._order[item] = None
        self._order.move_to_end(item)

    def remove(self, item: Hashable) -> None:
        self._order.pop(item, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)


POLICIES: dict[EvictionPolicy, Callable[[], Policy]] = {EvictionPolicy.LRU: LRUPolicy}
