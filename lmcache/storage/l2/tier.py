"""What every L2 tier implements (the disk tier today; Redis next), so the controller that moves
chunks between L1 and the tiers never learns which kind it talks to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from lmcache.keys import CacheScope


class Tier(Protocol):
    kind: str  # "disk", ...

    @property
    def writable(self) -> bool:
        """False once the tier stopped taking writes (full, failing); reads go on."""
        ...

    def __contains__(self, key: tuple[bytes, bytes]) -> bool:
        """Whether (scope digest, chunk hash) is held, from the index alone (no I/O)."""
        ...

    def payload_bytes(self, scope_key: bytes, chunk_hash: bytes) -> int | None:
        """The chunk's payload size if held (no I/O), else None."""
        ...

    def put(self, scope: CacheScope, scope_key: bytes, chunk_hash: bytes, tokens: int, payload: memoryview,
            still_valid: Callable[[], bool] = ...) -> bool:
        """Stores a chunk straight from L1 memory; True if the tier holds it afterwards. It is
        kept only if ``still_valid()`` holds once the bytes are copied."""
        ...

    def get(self, scope_key: bytes, chunk_hash: bytes, into: memoryview) -> bool:
        """Reads a chunk into an L1 slot of its size, checked (header, scope, checksum); False
        if absent or damaged (then it is deleted and counted)."""
        ...

    def delete(self, scope_key: bytes, chunk_hash: bytes, damaged: bool = False) -> None:
        """Drops a chunk (``damaged``: found unusable, counted as corrupt)."""
        ...

    def clear(self) -> int:
        """Drops every chunk; returns how many."""
        ...

    def status(self) -> dict[str, Any]:
        """type, capacity_bytes, used_bytes, objects, state and counters, for /status."""
        ...

    def close(self) -> None: ...
