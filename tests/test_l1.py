"""L1Cache over a real pool: states, locks, TTLs, LRU eviction, salts and clearing."""

from __future__ import annotations

import pytest

from lmcache._fast.pool import MemoryPool
from lmcache.keys import CacheScope, prompt_hashes, split_hashes
from lmcache.storage.eviction import LRUPolicy
from lmcache.storage.l1 import L1Cache

OBJ = 64 * 1024
SCOPE = CacheScope("model", 1, 0, "fmt")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_l1(clock: Clock, slots: int = 8) -> L1Cache:
    # One slab of exactly `slots` objects.
    return L1Cache(MemoryPool(slots * OBJ, slab_bytes=slots * OBJ, prefault=False), LRUPolicy, 30.0, clock)


def hashes(n: int, start: int = 0) -> list[bytes]:
    return split_hashes(prompt_hashes(list(range(start, start + 16 * n)), 16))


def look(l1: L1Cache, scope: CacheScope, hs: list[bytes], lock: bool = False) -> tuple[int, list]:
    return l1.lookup(scope, b"".join(hs), lock)


def store(l1: L1Cache, hs: list[bytes], scope: CacheScope = SCOPE, fill: int = 7) -> None:
    res = l1.reserve(scope, hs, OBJ)
    for h in res.handles:
        if h is not None:
            l1.view(h.obj)[:] = bytes([fill]) * OBJ
    l1.commit(res.handles)


def test_a_writing_object_is_invisible_and_written_once(clock: Clock) -> None:
    l1 = make_l1(clock)
    hs = hashes(2)
    res = l1.reserve(SCOPE, hs, OBJ)
    assert res.present == 0 and res.skipped == 0
    assert look(l1, SCOPE, hs) == (0, [])
    again = l1.reserve(SCOPE, hs, OBJ)
    assert again.handles == [None, None] and again.present == 2
    assert l1.commit(res.handles) == 2
    assert look(l1, SCOPE, hs)[0] == 2
    assert l1.stats()["objects"] == 2 and l1.stats()["writing"] == 0


def test_lookup_counts_leading_chunks_only(clock: Clock) -> None:
    l1 = make_l1(clock)
    hs = hashes(4)
    store(l1, [hs[0], hs[1], hs[3]])
    assert look(l1, SCOPE, hs)[0] == 2
    assert look(l1, SCOPE, hs[2:])[0] == 0


def test_failed_commit_frees_the_slot(clock: Clock) -> None:
    l1 = make_l1(clock)
    res = l1.reserve(SCOPE, hashes(1), OBJ)
    assert l1.pool.allocated_bytes == OBJ
    assert l1.commit(res.handles, ok=False) == 0
    assert l1.pool.allocated_bytes == 0
    assert look(l1, SCOPE, hashes(1))[0] == 0
    assert l1.stats()["failed_writes"] == 1


def test_lru_evicts_the_least_recently_used(clock: Clock) -> None:
    l1 = make_l1(clock, slots=3)
    a, b, c, d = hashes(4)
    for h in (a, b, c):  # three requests, oldest first
        store(l1, [h])
    l1.release(l1.acquire(SCOPE, [a]))  # a retrieve: a is now the most recent
    store(l1, [d])
    assert look(l1, SCOPE, [b])[0] == 0
    for h in (a, c, d):
        assert look(l1, SCOPE, [h])[0] == 1
    assert l1.stats()["evictions"] == 1


def test_a_lookup_alone_does_not_reorder(clock: Clock) -> None:
    l1 = make_l1(clock, slots=3)
    a, b, c, d = hashes(4)
    store(l1, [a, b, c])  # one request: earlier chunks count as more recent, so c goes first
    assert look(l1, SCOPE, [c])[0] == 1
    store(l1, [d])
    assert look(l1, SCOPE, [c])[0] == 0
    assert look(l1, SCOPE, [a, b])[0] == 2


def test_read_locked_objects_are_never_evicted(clock: Clock) -> None:
    l1 = make_l1(clock, slots=2)
    a, b, c, d = hashes(4)
    store(l1, [a, b])
    count, handles = look(l1, SCOPE, [a], lock=True)
    assert count == 1
    store(l1, [c])  # evicts b, the only unlocked one
    assert look(l1, SCOPE, [a])[0] == 1 and look(l1, SCOPE, [b])[0] == 0
    look(l1, SCOPE, [c], lock=True)
    res = l1.reserve(SCOPE, [d], OBJ)  # everything is locked: skipped, not blocked
    assert res.skipped == 1 and res.handles == [None]
    assert l1.stats()["skipped_stores"] == 1
    assert l1.release(handles) == 1
    store(l1, [d])  # a is evictable again
    assert look(l1, SCOPE, [a])[0] == 0 and look(l1, SCOPE, [d])[0] == 1


