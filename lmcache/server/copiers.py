"""How the server moves one registered engine's pages: one small interface, one implementation
per transfer mode in which the server copies.

- ``CpuCopier`` (engine_driven): copies between the engine's mapped SHM segments and the L1
  arena now, on the calling worker thread.
- ``GpuCopier`` (cuda_ipc): queues the copies on the server's CUDA stream of the engine's device
  and returns at once; what must follow them runs when the device has done them.

In lmcache_driven mode the engine copies; the server only hands out slots (see tickets.py).
Either way the engine writes store and retrieve once: reserve, copy, then publish (or release)
in the ``then`` callback, which a copier calls exactly once, now or when the copy completes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from lmcache.log import init_logger
from lmcache.protocol import NO_EVENT
from lmcache.server.errors import RequestError
from lmcache.transfer import cuda_ipc
from lmcache.transfer.gpu_cache import GpuCache
from lmcache.transfer.registered import RegisteredCache

logger = init_logger(__name__)

# Per chunk (a list) or for all of them (a bool): did the copy complete.
Outcome = bool | Sequence[bool]


class PageCopier(Protocol):
    """Moves chunks of pages between an engine's blocks and L1 objects."""

    def check(self, n_chunks: int, block_ids: Sequence[int], event: bytes) -> np.ndarray:
        """The block ids as (n_chunks, blocks per chunk); raises RequestError for bad values."""
        ...

    def store(self, blocks: np.ndarray, offsets: Sequence[int], event: bytes, then: Callable[[Outcome], None],
              locks: Sequence[Any]) -> int:
        """Copies chunk i's pages (``blocks[i]``) into the object at ``offsets[i]``, then calls
        ``then``. Returns the index of the server event marking the copies done, or NO_EVENT.
        ``locks`` are the L1 locks the copies need; they are kept alive while copies queue."""
        ...

    def load(self, offsets: Sequence[int], blocks: np.ndarray, skip_blocks: int, event: bytes,
             then: Callable[[Outcome], None], locks: Sequence[Any]) -> int:
        """Copies the object at ``offsets[i]`` into ``blocks[i]`` (never the first
        ``skip_blocks`` blocks), then calls ``then``; returns as ``store`` does."""
        ...

    def event_handles(self) -> list[bytes]:
        """The server's interprocess events the engine waits on (GPU engines only)."""
        ...

    def fence(self) -> int:
        """A server event after everything queued for this engine so far, or NO_EVENT."""
        ...

    def close(self) -> None:
        """Drops the engine's memory once no queued copy uses it."""
        ...


class CpuCopier:
    def __init__(self, instance_id: str, cache: RegisteredCache, arena: np.ndarray) -> None:
        self._instance_id = instance_id
        self._cache = cache
        self._arena = arena

    def check(self, n_chunks: int, block_ids: Sequence[int], event: bytes) -> np.ndarray:
        if event:
            raise RequestError(f"{self._instance_id} is not a GPU engine: its requests carry no CUDA event")
        return _check_blocks(self._cache, n_chunks, block_ids)

    def store(self, blocks: np.ndarray, offsets: Sequence[int], event: bytes, then: Callable[[Outcome], None],
              locks: Sequence[Any]) -> int:
        ok = [False] * len(offsets)
        try:
            for i, offset in enumerate(offsets):
                self._cache.gather(blocks[i], self._arena, offset)
                ok[i] = True
        finally:
            then(ok)  # the chunks copied before a failure are good
        return NO_EVENT

    def load(self, offsets: Sequence[int], blocks: np.ndarray, skip_blocks: int, event: bytes,
             then: Callable[[Outcome], None], locks: Sequence[Any]) -> int:
        bpc = self._cache.blocks_per_chunk
        try:
            for i, offset in enumerate(offsets):
                self._cache.scatter(self._arena, offset, blocks[i], max(0, skip_blocks - i * bpc))
        except BaseException:
            then(False)
            raise
        then(True)
        return NO_EVENT

    def event_handles(self) -> list[bytes]:
        return []

    def fence(self) -> int:
        return NO_EVENT

    def close(self) -> None:
        pass  # the mappings go with the last reference to them


class GpuCopier:
    def __init__(self, instance_id: str, cache: GpuCache, after: Callable[..., None]) -> None:
        """``after(runtime, marker, then, locks)`` runs ``then(ok)`` once the device has passed
        ``marker`` (a GpuCompletions of the device), keeping ``locks`` alive meanwhile."""
        self._instance_id = instance_id
        self._cache = cache
        self._after = after

    def check(self, n_chunks: int, block_ids: Sequence[int], event: bytes) -> np.ndarray:
        try:
            cuda_ipc.validate_event(event)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return _check_blocks(self._cache, n_chunks, block_ids)

    def store(self, blocks: np.ndarray, offsets: Sequence[int], event: bytes, then: Callable[[Outcome], None],
              locks: Sequence[Any]) -> int:
        try:
            index, marker = self._cache.gather(blocks, offsets, event)
        except Exception as e:
            self._drain()  # nothing queued may still write into the slots given back now
            raise RequestError(f"cannot queue the GPU copy: {e}") from e
        self._after(self._cache.runtime, marker, then, locks)
        return index

    def load(self, offsets: Sequence[int], blocks: np.ndarray, skip_blocks: int, event: bytes,
             then: Callable[[Outcome], None], locks: Sequence[Any]) -> int:
        try:
            index, marker = self._cache.scatter(offsets, blocks, skip_blocks, event)
        except Exception as e:
            self._drain()  # nothing queued may still write into blocks vLLM now recomputes
            raise RequestError(f"cannot queue the GPU copy: {e}") from e
        self._after(self._cache.runtime, marker, then, locks)  # the read locks hold until the copies ran
        return index

    def event_handles(self) -> list[bytes]:
        return list(self._cache.runtime.event_handles)

    def fence(self) -> int:
        index, marker = self._cache.runtime.mark()
        self._after(self._cache.runtime, marker, lambda ok: None, ())  # keeps the marker alive until passed
        return index

    def close(self) -> None:
        self._cache.close(lambda runtime, marker, then: self._after(runtime, marker, then, ()))

    def _drain(self) -> None:
        """Waits until everything queued on the stream has run (error paths only)."""
        runtime = self._cache.runtime
        try:
            runtime.wait_marker(runtime.mark()[1])
        except Exception as e:  # noqa: BLE001 - the device itself failed; nothing more to wait for
            logger.error("Could not drain the GPU stream: %s", e)


def _check_blocks(cache: RegisteredCache | GpuCache, n_chunks: int, block_ids: Sequence[int]) -> np.ndarray:
    try:
        return cache.check_blocks(n_chunks, block_ids)
    except (ValueError, OverflowError, TypeError) as e:
        raise RequestError(str(e)) from None
