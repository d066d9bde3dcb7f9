"""How much memory this machine (or container) can give the L1 pool."""

from __future__ import annotations

import os
from pathlib import Path

GIB = 1 << 30
# Left for the server process itself (Python, ZMQ buffers, Sanic) beyond the pool.
HEADROOM_BYTES = 256 << 20


class InsufficientMemoryError(MemoryError):
    pass


def available_memory_bytes() -> int:
    """MemAvailable, capped by the cgroup limit when the process runs in a limited container."""
    available = _meminfo_available()
    cgroup = _cgroup_headroom()
    return min(available, cgroup) if cgroup is not None else available


def shm_free_bytes() -> int:
    stat = os.statvfs("/dev/shm")
    return stat.f_bavail * stat.f_frsize


def check_fits(nbytes: int, what: str, shm: bool = False) -> None:
    available = available_memory_bytes()
    if nbytes + HEADROOM_BYTES > available:
        raise InsufficientMemoryError(
            f"{what} asks for {nbytes / GIB:.1f} GiB but only {available / GIB:.1f} GiB of memory "
            f"is available on this machine; use a smaller size"
        )
    if shm and nbytes > (free := shm_free_bytes()):
        raise InsufficientMemoryError(
            f"{what} asks for {nbytes / GIB:.1f} GiB but /dev/shm has only {free / GIB:.1f} GiB free; "
            f"enlarge /dev/shm (docker: --ipc host or --shm-size) or start with --no-l1-shm"
        )


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_headroom() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return int(limit) - current
    except (OSError, ValueError):
        return None