def test_locks_expire_after_the_ttl(clock: Clock) -> None:
    l1 = make_l1(clock, slots=1)
    a, b = hashes(2)
    store(l1, [a])
    _, handles = look(l1, SCOPE, [a], lock=True)
    assert l1.reserve(SCOPE, [b], OBJ).skipped == 1
    clock.now += 31
    assert l1.stats()["read_locked"] == 0 and l1.stats()["expired_locks"] == 1
    assert l1.release(handles) == 0  # stale handle: nothing happens
    store(l1, [b])
    assert look(l1, SCOPE, [b])[0] == 1


def test_a_dead_writer_leaves_nothing_after_the_ttl(clock: Clock) -> None:
    l1 = make_l1(clock)
    res = l1.reserve(SCOPE, hashes(3), OBJ)
    clock.now += 31
    stats = l1.stats()
    assert stats["writing"] == 0 and stats["used_bytes"] == 0 and l1.pool.allocated_bytes == 0
    assert l1.commit(res.handles) == 0  # too late: the handles are stale
    assert look(l1, SCOPE, hashes(3))[0] == 0


def test_salts_and_ranks_isolate(clock: Clock) -> None:
    l1 = make_l1(clock)
    tenant_a = CacheScope("model", 2, 0, "fmt", salt="A")
    store(l1, hashes(2), tenant_a)
    assert look(l1, tenant_a, hashes(2))[0] == 2
    assert look(l1, CacheScope("model", 2, 0, "fmt", salt="B"), hashes(2))[0] == 0
    assert look(l1, tenant_a.for_rank(1), hashes(2))[0] == 0
    assert look(l1, CacheScope("model", 2, 0, "other-format", salt="A"), hashes(2))[0] == 0


def test_clear_keeps_memory_under_copies_until_they_end(clock: Clock) -> None:
    l1 = make_l1(clock, slots=4)
    a, b, c, d = hashes(4)
    store(l1, [a, b])
    read = l1.acquire(SCOPE, [a])
    write = l1.reserve(SCOPE, [c], OBJ)
    assert l1.clear() == 3
    assert look(l1, SCOPE, [a, b])[0] == 0
    assert l1.pool.allocated_bytes == 2 * OBJ  # a (being read) and c (being written) stay
    # New stores get other slots, never the ones under a copy.
    fresh = l1.reserve(SCOPE, [d], OBJ)
    busy = {read[0].obj.offset, write.handles[0].obj.offset}
    assert fresh.handles[0].obj.offset not in busy
    assert l1.commit(write.handles) == 0  # cleared while written: not published
    assert l1.release(read) == 1
    l1.commit(fresh.handles)
    assert l1.pool.allocated_bytes == OBJ
    assert l1.stats()["used_bytes"] == OBJ


def test_retrieve_locks_only_ready_chunks(clock: Clock) -> None:
    l1 = make_l1(clock)
    a, b, c = hashes(3)
    store(l1, [a], fill=1)
    l1.reserve(SCOPE, [b], OBJ)
    got = l1.acquire(SCOPE, [a, b, c])
    assert got[1] is None and got[2] is None
    assert bytes(l1.view(got[0].obj)) == b"\x01" * OBJ
    assert l1.release(got) == 1


def test_renewed_locks_outlive_the_ttl_and_stale_ones_are_not_renewed(clock: Clock) -> None:
    """Locks under a GPU copy held up by a slow engine are renewed, so their memory is never
    reused under the copy; a lock that was already given back is not brought back."""
    l1 = make_l1(clock)
    writing = l1.reserve(SCOPE, hashes(1), OBJ).handles
    store(l1, hashes(1, start=100) + hashes(1, start=200))
    reading = l1.acquire(SCOPE, hashes(1, start=100))
    done = l1.acquire(SCOPE, hashes(1, start=200))
    assert l1.release(done) == 1
    for _ in range(3):
        clock.now += 20
        assert l1.renew(writing + reading + done) == 2
    assert l1.stats()["writing"] == 1 and l1.stats()["read_locked"] == 1 and l1.stats()["expired_locks"] == 0
    assert l1.commit(writing) == 1 and l1.release(reading) == 1
    clock.now += 31
    assert l1.renew(writing + reading) == 0


