"""L2: the tiers under L1, and the one place that moves chunks between them and L1.

- Write-through: every chunk committed to L1 is queued for each tier and written by one
  background thread, straight from L1 memory. A queued chunk holds a read lock, so L1 never
  evicts it before it is written; once written it is evictable like any other, and nothing an
  L1 eviction drops is lost while a tier holds it. The queue is bounded in bytes: a chunk that
  does not fit stays L1-only (counted), and a Store never waits for a disk.
- Prefetch: a Lookup asks the tiers, in order, for the chunks that follow the leading run in
  L1, stopping at the first chunk no tier holds; those are read into fresh L1 slots on a small
  thread pool. The Lookup waits for them until its deadline, then counts what is in L1; chunks
  that land later stay in L1 for the next request. Existence alone is never a hit.

A write whose read lock expired before it finished (a stalled disk) may have copied a slot
that was reused meanwhile: its file is deleted, never served.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass
from typing import Any

from lmcache.keys import CacheScope
from lmcache.log import init_logger
from lmcache.storage.l1 import L1Cache, LockHandle
from lmcache.storage.l2.chunk_file import scope_id
from lmcache.storage.l2.disk import DiskTier

logger = init_logger(__name__)

READ_THREADS = 4


@dataclass
class L2Counters:
    queued_chunks: int = 0
    dropped_writes: int = 0  # the queue was full: the chunk stayed L1-only
    expired_writes: int = 0  # the read lock expired under a write: the file was deleted
    prefetched_chunks: int = 0  # read from a tier into L1
    prefetch_failed: int = 0  # a tier read failed (absent, damaged): the run stops there
    deadline_expired: int = 0  # lookups that answered before all their reads landed


@dataclass
class _Write:
    handle: LockHandle
    nbytes: int


class L2:
    def __init__(self, tiers: Sequence[DiskTier], l1: L1Cache, queue_bytes: int, deadline_s: float,
                 chunk_size: int) -> None:
        self.tiers = list(tiers)
        self._l1 = l1
        self._queue_limit = queue_bytes
        self._deadline_s = deadline_s
        self._chunk_size = chunk_size
        self.counters = L2Counters()
        self.hit_chunks = {i: 0 for i in range(len(self.tiers))}  # per tier, landed before the deadline
        self._scope_ids: dict[CacheScope, bytes] = {}
        self._cond = threading.Condition()
        self._queue: deque[_Write] = deque()
        self._queued_bytes = 0
        self._writing = False
        self._stopping = False
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lmcache-l2-read")
        self._writer = threading.Thread(target=self._write_loop, name="lmcache-l2-write", daemon=True)
        self._writer.start()

    def scope_key(self, scope: CacheScope) -> bytes:
        key = self._scope_ids.get(scope)
        if key is None:
            if len(self._scope_ids) > 65536:  # scopes come from requests: keep the memo bounded
                self._scope_ids.clear()
            key = self._scope_ids[scope] = scope_id(scope)
        return key

    # --- write-through ------------------------------------------------------------------------

    def write_through(self, scope: CacheScope, hashes: Sequence[bytes]) -> None:
        """Queues chunks just committed to L1 for every tier (later chunks first, so a full tier
        evicts tails before the prefixes they depend on). Never blocks on I/O."""
        if not any(t.writable for t in self.tiers):
            return
        key = self.scope_key(scope)
        wanted = [h for h in reversed(hashes) if not all((key, h) in t for t in self.tiers)]
        if not wanted:
            return
        handles = self._l1.acquire(scope, wanted)
        dropped: list[LockHandle | None] = []
        with self._cond:
            for handle in handles:
                if handle is None:
                    continue  # evicted or cleared already
                nbytes = handle.obj.nbytes
                if self._queued_bytes + nbytes > self._queue_limit:
                    dropped.append(handle)
                    continue
                self._queue.append(_Write(handle, nbytes))
                self._queued_bytes += nbytes
                self.counters.queued_chunks += 1
            self.counters.dropped_writes += len(dropped)
            self._cond.notify()
        self._l1.release(dropped)

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                item = self._queue.popleft()
                self._writing = True
            try:
                self._write(item)
            except Exception:  # noqa: BLE001 - one bad write must not stop the writer
                logger.exception("L2 write failed")
            finally:
                with self._cond:
                    self._queued_bytes -= item.nbytes
                    self._writing = False
                    self._cond.notify_all()

    def _write(self, item: _Write) -> None:
        handle = item.handle
        obj = handle.obj
        if self._l1.renew([handle]) == 0:  # the lock expired while queued: the slot may hold another chunk
            self.counters.expired_writes += 1
            return
        key = self.scope_key(obj.scope)
        written = []
        view = self._l1.view(obj)
        try:
            for tier in self.tiers:
                if tier.writable and tier.put(obj.scope, key, obj.chunk_hash, self._chunk_size, view):
                    written.append(tier)
        finally:
            del view
            if self._l1.release([handle]) == 0:  # expired during the write: what was written may be wrong
                self.counters.expired_writes += 1
                for tier in written:
                    tier.delete(key, obj.chunk_hash)

    def drain(self, timeout_s: float) -> bool:
        """Waits until every queued write is done (tests, shutdown); True if it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # --- prefetch ----------------------------------------------------------------------------------

    def prefetch(self, scopes: Sequence[CacheScope], hashes: Sequence[bytes]) -> None:
        """Loads into L1 the chunks of each scope that follow its leading L1 run and that some
        tier holds, waiting for them until the prefetch deadline."""
        deadline = time.monotonic() + self._deadline_s
        reads: list[Future[bool]] = []
        for scope in scopes:
            reads += self._start_reads(scope, hashes)
        if not reads:
            return
        _, pending = futures_wait(reads, max(0.0, deadline - time.monotonic()))
        if pending:
            self.counters.deadline_expired += 1

    def would_load(self, scope: CacheScope, hashes: Sequence[bytes]) -> bool:
        """Whether ``prefetch`` would read anything for this scope (indexes only, no I/O)."""
        resident = self._l1.leading(scope, hashes)
        if resident == len(hashes):
            return False
        key = self.scope_key(scope)
        return any(t.payload_bytes(key, hashes[resident]) is not None for t in self.tiers)

    def _start_reads(self, scope: CacheScope, hashes: Sequence[bytes]) -> list[Future[bool]]:
        resident = self._l1.leading(scope, hashes)
        if resident == len(hashes):
            return []
        key = self.scope_key(scope)
        run: list[tuple[bytes, int]] = []  # (hash, tier index), the leading run some tier holds
        size = None
        for h in hashes[resident:]:
            found = next(((i, n) for i, t in enumerate(self.tiers) if (n := t.payload_bytes(key, h)) is not None), None)
            if found is None or (size is not None and found[1] != size):
                break
            size = found[1]
            run.append((h, found[0]))
        if not run or size is None:
            return []
        reservation = self._l1.reserve(scope, [h for h, _ in run], size)
        return [
            self._reads.submit(self._read, key, h, tier, handle)
            for (h, tier), handle in zip(run, reservation.handles, strict=True)
            if handle is not None
        ]

    def _read(self, key: bytes, chunk_hash: bytes, tier: int, handle: LockHandle) -> bool:
        ok = False
        try:
            view = self._l1.view(handle.obj)
            try:
                ok = self.tiers[tier].get(key, chunk_hash, view)
            finally:
                del view
        finally:
            self._l1.commit([handle], ok)
        if ok:
            self.counters.prefetched_chunks += 1
            self.hit_chunks[tier] += 1
        else:
            self.counters.prefetch_failed += 1
        return ok

    # --- admin ------------------------------------------------------------------------------

    def clear(self) -> int:
        return sum(t.clear() for t in self.tiers)

    def status(self) -> dict[str, Any]:
        with self._cond:
            queue = {"queue_chunks": len(self._queue), "queue_bytes": self._queued_bytes,
                     "queue_limit_bytes": self._queue_limit}
        return {
            "tiers": [t.status() | {"hit_chunks": self.hit_chunks[i]} for i, t in enumerate(self.tiers)],
            **queue,
            "prefetch_deadline_ms": round(self._deadline_s * 1000, 3),
            **asdict(self.counters),
        }

    def close(self, drain_s: float = 5.0) -> None:
        """Finishes the queued writes (up to ``drain_s``), then stops; the rest stay L1-only."""
        self.drain(drain_s)
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._l1.release([w.handle for w in left])
        self._writer.join(drain_s)
        self._reads.shutdown(wait=True, cancel_futures=True)
