"""L1Cache: chunk key -> object in the memory pool, with object states, locks and eviction.

An object's life::

    absent --reserve--> WRITING --commit(ok)--> READY <--lock/release--> READY, read-locked (n)
                           \\--commit(failed) or TTL--> absent

- WRITING objects are being filled: lookups never see them, and a second store of the same
  key finds the key taken, so concurrent stores write a chunk once.
- Read locks are counted. Only READY objects without readers are in the eviction policy, so
  nothing locked or half-written is ever evicted.
- Every lock (write or read) expires after ``lock_ttl_s``: a client that dies cannot pin
  memory. A lock is held through a ``LockHandle``; a handle from before an expiry is stale,
  and releasing it does nothing.
- A *held* reservation is one whose slot an engine writes into itself, by raw offset
  (lmcache_driven). Its write lock expires like any other (the chunk leaves the index, and a
  later store may reserve the key again), but its memory is kept, as an *orphan*, until
  ``release_held`` says the engine is done with it or gone: an engine that is only paused must
  never write into a slot that meanwhile holds someone else's chunk.
- ``clear()`` drops every object at once. Objects that are being copied (WRITING, or READY
  with readers) leave the index immediately but keep their memory until the copy ends
  (commit, release or TTL), so a slot is never reused under a running copy.

One lock guards everything here; byte copies happen outside it, between reserve and commit
(stores) or between acquire and release (retrieves).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from lmcache._fast.pool import MemoryPool, slot_size
from lmcache.keys import HASH_BYTES, CacheScope
from lmcache.storage.eviction import KeyOf, Policy

# The expiry heap is rebuilt from the live locks once it holds more than this many entries (or
# twice the live ones, whichever is more).
_MIN_HEAP_LIMIT = 1 << 16


class State(enum.Enum):
    WRITING = "writing"
    READY = "ready"
    ORPHANED = "orphaned"  # a held reservation whose write lock expired: out of the index


@dataclass(eq=False, slots=True)
class L1Object:
    scope: CacheScope
    chunk_hash: bytes
    offset: int
    nbytes: int
    state: State
    readers: int = 0
    epoch: int = 0  # bumped whenever outstanding locks stop counting (expiry, free)
    deadline: float = 0.0  # when the current locks expire
    detached: bool = False  # out of the index (cleared) but its memory is still under a copy
    held: bool = False  # an engine writes into it by raw offset: freed only by release_held


def _object_key(obj: Hashable) -> Hashable:
    """What stays the same when a chunk is evicted and stored again (for ghost lists)."""
    o = cast(L1Object, obj)
    return (o.scope, o.chunk_hash)


class LockHandle(NamedTuple):
    obj: L1Object
    epoch: int


class Reservation(NamedTuple):
    """Result of ``reserve``: one handle per requested hash (None where nothing is to be written)."""

    handles: list[LockHandle | None]
    present: int  # already stored or being stored by someone else
    skipped: int  # no room even after evicting


@dataclass
class L1Counters:
    hits: int = 0  # chunks found by lookups
    misses: int = 0  # chunks looked up and not found
    stored: int = 0  # objects committed
    evictions: int = 0
    skipped_stores: int = 0
    expired_locks: int = 0
    failed_writes: int = 0
    orphaned: int = 0  # held reservations whose write lock expired before their engine was done


@dataclass
class TenantUsage:
    """One cache salt's share of L1. Kept while it holds bytes or has a quota."""

    used_bytes: int = 0  # its objects' bytes, WRITING ones included
    objects: int = 0
    hits: int = 0  # chunks its lookups found
    stored: int = 0
    quota_skipped: int = 0  # chunks not stored because its quota was full of locked chunks


