"""POSIX shared memory for KV caches: the engine side moves its KV storages into named
segments, the server side maps them by name.

Lifetime: a segment's name only has to live until the server has mapped it. The engine unlinks
it as soon as registration is answered (or fails); both mappings stay valid after the unlink. A
new registration (after a server restart) migrates the tensors again into a fresh segment, on the
thread that writes them (vLLM's, between steps: see WorkerAdapter._move_tensors).
An engine that dies before it unlinks (killed during registration) must not leave its KV in
/dev/shm: it holds an flock on every file it creates there for as long as the name exists, and
the server removes ``lmcache_kv_*`` and ``lmcache_live_*`` files nobody holds a lock on (their
creator is gone) at start and periodically (``remove_orphan_files``).

Security: /dev/shm is world-writable. Whatever a peer names is opened with ``O_NOFOLLOW`` and
must be a regular file with one link, owned by this process's user, of the expected size;
anything else (a symlink to a file the server may write, another user's segment) is refused.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import secrets
import stat
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmcache.log import init_logger

logger = init_logger(__name__)

SEGMENT_PREFIX = "/lmcache_kv_"  # an engine's KV storage
ARENA_PREFIX = "/lmcache_l1_"  # a server's L1 arena
LIVENESS_PREFIX = "/lmcache_live_"  # an engine's liveness mark (transfer/liveness.py)
_DEV_SHM = "/dev/shm"
# A file is taken for an orphan only this long after its creation: its creator takes the lock
# right after creating it, and must not lose the race against a sweep.
ORPHAN_GRACE_S = 2.0
_counter = itertools.count()


class SegmentError(OSError):
    pass


@dataclass
class Segment:
    """An engine's segment; ``fd`` holds its flock until the name is unlinked."""

    name: str
    nbytes: int
    fd: int = -1

    def unlink(self) -> None:
        try:
            os.unlink(_DEV_SHM + self.name)
        except FileNotFoundError:
            pass
        if self.fd >= 0:
            os.close(self.fd)  # the lock goes with it
            self.fd = -1


def create_locked(prefix: str, nbytes: int) -> tuple[str, int]:
    """Creates ``/dev/shm/<prefix><pid>_<n>`` of ``nbytes`` and takes a shared flock on it at once:
    (name, fd). The lock lives as long as the fd, so it dies with this process."""
    # The random part: containers sharing /dev/shm reuse each other's pids.
    name = f"{prefix}{os.getpid()}_{next(_counter)}_{secrets.token_hex(4)}"
    fd = os.open(_DEV_SHM + name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if nbytes:
            os.ftruncate(fd, nbytes)
    except BaseException:
        os.unlink(_DEV_SHM + name)
        os.close(fd)
        raise
    return name, fd


def _create(nbytes: int) -> tuple[Segment, mmap.mmap]:
    name, fd = create_locked(SEGMENT_PREFIX, nbytes)
    try:
        mm = mmap.mmap(fd, nbytes)
    except BaseException:
        Segment(name, nbytes, fd).unlink()
        raise
    return Segment(name, nbytes, fd), mm


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


def open_checked(name: str, prefix: str, flags: int = os.O_RDWR) -> int:
    """Opens ``/dev/shm/<name>`` for a name a peer sent, refusing anything but a plain SHM object
    of this user: a name outside ``prefix``, a symlink, a hard link, a directory or device,
    another user's file. Returns the fd; raises SegmentError with the reason."""
    if not name.startswith(prefix) or "/" in name[1:] or "\0" in name or name in (prefix, "/.", "/.."):
        raise SegmentError(f"{name!r} is not an LMCache segment name ({prefix}...)")
    try:
        fd = os.open(_DEV_SHM + name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(f"SHM segment {name} does not exist") from None
    except OSError as e:  # ELOOP: a symlink; EACCES, ENXIO, ...
        raise SegmentError(f"cannot open SHM segment {name}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SegmentError(f"SHM segment {name} is not a regular file")
        if st.st_nlink != 1:
            raise SegmentError(f"SHM segment {name} has {st.st_nlink} links; a segment has one")
        if st.st_uid != os.geteuid():
            raise SegmentError(
                f"SHM segment {name} belongs to uid {st.st_uid}, not to this server's user ({os.geteuid()})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_if_abandoned(name: str, fd: int) -> bool:
    """Whether nobody holds the flock of ``fd``'s file any more (its creator is gone, see
    ``create_locked``); if so, unlinks it, but only while ``name`` still names that very file
    (it may have been swept and reused since). An error asking counts as held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    try:
        if os.stat(_DEV_SHM + name, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(_DEV_SHM + name)
    except OSError:
        pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def remove_orphan_files(prefixes: tuple[str, ...] = (SEGMENT_PREFIX, LIVENESS_PREFIX)) -> list[str]:
    """Unlinks the engines' files in /dev/shm whose creator is gone: nobody holds their flock
    (see ``create_locked``) and they are older than ORPHAN_GRACE_S. Returns their names."""
    removed: list[str] = []
    try:
        entries = os.listdir(_DEV_SHM)
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = "/" + entry
        if not name.startswith(prefixes):
            continue
        try:
            fd = open_checked(name, next(p for p in prefixes if name.startswith(p)), os.O_RDONLY)
        except SegmentError:
            continue  # gone meanwhile, or not ours to judge
        try:
            st = os.fstat(fd)
            if now - st.st_ctime < ORPHAN_GRACE_S:
                continue
            if unlink_if_abandoned(name, fd):
                removed.append(name)
                # A liveness mark is empty and expected after any exit that skipped atexit
                # (forked workers); a KV segment left behind is memory an engine leaked.
                log = logger.warning if name.startswith(SEGMENT_PREFIX) else logger.info
                log("Removed %s (%d bytes) left in /dev/shm by an engine that is gone", name, st.st_size)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def map_segment(name: str, nbytes: int, prefix: str = SEGMENT_PREFIX) -> np.ndarray:
    """Maps a segment as a writable uint8 array of exactly ``nbytes``: an engine's KV storage on
    the server side, or (with ``prefix=ARENA_PREFIX``) the server's L1 arena on the engine side."""
    fd = open_checked(name, prefix)
    try:
        st = os.fstat(fd)
        if st.st_size != nbytes:
            raise SegmentError(f"SHM segment {name} has {st.st_size} bytes, but its storage has {nbytes}")
        if st.st_blocks * 512 < nbytes and prefix == SEGMENT_PREFIX:
            # An engine's segment holds its KV, so all of it is written. A sparse one would make
            # MAP_POPULATE below allocate its size in server memory: a few bytes of request
            # could then ask for a terabyte.
            raise SegmentError(f"SHM segment {name} is sparse ({st.st_blocks * 512} of {nbytes} bytes backed)")
        # MAP_POPULATE builds the page tables now: a first store through a fresh mapping
        # otherwise faults page by page (measured 0.2 GB/s instead of 9).
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8)  # the array keeps the mapping alive
