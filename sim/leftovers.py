"""What a process the simulator started may leave in /dev/shm when it is killed.

LMCache names every file it creates there after its creator's pid (lmcache/transfer/shm.py): an
engine's KV segments (``lmcache_kv_<pid>_...``, briefly, during registration: a 16 GiB one if the
engine dies there), its liveness mark (``lmcache_live_<pid>_...``) and a server's L1 arena
(``lmcache_l1_<pid>``). The server sweeps orphans, but not after it has stopped itself; so once a
process of ours is gone, we remove its files by its pid.
"""

from __future__ import annotations

import os

from lmcache.transfer.shm import ARENA_PREFIX, LIVENESS_PREFIX, SEGMENT_PREFIX

DEV_SHM = "/dev/shm"
PREFIXES = tuple(p.lstrip("/") for p in (SEGMENT_PREFIX, LIVENESS_PREFIX, ARENA_PREFIX))


def created_by(entry: str, pid: int) -> bool:
    """Whether the /dev/shm entry is one of LMCache's, created by ``pid``."""
    for prefix in PREFIXES:
        if entry.startswith(prefix):
            rest = entry[len(prefix):]
            return rest == str(pid) or rest.startswith(f"{pid}_")
    return False


def remove_files_of(pid: int) -> list[str]:
    """Unlinks the LMCache files in /dev/shm that ``pid`` created; call it only once ``pid`` has exited."""
    try:
        entries = os.listdir(DEV_SHM)
    except OSError:
        return []
    removed = []
    for entry in entries:
        if created_by(entry, pid):
            try:
                os.unlink(os.path.join(DEV_SHM, entry))
                removed.append(entry)
            except FileNotFoundError:
                pass  # its owner removed it meanwhile
    return removed