class L1Cache:
    # Read locks held at once, over all objects and sessions. Each costs memory for up to a lock
    # TTL, so a flood of locking lookups must not grow without bound; past it a lookup counts
    # only what it could lock (a miss, never a wrong answer).
    max_read_locks = 1 << 21

    def __init__(
        self,
        pool: MemoryPool,
        new_policy: Callable[[KeyOf], Policy],
        lock_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self._new_policy = new_policy
        self._ttl = lock_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._index: dict[CacheScope, dict[bytes, L1Object]] = {}
        # One policy per slot size and tenant (cache salt): evicting an object of the size a
        # store needs frees exactly the slot it needs (other sizes are evicted only to free
        # whole slabs), and the tenant holding the most gives first, so one tenant cannot push
        # the others out.
        self._policies: dict[int, dict[str, Policy]] = {}
        self._tenants: dict[str, TenantUsage] = {}
        self._quotas: dict[str, int] = {}  # cache salt -> bytes it may hold
        self.default_quota: int | None = None  # for salts without one of their own
        # Which tenant gives next: the most over its quota, else the one holding the most. A lazy
        # heap of (not over, -used bytes, seq, salt), so an eviction costs O(log tenants), not a
        # walk over thousands of salts under the lock: an entry is pushed whenever a tenant's
        # rank rises (a reservation, a quota); one whose rank fell since (a free) is found out of
        # date when it comes up, and pushed again as it is now.
        self._ranking: list[tuple[bool, int, int, str]] = []
        self._ranked_default: int | None = None  # the default quota the ranking was made with
        self._expiries: list[tuple[float, int, LockHandle]] = []
        self._heap_limit = _MIN_HEAP_LIMIT
        self._orphans: dict[L1Object, None] = {}  # held reservations whose lock expired
        self._seq = itertools.count()
        # Figures kept as they change, so /status and /metrics never walk the index.
        self._ready = 0  # READY objects in the index
        self._writing = 0  # WRITING objects, detached ones included
        self._read_locked = 0  # READY objects with readers, detached ones included
        self._used_bytes = 0  # object bytes held, detached objects included
        self._read_locks = 0  # read locks held, over all objects: at most max_read_locks
        self.counters = L1Counters()

    # --- stores ---------------------------------------------------------------------------

    def reserve(self, scope: CacheScope, hashes: Sequence[bytes], nbytes: int, held: bool = False) -> Reservation:
        """Write-locks a new WRITING object of ``nbytes`` for every hash not yet present (``held``:
        an engine copies into it by raw offset; see the module's docstring)."""
        handles: list[LockHandle | None] = []
        present = skipped = 0
        with self._lock:
            now = self._expire()
            table = self._index.setdefault(scope, {})
            for h in hashes:
                if h in table:
                    present += 1
                    handles.append(None)
                    continue
                offset = self._alloc(nbytes, scope.salt)
                if offset < 0:
                    skipped += 1
                    handles.append(None)
                    continue
                obj = L1Object(scope, h, offset, nbytes, State.WRITING, held=held)
                table[h] = obj
                self._writing += 1
                self._used_bytes += nbytes
                tenant = self._tenant(scope.salt)
                tenant.used_bytes += nbytes
                tenant.objects += 1
                self._rank(scope.salt)
                handles.append(self._take_lock(obj, now))
            self.counters.skipped_stores += skipped
        return Reservation(handles, present, skipped)

    def commit(self, handles: Sequence[LockHandle | None], ok: bool | Sequence[bool] = True) -> int:
        """Publishes written objects (or drops them where ``ok`` is false); returns how many."""
        oks = [ok] * len(handles) if isinstance(ok, bool) else list(ok)
        published = 0
        with self._lock:
            # Later chunks first: within a prompt, earlier chunks end up more recently used, so
            # eviction takes tails before the prefixes they depend on.
            for handle, good in zip(reversed(handles), reversed(oks), strict=True):
                if handle is None or handle.epoch != handle.obj.epoch:
                    continue  # nothing reserved, or the write lock already expired
                obj = handle.obj
                assert obj.state is State.WRITING, obj.state
                if good and not obj.detached:
                    obj.state = State.READY
                    obj.epoch += 1
                    self._writing -= 1
                    self._ready += 1
                    self._policy(obj).add(obj)
                    self.counters.stored += 1
                    self._tenant(obj.scope.salt).stored += 1
                    published += 1
                else:
                    self.counters.failed_writes += not good
                    self._drop(obj)
        return published

    # --- lookups and retrieves --------------------------------------------------------------

    def lookup(self, scope: CacheScope, hashes: bytes, lock: bool = False) -> tuple[int, list[LockHandle]]:
        """How many leading chunks of ``hashes`` (concatenated 16-byte hashes) are READY, never
        counting past the first missing one. With ``lock``, each counted chunk is read-locked
        and its handle returned.

        A lookup alone is not a use: the LRU order changes when chunks are stored, retrieved,
        or released from a lookup's lock. That keeps the lookup a pure read, which is what
        makes it cheap.
        """
        found: list[L1Object] = []
        with self._lock:
            now = self._expire()
            table = self._index.get(scope)
            if table is not None:
                get, ready, append = table.get, State.READY, found.append
                for start in range(0, len(hashes), HASH_BYTES):
                    obj = get(hashes[start : start + HASH_BYTES])
                    if obj is None or obj.state is not ready:
                        break
                    append(obj)
            if lock and self._read_locks + len(found) > self.max_read_locks:
                del found[max(0, self.max_read_locks - self._read_locks) :]  # the rest counts as a miss
            count = len(found)
            self.counters.hits += count
            if count:
                self._tenant(scope.salt).hits += count
            self.counters.misses += len(hashes) // HASH_BYTES - count
            handles = [self._take_lock(obj, now) for obj in found] if lock else []
        return count, handles

    def leading(self, scope: CacheScope, hashes: Sequence[bytes]) -> int:
        """How many leading chunks are READY; no lock taken, nothing counted (for L2's prefetch)."""
        with self._lock:
            table = self._index.get(scope, {})
            count = 0
            for h in hashes:
                obj = table.get(h)
                if obj is None or obj.state is not State.READY:
                    break
                count += 1
        return count

    def acquire(self, scope: CacheScope, hashes: Sequence[bytes]) -> list[LockHandle | None]:
        """Read-locks each READY chunk for a retrieve; None where a chunk is not available."""
        out: list[LockHandle | None] = []
        with self._lock:
            now = self._expire()
            table = self._index.get(scope, {})
            for h in hashes:
                obj = table.get(h)
                if obj is not None and obj.state is State.READY and self._read_locks < self.max_read_locks:
                    out.append(self._take_lock(obj, now))
                else:
                    out.append(None)
        return out

    def release(self, handles: Sequence[LockHandle | None]) -> int:
        """Gives back read locks; stale handles are ignored. Returns how many were released."""
        released = 0
        with self._lock:
            for handle in reversed(handles):  # later chunks first, as in commit()
                if handle is None or handle.epoch != handle.obj.epoch:
                    continue
                obj = handle.obj
                if obj.state is not State.READY or obj.readers == 0:
                    continue
                obj.readers -= 1
                self._read_locks -= 1
                released += 1
                if obj.readers == 0:
                    self._unlocked(obj)
            self._expire()
        return released

    def release_held(self, handles: Sequence[LockHandle | None]) -> int:
        """The engine that was handed these reservations is done with them (it committed, or it
        is gone): frees those that were orphaned. Returns how many."""
        freed = 0
        with self._lock:
            self._expire()  # locks past their deadline become orphans first
            for handle in handles:
                if handle is None:
                    continue
                obj = handle.obj
                if obj in self._orphans:
                    del self._orphans[obj]
                    self._free(obj)
                    freed += 1
                elif obj.held and obj.state is State.WRITING and handle.epoch == obj.epoch:
                    self._drop(obj)  # never committed, and its engine is gone: nothing to publish
                    freed += 1
        return freed

    def renew(self, handles: Sequence[LockHandle | None]) -> int:
        """Pushes the expiry of still-valid locks a TTL further (locks under a GPU copy that
        is queued behind a slow engine: their memory must not be reused under it)."""
        renewed = 0
        with self._lock:
            now = self._expire()
            for handle in handles:
                if handle is None or handle.epoch != handle.obj.epoch:
                    continue
                obj = handle.obj
                if obj.state is State.WRITING or obj.readers:
                    obj.deadline = max(obj.deadline, now + self._ttl)
                    self._schedule(obj, handle)
                    renewed += 1
        return renewed

    def view(self, obj: L1Object) -> memoryview:
        """The object's bytes; only for the holder of one of its locks."""
        return self.pool.view(obj.offset, obj.nbytes)

    # --- admin ------------------------------------------------------------------------------

    def clear(self) -> int:
        """Drops every object; those under a copy keep their memory until the copy ends."""
        with self._lock:
            dropped = 0
            for table in self._index.values():
                for obj in table.values():
                    dropped += 1
                    if obj.state is State.WRITING or obj.readers:
                        obj.detached = True
                    else:
                        self._free(obj)
            self._index.clear()
            self._ready = 0
            for tenants in self._policies.values():
                for policy in tenants.values():
                    policy.clear()
            return dropped

    def set_quota(self, salt: str, limit_bytes: int | None) -> None:
        """Caps what one cache salt may hold (None: back to the default). A tenant over its
        quota evicts its own chunks on its next stores; others are not touched."""
        with self._lock:
            if limit_bytes is None:
                self._quotas.pop(salt, None)
                tenant = self._tenants.get(salt)
                if tenant is not None and tenant.objects == 0:
                    del self._tenants[salt]
                elif tenant is not None:
                    self._rank(salt)  # back on the default quota, it may be over it now
            else:
                self._quotas[salt] = limit_bytes
                self._tenant(salt)
                self._rank(salt)

    def quotas(self) -> dict[str, int]:
        with self._lock:
            return dict(self._quotas)

    def tenants(self, top: int) -> dict[str, Any]:
        """Usage of the ``top`` tenants holding the most, and of the rest summed (bounded output
        however many salts there are)."""
        with self._lock:
            ranked = sorted(self._tenants.items(), key=lambda kv: kv[1].used_bytes, reverse=True)
            rest = TenantUsage()
            for _, usage in ranked[top:]:
                for field, value in vars(usage).items():
                    setattr(rest, field, getattr(rest, field) + value)
            return {
                "top": [{"salt": salt, "quota_bytes": self._limit(salt), **vars(usage)}
                        for salt, usage in ranked[:top]],
                "others": {"tenants": max(0, len(ranked) - top), **vars(rest)},
            }

    def snapshot(self) -> list[L1Object]:
        """Every object in the index (for checks and debugging; O(n))."""
        with self._lock:
            return [obj for table in self._index.values() for obj in table.values()]

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            return {
                "objects": self._ready,
                "writing": self._writing,
                "read_locked": self._read_locked,
                "used_bytes": self._used_bytes,
                "orphans": len(self._orphans),
                **vars(self.counters),
            }

    # --- internals (lock held) --------------------------------------------------------------

    def _policy(self, obj: L1Object) -> Policy:
        tenants = self._policies.setdefault(slot_size(obj.nbytes), {})
        policy = tenants.get(obj.scope.salt)
        if policy is None:
            policy = tenants[obj.scope.salt] = self._new_policy(_object_key)
        return policy

    def _tenant(self, salt: str) -> TenantUsage:
        tenant = self._tenants.get(salt)
        if tenant is None:
            tenant = self._tenants[salt] = TenantUsage()
            if len(self._tenants) == 2:  # the one that was alone was not ranked
                for other in self._tenants:
                    self._rank(other)
        return tenant

    def _used_by(self, salt: str) -> int:
        tenant = self._tenants.get(salt)
        return tenant.used_bytes if tenant is not None else 0

    def _limit(self, salt: str) -> int | None:
        """The bytes a salt may hold: its own quota, else the default (None: no limit)."""
        return self._quotas.get(salt, self.default_quota)

    def _take_lock(self, obj: L1Object, now: float) -> LockHandle:
        if obj.state is State.READY:
            if obj.readers == 0:
                self._policy(obj).remove(obj)
                self._read_locked += 1
            obj.readers += 1
            self._read_locks += 1
        obj.deadline = max(obj.deadline, now + self._ttl)
        handle = LockHandle(obj, obj.epoch)
        self._schedule(obj, handle)
        return handle

    def _schedule(self, obj: L1Object, handle: LockHandle) -> None:
        """Queues the expiry of ``obj``'s locks at its deadline. Entries of released or renewed
        locks stay in the heap until their time; when they outnumber the live ones, the heap
        is rebuilt from the live ones, so it stays proportional to the locks actually held."""
        heap = self._expiries
        heapq.heappush(heap, (obj.deadline, next(self._seq), handle))
        if len(heap) > self._heap_limit:
            live: dict[int, tuple[float, int, LockHandle]] = {}
            for entry in heap:
                o, epoch = entry[2]
                if epoch == o.epoch and entry[0] == o.deadline:
                    live[id(o)] = entry
            self._expiries = heap = list(live.values())
            heapq.heapify(heap)
            self._heap_limit = max(_MIN_HEAP_LIMIT, 2 * len(heap))

    def _expire(self) -> float:
        now = self._clock()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, _, (obj, epoch) = heapq.heappop(heap)
            if obj.epoch != epoch or obj.deadline > now:
                continue  # released already, or re-locked later
            if obj.state is State.WRITING:
                self.counters.expired_locks += 1
                if obj.held:
                    self._orphan(obj)
                else:
                    self._drop(obj)
            elif obj.readers:
                self.counters.expired_locks += obj.readers
                self._read_locks -= obj.readers
                obj.readers = 0
                self._unlocked(obj)
        return now

    def _unlocked(self, obj: L1Object) -> None:
        """The last read lock went: stale handles stop counting; free it or make it evictable."""
        obj.epoch += 1
        self._read_locked -= 1
        if obj.detached:
            self._free(obj)
        else:
            self._policy(obj).add(obj)

    def _alloc(self, nbytes: int, salt: str) -> int:
        slot = slot_size(nbytes)
        limit = self._limit(salt)
        if limit is not None:  # over its quota, a tenant evicts its own chunks first
            while self._used_by(salt) + nbytes > limit:
                victim_obj = self._own_victim(slot, salt)
                if victim_obj is None:
                    # Counted for a salt that has a record; never a record made for it: a store
                    # that keeps nothing must leave nothing (salts come from requests).
                    tenant = self._tenants.get(salt)
                    if tenant is not None:
                        tenant.quota_skipped += 1
                    return -1
                self._evict(cast(L1Object, victim_obj))
        offset = self.pool.alloc(nbytes)
        while offset < 0:
            victim_obj = self._victim(self._policies.get(slot, {}))
            if victim_obj is None:
                # Nothing of this size to evict: free objects of the size holding the most, until
                # one of its slabs empties and can change size.
                everyone = [p for tenants in self._policies.values() for p in tenants.values()]
                donor = max(everyone, key=len, default=None)
                victim_obj = donor.victim() if donor is not None else None
                if victim_obj is None:
                    return -1
            self._evict(cast(L1Object, victim_obj))  # the policies hold only this cache's objects
            offset = self.pool.alloc(nbytes)
        return offset

    def _victim(self, tenants: dict[str, Policy]) -> object | None:
        """The next victim, among ``tenants`` (the policies of one slot size), of the tenant most
        over its quota, else of the one holding the most."""
        if len(tenants) == 1:  # one candidate (the common case: one tenant): nothing to rank
            (only,) = tenants.values()
            return only.victim() if len(only) else None
        if self._ranked_default != self.default_quota:  # every tenant without a quota moved
            self._ranked_default = self.default_quota
            self._rerank()
        heap, aside, victim = self._ranking, [], None
        while heap:
            not_over, minus_used, _, salt = heap[0]
            if salt not in self._tenants or self._entry(salt)[:2] != (not_over, minus_used):
                heapq.heappop(heap)  # out of date: ranked again as it is now (if it still is)
                if salt in self._tenants:
                    heapq.heappush(heap, self._entry(salt))
                continue
            policy = tenants.get(salt)
            if policy is not None and len(policy):
                victim = policy.victim()
                break
            aside.append(heapq.heappop(heap))  # nothing of this size to give now: kept for later
        for entry in aside:
            heapq.heappush(heap, entry)
        return victim

    def _own_victim(self, slot: int, salt: str) -> object | None:
        """A tenant's next victim to stay within its quota: of the slot size it needs if it has
        one, else of any other size (all its bytes count against its quota)."""
        own = self._policies.get(slot, {}).get(salt)
        victim = own.victim() if own is not None else None
        for tenants in self._policies.values():
            if victim is not None:
                break
            other = tenants.get(salt)
            victim = other.victim() if other is not None else None
        return victim

    def _entry(self, salt: str) -> tuple[bool, int, int, str]:
        used, limit = self._used_by(salt), self._limit(salt)
        return (not (limit is not None and used > limit), -used, next(self._seq), salt)

    def _rank(self, salt: str) -> None:
        """Ranks a tenant whose rank may have risen (lock held). Alone, it needs no rank."""
        if len(self._tenants) < 2:
            return
        heapq.heappush(self._ranking, self._entry(salt))
        if len(self._ranking) > 2 * len(self._tenants) + 1024:  # out-of-date entries: rebuilt, amortized O(1)
            self._rerank()

    def _rerank(self) -> None:
        self._ranking = [self._entry(salt) for salt in self._tenants]
        heapq.heapify(self._ranking)

    def _evict(self, obj: L1Object) -> None:
        assert obj.state is State.READY and obj.readers == 0 and not obj.detached
        del self._index[obj.scope][obj.chunk_hash]
        self._ready -= 1
        self._free(obj, evicted=True)
        self.counters.evictions += 1

    def _orphan(self, obj: L1Object) -> None:
        """Out of the index, its memory kept until release_held: an engine may still write it."""
        self._unindex(obj)
        obj.detached = True
        obj.epoch += 1  # the engine's commit no longer publishes it
        obj.state = State.ORPHANED
        self._writing -= 1
        self._orphans[obj] = None
        self.counters.orphaned += 1

    def _drop(self, obj: L1Object) -> None:
        """Removes an object from the index (if still there) and frees it."""
        self._unindex(obj)
        self._free(obj)

    def _unindex(self, obj: L1Object) -> None:
        if not obj.detached:
            table = self._index.get(obj.scope)
            if table is not None and table.get(obj.chunk_hash) is obj:
                del table[obj.chunk_hash]

    def _free(self, obj: L1Object, evicted: bool = False) -> None:
        if obj.state is State.WRITING:
            self._writing -= 1
        self._policy(obj).forget(obj, evicted)
        salt = obj.scope.salt
        tenant = self._tenants.get(salt)
        if tenant is not None:
            tenant.used_bytes -= obj.nbytes
            tenant.objects -= 1
            if tenant.objects == 0 and salt not in self._quotas:  # salts come from requests: keep this bounded
                del self._tenants[salt]
                for tenants in self._policies.values():
                    tenants.pop(salt, None)
        obj.epoch += 1
        obj.detached = True
        self._used_bytes -= obj.nbytes
        self.pool.free(obj.offset, obj.nbytes)
