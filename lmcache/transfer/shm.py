"""POSIX shared memory for KV caches: the engine side moves its KV storages into named
segments, the server side maps them by name.

Lifetime: a segment's name only has to live until the server has mapped it. The engine unlinks
it as soon as registration is answered (or fails), so no segment outlives a crash of either
process; both mappings stay valid after the unlink. A new registration (after a server restart)
migrates the tensors again into a fresh segment.
"""

from __future__ import annotations

import itertools
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmcache.log import init_logger

logger = init_logger(__name__)

SEGMENT_PREFIX = "/lmcache_kv_"  # an engine's KV storage
ARENA_PREFIX = "/lmcache_l1_"  # a server's L1 arena
_DEV_SHM = "/dev/shm"
_counter = itertools.count()


class SegmentError(OSError):
    pass


@dataclass
class Segment:
    name: str
    nbytes: int

    def unlink(self) -> None:
        try:
            os.unlink(_DEV_SHM + self.name)
        except FileNotFoundError:
            pass


def _create(nbytes: int) -> tuple[Segment, mmap.mmap]:
    name = f"{SEGMENT_PREFIX}{os.getpid()}_{next(_counter)}"
    fd = os.open(_DEV_SHM + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes)
    except BaseException:
        os.unlink(_DEV_SHM + name)
        raise
    finally:
        os.close(fd)
    return Segment(name, nbytes), mm


def migrate_to_shm(tensors: list[Any], storages: list[Any]) -> list[Segment]:
    """Moves each storage into a new SHM segment; every tensor viewing it now views the segment.

    ``storages`` are the distinct storages of ``tensors`` (as ``layouts.describe`` returns them).
    The tensors keep their shapes, strides, offsets and contents.
    """
    import torch

    segments = []
    for storage in storages:
        nbytes = storage.nbytes()
        segment, mm = _create(nbytes)
        fresh = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive
        fresh.copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        new_storage = fresh.untyped_storage()
        for t in tensors:
            if t.untyped_storage().data_ptr() == storage.data_ptr():
                t.set_(new_storage, t.storage_offset(), t.size(), t.stride())
        segments.append(segment)
        logger.info("Migrated CPU KV cache tensor (nbytes=%d) to SHM %s", nbytes, segment.name)
    return segments


def arena_name(pid: int | None = None) -> str:
    return f"{ARENA_PREFIX}{pid or os.getpid()}"


def remove_stale_arenas() -> list[str]:
    """Unlinks the L1 arenas of servers that died without cleaning up (their pid is gone)."""
    removed = []
    for entry in os.listdir(_DEV_SHM):
        if not entry.startswith(ARENA_PREFIX[1:]):
            continue
        try:
            pid = int(entry[len(ARENA_PREFIX) - 1 :])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            os.unlink(f"{_DEV_SHM}/{entry}")
            removed.append("/" + entry)
            logger.warning("Removed the L1 arena /%s of a server that is gone", entry)
        except PermissionError:
            pass  # alive, another user's
    return removed


def map_segment(name: str, nbytes: int, prefix: str = SEGMENT_PREFIX) -> np.ndarray:
    """Maps a segment as a writable uint8 array of exactly ``nbytes``: an engine's KV storage on
    the server side, or (with ``prefix=ARENA_PREFIX``) the server's L1 arena on the engine side."""
    if not name.startswith(prefix) or "/" in name[1:]:
        raise SegmentError(f"{name!r} is not an LMCache segment name ({prefix}...)")
    try:
        fd = os.open(_DEV_SHM + name, os.O_RDWR)
    except FileNotFoundError:
        raise SegmentError(f"SHM segment {name} does not exist") from None
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise SegmentError(f"SHM segment {name} has {size} bytes, but its storage has {nbytes}")
        # MAP_POPULATE builds the page tables now: a first store through a fresh mapping
        # otherwise faults page by page (measured 0.2 GB/s instead of 9).
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8)  # the array keeps the mapping alive