def test_a_held_reservation_outlives_its_lock_until_released(clock: Clock) -> None:
    """An engine writing by raw offset (lmcache_driven) that overstays the TTL: the key leaves
    the index, but the slot is never reused until release_held says the engine is done."""
    l1 = make_l1(clock, slots=4)
    hs = hashes(2)
    res = l1.reserve(SCOPE, hs, OBJ, held=True)
    offsets = {h.obj.offset for h in res.handles}
    clock.now += 31
    assert l1.stats()["orphans"] == 2 and l1.stats()["writing"] == 0
    # Every other slot fills and is evicted over and over: the orphans' slots are never handed out.
    for round_ in range(3):
        for i in range(6):
            new = l1.reserve(SCOPE, hashes(1, start=1000 * (round_ * 10 + i + 1)), OBJ)
            assert all(h is None or h.obj.offset not in offsets for h in new.handles)
            l1.commit(new.handles)
    assert l1.commit(res.handles) == 0  # the late commit publishes nothing ...
    assert l1.stats()["orphans"] == 2  # ... and frees nothing by itself
    assert l1.release_held(res.handles) == 2
    assert l1.release_held(res.handles) == 0  # once only
    stats = l1.stats()
    assert (stats["orphans"], stats["used_bytes"]) == (0, stats["objects"] * OBJ)
    assert look(l1, SCOPE, hs)[0] == 0


def test_a_held_reservation_committed_in_time_is_published(clock: Clock) -> None:
    l1 = make_l1(clock)
    res = l1.reserve(SCOPE, hashes(2), OBJ, held=True)
    assert l1.commit(res.handles) == 2
    assert l1.release_held(res.handles) == 0
    assert look(l1, SCOPE, hashes(2))[0] == 2
    clock.now += 100
    assert l1.stats()["orphans"] == 0 and look(l1, SCOPE, hashes(2))[0] == 2


def test_read_locks_are_capped(clock: Clock) -> None:
    l1 = make_l1(clock)
    l1.max_read_locks = 5
    store(l1, hashes(3))
    assert look(l1, SCOPE, hashes(3), lock=True)[0] == 3
    count, handles = look(l1, SCOPE, hashes(3), lock=True)
    assert count == 2  # the cap: only two more locks could be taken
    assert look(l1, SCOPE, hashes(3), lock=True)[0] == 0
    assert look(l1, SCOPE, hashes(3))[0] == 3  # a plain lookup still sees them
    l1.release(handles)
    assert look(l1, SCOPE, hashes(3), lock=True)[0] == 2
    clock.now += 31  # expiry gives every lock back
    assert look(l1, SCOPE, hashes(3), lock=True)[0] == 3


def test_a_held_reservation_of_a_dead_engine_is_freed_even_before_anything_expired_it(clock: Clock) -> None:
    # Nothing touched L1 between the lock's deadline and the engine's death being noticed:
    # release_held must still free it (it once found no orphan and freed nothing, for ever).
    l1 = make_l1(clock)
    res = l1.reserve(SCOPE, hashes(3), OBJ, held=True)
    clock.now += 31
    assert l1.release_held(res.handles) == 3
    stats = l1.stats()
    assert (stats["orphans"], stats["writing"], stats["used_bytes"]) == (0, 0, 0)
    # ... and, engine gone before its lock expired, its reservations go too.
    res = l1.reserve(SCOPE, hashes(2, start=500), OBJ, held=True)
    assert l1.release_held(res.handles) == 2
    assert l1.stats()["used_bytes"] == 0 and look(l1, SCOPE, hashes(2, start=500))[0] == 0


def test_the_expiry_heap_stays_proportional_to_the_locks_held(clock: Clock) -> None:
    l1 = make_l1(clock)
    store(l1, hashes(4))
    for _ in range(100_000):  # lock and release, again and again, within one TTL
        _, handles = look(l1, SCOPE, hashes(4), lock=True)
        l1.release(handles)
    assert len(l1._expiries) <= 2 * 65536 + 8


