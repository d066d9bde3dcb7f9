"""What every L2 tier implements (disk, Redis), so the controller that moves chunks between L1
and the tiers never learns which kind it talks to.

A local tier (disk) knows what it holds without I/O; a shared one (Redis) does not: other
servers write to it. So the questions the controller asks come in two kinds: ``may_hold`` and
``__contains__`` never do I/O, and ``held`` may cost one round trip for a whole run of chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lmcache.keys import CacheScope


@dataclass(frozen=True)
class Outgoing:
    """One chunk on its way from L1 to a tier. ``payload`` is the L1 object's memory, valid
    only while ``still_valid()`` holds: a tier asks it after the bytes left that memory and
    before anyone else can see them (or deletes them if it turns False)."""

    scope: CacheScope
    scope_key: bytes
    chunk_hash: bytes
    tokens: int
    payload: memoryview
    still_valid: Callable[[], bool]


class TierClearError(Exception):
    """A tier could not make sure its chunks are gone (unreachable, files it could not delete).
    Never swallowed: clearing is how operators drop KV that must not be served again (new
    weights under the same model name), so a clear that failed must say so."""


class Tier(Protocol):
    kind: str  # "disk", "redis", "redis-cluster"

    @property
    def writable(self) -> bool:
        """False while the tier takes no writes (full, failing, unreachable)."""
        ...

    def __contains__(self, key: tuple[bytes, bytes]) -> bool:
        """Whether (scope digest, chunk hash) is surely held, known without I/O (a shared
        tier answers False: it asks before writing instead)."""
        ...

    def may_hold(self, scope_key: bytes, chunk_hash: bytes) -> bool:
        """False only if the tier surely lacks the chunk or cannot be asked now (no I/O)."""
        ...

    def held(self, scope_key: bytes, chunk_hashes: Sequence[bytes]) -> list[int | None]:
        """Each chunk's payload size if held, else None: at most one round trip, bounded by
        the tier's lookup timeout (an unreachable tier answers None for all)."""
        ...

    def put_many(self, chunks: Sequence[Outgoing]) -> list[bool]:
        """Stores chunks straight from L1 memory; for each, whether the tier holds it afterwards."""
        ...

    def get(self, scope_key: bytes, chunk_hash: bytes, into: memoryview) -> bool:
        """Reads a chunk into an L1 slot of its size, checked (header, scope, checksum); False
        if absent or damaged (then it is deleted and counted)."""
        ...

    def delete(self, scope_key: bytes, chunk_hash: bytes, damaged: bool = False) -> None:
        """Drops a chunk (``damaged``: found unusable, counted as corrupt)."""
        ...

    def clear(self) -> int:
        """Drops every chunk; returns how many. Raises TierClearError, naming the cause, if any
        chunk may still be readable afterwards (by this server or, after a restart, by any)."""
        ...

    def status(self) -> dict[str, Any]:
        """type, state, counters and (where the tier keeps them) capacity_bytes, used_bytes and
        objects, for /status."""
        ...

    def close(self) -> None: ...
