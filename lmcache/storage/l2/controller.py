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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from lmcache.keys import CacheScope
from lmcache.log import init_logger
from lmcache.storage.l1 import L1Cache, LockHandle
from lmcache.storage.l2.chunk_file import scope_id
from lmcache.storage.l2.tier import Outgoing, Tier, TierClearError

logger = init_logger(__name__)

READ_THREADS = 4
# Chunks one lookup loads from L2 at most, per rank; a longer run is loaded by the next lookups.
MAX_PREFETCH_CHUNKS = 1024
# Chunks written to the tiers in one go (one round trip to a shared tier): at most this many ...
WRITE_BATCH_CHUNKS = 32
# ... and this many bytes (a Redis transaction holds them all in the server's query buffer).
WRITE_BATCH_BYTES = 64 << 20
# Chunks waiting to be read; past this a lookup loads nothing more (a miss beats a queue).
MAX_READ_BACKLOG = 4096


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
    def __init__(self, tiers: Sequence[Tier], l1: L1Cache, queue_bytes: int, deadline_s: float,
                 chunk_size: int) -> None:
        self.tiers = list(tiers)
        self._l1 = l1
        # Queued chunks cannot be evicted: a quarter of L1 at most, so a slow disk never leaves
        # a Store without room.
        self._queue_limit = min(queue_bytes, l1.pool.size // 4)
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
        self._counting = threading.Lock()  # counters and the read backlog, bumped from many threads
        self._backlog = 0
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
        if self._stopping or not any(t.writable for t in self.tiers):
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
                batch = [self._queue.popleft()]  # one batch: one round trip per shared tier
                size = batch[0].nbytes
                while self._queue and len(batch) < WRITE_BATCH_CHUNKS and size + self._queue[0].nbytes <= WRITE_BATCH_BYTES:
                    size += self._queue[0].nbytes
                    batch.append(self._queue.popleft())
                self._writing = True
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - one bad write must not stop the writer
                logger.exception("L2 write failed")
            finally:
                with self._cond:
                    self._queued_bytes -= size
                    self._writing = False
                    self._cond.notify_all()

    def _write(self, batch: list[_Write]) -> None:
        live = []
        for item in batch:
            if self._l1.renew([item.handle]) == 0:  # expired while queued: the slot may hold another chunk
                self.counters.expired_writes += 1
            else:
                live.append(item.handle)
        if not live:
            return
        views = [self._l1.view(h.obj) for h in live]
        written: list[list[Tier]] = [[] for _ in live]
        try:
            # Asked again once the bytes have left L1, before anyone can read them: a lock still
            # valid then proves the slot was never reused during the copy.
            chunks = [
                Outgoing(h.obj.scope, self.scope_key(h.obj.scope), h.obj.chunk_hash, self._chunk_size, view,
                         partial(_still_locked, self._l1, h))
                for h, view in zip(live, views, strict=True)
            ]
            for tier in self.tiers:
                if tier.writable:
                    for i, ok in enumerate(tier.put_many(chunks)):
                        if ok:
                            written[i].append(tier)
        finally:
            del views
            for handle, tiers in zip(live, written, strict=True):
                if self._l1.release([handle]) == 0:  # expired during the write: what was written may be wrong
                    self.counters.expired_writes += 1
                    for tier in tiers:
                        tier.delete(self.scope_key(handle.obj.scope), handle.obj.chunk_hash)

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

    def prefetch(self, scopes: Sequence[CacheScope], hashes: Sequence[bytes],
                 object_bytes: Callable[[CacheScope], int | None]) -> None:
        """Loads into L1 the chunks of each scope that follow its leading L1 run and that some
        tier holds, waiting for them until the prefetch deadline. ``object_bytes(scope)`` is the
        size of that scope's chunks (None: no engine of it is registered, nothing to load)."""
        deadline = time.monotonic() + self._deadline_s
        runs = [self._start_reads(scope, hashes, object_bytes(scope)) for scope in scopes]
        reads = [future for run in runs for future, _ in run]
        if not reads:
            return
        _, pending = futures_wait(reads, max(0.0, deadline - time.monotonic()))
        if pending:
            self.counters.deadline_expired += 1
        with self._counting:  # hits: per scope, the leading reads that landed in time
            for run in runs:
                for future, tier in run:
                    if not future.done() or future.cancelled() or not future.result():
                        break
                    self.hit_chunks[tier] += 1

    def would_load(self, scope: CacheScope, hashes: Sequence[bytes]) -> bool:
        """Whether ``prefetch`` would read anything for this scope (indexes only, no I/O)."""
        resident = self._l1.leading(scope, hashes)
        if resident == len(hashes):
            return False
        key = self.scope_key(scope)
        return any(t.may_hold(key, hashes[resident]) for t in self.tiers)

    def _start_reads(self, scope: CacheScope, hashes: Sequence[bytes], size: int | None) -> list[tuple[Future[bool], int]]:
        if size is None or self._backlog >= MAX_READ_BACKLOG:
            return []  # nobody could load it, or the disk is far behind: a miss beats a wait
        resident = self._l1.leading(scope, hashes)
        if resident == len(hashes):
            return []
        key = self.scope_key(scope)
        wanted = hashes[resident : resident + MAX_PREFETCH_CHUNKS]
        run = list(zip(wanted, self._holders(key, wanted, size), strict=True))  # (hash, tier index)
        run = run[: next((i for i, (_, tier) in enumerate(run) if tier < 0), len(run))]
        if not run:
            return []
        # The reservations below may evict: never the leading run this lookup is counting on.
        pinned = self._l1.acquire(scope, hashes[:resident])
        try:
            # Held: if a slow read outlives its write lock, the slot is orphaned, not reused.
            reservation = self._l1.reserve(scope, [h for h, _ in run], size, held=True)
        finally:
            self._l1.release(pinned)
        reads = []
        for (h, tier), handle in zip(run, reservation.handles, strict=True):
            if handle is None:
                continue  # stored meanwhile, or no room
            with self._counting:
                self._backlog += 1
            future = self._reads.submit(self._read, key, h, tier, handle)
            future.add_done_callback(partial(self._if_cancelled, handle))
            reads.append((future, tier))
        return reads

    def _holders(self, key: bytes, hashes: Sequence[bytes], size: int) -> list[int]:
        """For each chunk, the first tier that holds it at the scope's chunk size, or -1. Each
        tier is asked once, for the chunks the tiers before it lack (a chunk of another size
        cannot be this scope's: it is deleted as damaged)."""
        holders = [-1] * len(hashes)
        for i, tier in enumerate(self.tiers):
            todo = [j for j, t in enumerate(holders) if t < 0]
            if not todo:
                break
            for j, found in zip(todo, tier.held(key, [hashes[j] for j in todo]), strict=True):
                if found == size:
                    holders[j] = i
                elif found is not None:
                    tier.delete(key, hashes[j], damaged=True)
        return holders

    def _read(self, key: bytes, chunk_hash: bytes, tier: int, handle: LockHandle) -> bool:
        ok = False
        try:
            if self._l1.renew([handle]) == 0:
                return False  # its write lock expired while it waited: the slot is an orphan
            view = self._l1.view(handle.obj)
            try:
                ok = self.tiers[tier].get(key, chunk_hash, view)
            finally:
                del view
        finally:
            self._l1.commit([handle], ok)  # a no-op if the lock expired meanwhile ...
            self._l1.release_held([handle])  # ... and then the orphaned slot is freed here
            with self._counting:
                self._backlog -= 1
                if ok:
                    self.counters.prefetched_chunks += 1
                else:
                    self.counters.prefetch_failed += 1
        return ok

    def _if_cancelled(self, handle: LockHandle, future: Future[bool]) -> None:
        """A read cancelled before it ran (shutdown): its reservation goes."""
        if not future.cancelled():
            return
        self._l1.commit([handle], False)
        self._l1.release_held([handle])
        with self._counting:
            self._backlog -= 1

    # --- admin ------------------------------------------------------------------------------

    def clear(self) -> int:
        """Empties every tier; the writes still queued are dropped first (their chunks are
        being cleared from L1 too)."""
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._queued_bytes -= sum(w.nbytes for w in left)
            while self._writing:
                self._cond.wait()
        self._l1.release([w.handle for w in left])
        dropped, failed = 0, []
        for tier in self.tiers:  # every tier is tried, whichever failed before it
            try:
                dropped += tier.clear()
            except TierClearError as e:
                failed.append(str(e))
        if failed:
            raise TierClearError("; ".join(failed))
        return dropped

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
        # Reads write into L1 memory, so they must be over before L1 is: the tiers are closed
        # first, which fails every call still in flight (a stalled network read included).
        self._reads.shutdown(wait=False, cancel_futures=True)
        for tier in self.tiers:
            tier.close()
        self._reads.shutdown(wait=True)
        self._writer.join(drain_s)  # it reads L1 memory: a send it was stalled in fails now


def _still_locked(l1: L1Cache, handle: LockHandle) -> bool:
    return l1.renew([handle]) > 0