def test_stores_that_keep_nothing_leave_no_tenant_record(clock: Clock) -> None:
    """Salts come from requests: a store that keeps nothing (its chunk larger than the default
    quota, or L1 full of chunks being written) must not leave a record per salt behind."""
    l1 = make_l1(clock, slots=2)
    l1.default_quota = OBJ // 2  # smaller than one chunk: every store is skipped
    for i in range(100):
        store(l1, hashes(1, 16 * i), CacheScope("model", 1, 0, "fmt", f"salt-{i}"))
    assert l1.stats()["used_bytes"] == 0 and l1.tenants(10)["others"]["tenants"] == 0 and not l1.tenants(10)["top"]
    l1.default_quota = 100 * OBJ  # a sane one, larger than L1
    busy = l1.reserve(SCOPE, hashes(2, 5000), OBJ).handles  # L1 full of chunks being written
    for i in range(100):
        assert l1.reserve(CacheScope("model", 1, 0, "fmt", f"late-{i}"), hashes(1, 16 * i), OBJ).skipped == 1
    l1.commit(busy)
    assert [t["salt"] for t in l1.tenants(10)["top"]] == [""] and l1.tenants(10)["others"]["tenants"] == 0


def test_the_tenant_that_gives_is_always_the_one_most_over_its_quota_else_holding_the_most(
        clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The victim's tenant comes from a lazy heap (an eviction must not walk every salt); checked
    against a walk over all of them at every eviction, under random stores, locks, quotas."""
    import random

    l1 = make_l1(clock, slots=16)
    chosen = L1Cache._victim
    checked = []

    def checked_victim(self: L1Cache, tenants: dict) -> object | None:
        def rank(salt: str) -> tuple[bool, int]:
            used, limit = self._used_by(salt), self._limit(salt)
            return (limit is not None and used > limit, used)

        best = max((rank(s) for s, p in tenants.items() if len(p)), default=None)
        victim = chosen(self, tenants)
        assert (victim is None) == (best is None)
        if victim is not None:
            assert rank(victim.scope.salt) == best  # type: ignore[attr-defined]
            checked.append(best)
        return victim

    monkeypatch.setattr(L1Cache, "_victim", checked_victim)
    rng = random.Random(5)
    scopes = [CacheScope("model", 1, 0, "fmt", f"t{i}") for i in range(12)]
    held: list = []
    for step in range(3000):
        scope = rng.choice(scopes)
        roll = rng.random()
        if roll < 0.05:
            l1.set_quota(scope.salt, rng.choice([None, OBJ, 2 * OBJ, 4 * OBJ]))
        elif roll < 0.15:
            held += look(l1, scope, hashes(rng.randrange(1, 4), 16 * rng.randrange(40)), lock=True)[1]
        elif roll < 0.25 and held:
            l1.release([held.pop(rng.randrange(len(held)))])
        elif roll < 0.27:
            l1.default_quota = rng.choice([None, 3 * OBJ])
        else:
            store(l1, hashes(rng.randrange(1, 4), 16 * rng.randrange(40)), scope)
    assert len(checked) > 500


def test_a_tenant_at_its_quota_makes_room_from_its_chunks_of_another_size(clock: Clock) -> None:
    """All of a tenant's bytes count against its quota, so at its quota a store of another chunk
    size (another model, the same salt) evicts its chunks of any size, not only of that one."""
    l1 = L1Cache(MemoryPool(16 * OBJ, slab_bytes=4 * OBJ, prefault=False), LRUPolicy, 30.0, clock)
    l1.set_quota("t", 2 * OBJ)
    store(l1, hashes(2), CacheScope("model", 1, 0, "fmt", "t"))  # at its quota
    other_model = CacheScope("model-2", 1, 0, "fmt", "t")
    res = l1.reserve(other_model, hashes(1, 500), OBJ // 2)
    assert res.skipped == 0 and l1.commit(res.handles) == 1
    usage = l1.tenants(1)["top"][0]
    assert usage["used_bytes"] == OBJ + OBJ // 2 and usage["quota_skipped"] == 0


def test_a_tenant_put_back_on_a_smaller_default_quota_gives_first(clock: Clock) -> None:
    l1 = make_l1(clock, slots=9)
    a, b, c = (CacheScope("model", 1, 0, "fmt", salt) for salt in "abc")
    l1.default_quota = 2 * OBJ
    l1.set_quota("a", 100 * OBJ)
    l1.set_quota("b", 100 * OBJ)
    store(l1, hashes(3, 0), a)
    store(l1, hashes(6, 1000), b)  # L1 full
    store(l1, hashes(1, 5000), c)  # b, holding the most, gives
    l1.set_quota("a", None)  # a is over the default now (3 chunks, 2 allowed): it gives next
    store(l1, hashes(1, 6000), c)
    assert {t["salt"]: t["objects"] for t in l1.tenants(10)["top"]} == {"a": 2, "b": 5, "c": 2}
