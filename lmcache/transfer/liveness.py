"""Is an engine process still alive? Answered through a lock, not a clock.

In lmcache_driven mode an engine copies pages into and out of L1 slots by raw arena offsets. A
slot it was handed for a store must not be reused while that engine might still write into it,
and an engine that is only paused (a GC pause, SIGSTOP, a frozen container, swapping) looks
exactly like a dead one to a timer. So each engine process creates one small file in /dev/shm
and holds a shared flock on it for as long as it lives; the kernel drops the lock when the
process dies, however it dies. The server opens the same file and asks, without blocking,
whether it could take an exclusive lock: if it could, nobody holds the engine's lock any more.
This works across PID namespaces (containers that share /dev/shm, which the CPU modes need
anyway), where the engine's pid would mean nothing to the server.
"""

from __future__ import annotations

import atexit
import os
import threading

from lmcache.transfer.shm import _DEV_SHM, LIVENESS_PREFIX, SegmentError, create_locked, open_checked, unlink_if_abandoned

_lock = threading.Lock()
_mark: tuple[int, str, int] | None = None  # (pid, name, fd) of this process's mark


def process_mark() -> str:
    """The name of this process's liveness mark, created on first use and kept until exit (a
    forked child makes its own: the parent's lock says nothing about the child)."""
    global _mark
    with _lock:
        if _mark is None or _mark[0] != os.getpid() or not _still_named(_mark[1], _mark[2]):
            if _mark is None:
                atexit.register(_remove_mark)
            name, fd = create_locked(LIVENESS_PREFIX, 0)
            _mark = (os.getpid(), name, fd)
        return _mark[1]


def _still_named(name: str, fd: int) -> bool:
    """Whether ``name`` still names this mark (a sweep after a long pause may have removed it)."""
    try:
        return os.stat(_DEV_SHM + name, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _remove_mark() -> None:
    """At a clean exit the mark goes at once; after a kill the server's sweep removes it."""
    if _mark is not None and _mark[0] == os.getpid() and _still_named(_mark[1], _mark[2]):
        try:
            os.unlink(_DEV_SHM + _mark[1])
        except OSError:
            pass


class LivenessWatch:
    """The server's view of one engine's mark."""

    def __init__(self, name: str) -> None:
        try:
            self._fd = open_checked(name, LIVENESS_PREFIX, os.O_RDONLY)
        except SegmentError as e:
            raise SegmentError(f"liveness mark: {e}") from e
        self.name = name
        self._dead = False

    def alive(self) -> bool:
        """False once the engine's process is gone (then it stays False)."""
        if self._dead:
            return False
        if not unlink_if_abandoned(self.name, self._fd):
            return True
        self._dead = True
        return False

    def __del__(self) -> None:
        # Closed only when nothing can ask any more: a closed watch must never read as "dead".
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
