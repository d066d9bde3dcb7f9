"""Eviction policies (LRU, S3-FIFO, ARC, ARC-LONG, 2Q-LONG): each on its own under 100k random operations with its
invariants checked, and each inside a real L1Cache over a real pool: locked chunks are never
victims, a prompt's tail goes before its prefix, clear() forgets everything, and the policy's
own point (S3-FIFO: chunks stored once leave first; ARC: a re-stored chunk's ghost counts; 2Q-LONG:
a chunk that came back outlives a flood, and a protected one unused for long gets a probation).
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from lmcache.config import ConfigError, EvictionPolicy, ServerConfig
from lmcache.storage.eviction import POLICIES, ARCPolicy, Long2QPolicy, Policy, S3FIFOPolicy
from lmcache.storage.l1 import L1Cache
from test_l1 import OBJ, SCOPE, Clock, hashes, look, store

ALL = list(EvictionPolicy)


class Item:
    """A stand-in for an L1 object: a fresh object each time its key is stored."""

    def __init__(self, key: int) -> None:
        self.key = key


@pytest.mark.parametrize("name", ALL)
def test_100k_random_operations_keep_every_invariant(name: EvictionPolicy) -> None:
    policy = POLICIES[name](lambda item: item.key)  # type: ignore[attr-defined]
    rng = random.Random(7)
    evictable: dict[Hashable, None] = {}
    locked: set[Hashable] = set()
    live_keys: set[int] = set()
    for step in range(100_000):
        op = rng.random()
        if op < 0.35:  # a store (keys repeat: evicted chunks come back)
            key = rng.randrange(2_000)
            if key in live_keys:
                continue
            item = Item(key)
            live_keys.add(key)
            policy.add(item)
            evictable[item] = None
        elif op < 0.55 and evictable:  # a retrieve locks ...
            item = rng.choice(list(evictable)) if len(evictable) < 64 else next(iter(evictable))
            policy.remove(item)
            del evictable[item]
            locked.add(item)
        elif op < 0.75 and locked:  # ... and releases
            item = locked.pop()
            policy.add(item)
            evictable[item] = None
        elif op < 0.97:  # room is needed
            victim = policy.victim()
            if not evictable:
                assert victim is None
                continue
            assert victim in evictable, "a victim must be evictable (never locked, never gone)"
            policy.forget(victim, evicted=True)
            del evictable[victim]
            live_keys.discard(victim.key)  # type: ignore[attr-defined]
        elif op < 0.9999 and evictable:  # dropped (a failed write, a clear of one chunk)
            item = next(iter(evictable))
            policy.forget(item)
            del evictable[item]
            live_keys.discard(item.key)  # type: ignore[attr-defined]
        else:
            policy.clear()
            evictable.clear()
            locked.clear()
            live_keys.clear()
        assert len(policy) == len(evictable)
        if step % 997 == 0 and hasattr(policy, "check"):
            policy.check()


def make_l1(clock: Clock, name: EvictionPolicy, slots: int = 8) -> L1Cache:
    from lmcache._fast.pool import MemoryPool

    return L1Cache(MemoryPool(slots * OBJ, slab_bytes=slots * OBJ, prefault=False), POLICIES[name], 30.0, clock)


@pytest.mark.parametrize("name", ALL)
def test_locked_chunks_are_never_evicted(name: EvictionPolicy) -> None:
    l1 = make_l1(Clock(), name)
    stored = hashes(8)
    store(l1, stored)
    count, handles = look(l1, SCOPE, stored[:7], lock=True)
    assert count == 7
    for i in range(20):  # every store must take the one unlocked slot, over and over
        store(l1, hashes(1, 1000 + 16 * i))
        assert look(l1, SCOPE, stored[:7])[0] == 7
    l1.release(handles)


@pytest.mark.parametrize("name", ALL)
def test_a_prompts_tail_goes_before_its_prefix(name: EvictionPolicy) -> None:
    l1 = make_l1(Clock(), name)
    prompt = hashes(8)
    store(l1, prompt)
    store(l1, hashes(1, 5000))  # one eviction
    assert look(l1, SCOPE, prompt)[0] == 7  # the last chunk went, the prefix stays


@pytest.mark.parametrize("name", ALL)
def test_clear_forgets_everything(name: EvictionPolicy) -> None:
    l1 = make_l1(Clock(), name)
    store(l1, hashes(8))
    l1.clear()
    assert look(l1, SCOPE, hashes(8))[0] == 0
    store(l1, hashes(8, 900))
    assert look(l1, SCOPE, hashes(8, 900))[0] == 8 and l1.stats()["evictions"] == 0
    for policy in l1._policies.values():
        if hasattr(policy, "check"):
            policy.check()


def test_s3fifo_lets_one_time_chunks_pass_and_keeps_the_reused_ones() -> None:
    l1 = make_l1(Clock(), EvictionPolicy.S3FIFO, slots=10)
    hot = hashes(2)
    store(l1, hot)
    _, handles = look(l1, SCOPE, hot, lock=True)  # read once: promoted when it reaches S's end
    l1.release(handles)
    for i in range(40):  # a flood of chunks stored once and never read
        store(l1, hashes(1, 10_000 + 16 * i))
    assert look(l1, SCOPE, hot)[0] == 2


def test_arc_remembers_an_evicted_chunk_and_keeps_it_when_it_returns() -> None:
    policy = ARCPolicy(lambda item: item.key)  # type: ignore[attr-defined]
    items = [Item(k) for k in range(4)]
    for item in items:
        policy.add(item)
    for item in items[2:]:  # used again (a retrieve locks, then releases): T2
        policy.remove(item)
        policy.add(item)
    assert policy.victim() is items[0]  # T1's oldest; its key goes to B1
    policy.forget(items[0], evicted=True)
    again = Item(0)
    policy.add(again)  # stored again: its ghost says T1 was too small, and it goes to T2
    assert policy.p > 0
    assert policy.victim() is items[2]  # T1 is within its target now: T2's oldest goes, the returning chunk stays
    policy.check()


def stored_and_evicted(policy: Policy, key: int) -> None:
    """A chunk stored into an empty policy and evicted at once: its key is in the ghost list."""
    first = Item(key)
    policy.add(first)
    assert policy.victim() is first
    policy.forget(first, evicted=True)


def test_s3fifo_sends_a_chunk_stored_again_from_the_ghost_to_main() -> None:
    policy = S3FIFOPolicy(lambda item: item.key)  # type: ignore[attr-defined]
    stored_and_evicted(policy, 1)
    again, fresh = Item(1), Item(2)
    policy.add(again)
    policy.add(fresh)
    assert policy.victim() is fresh  # S is over its share: the new one goes, the returning one stays
    policy.check()


def test_2q_long_protects_chunks_that_came_back_or_were_read_from_a_flood_of_new_ones() -> None:
    policy = Long2QPolicy(lambda item: item.key)  # type: ignore[attr-defined]
    stored_and_evicted(policy, 0)
    others = [Item(k) for k in range(1, 31)]
    for item in others:
        policy.add(item)
    for item in others[:20]:  # probation is a FIFO
        assert policy.victim() is item
        policy.forget(item, evicted=True)
    again = Item(0)
    policy.add(again)  # its key is in the ghost list: it came back, so it is protected
    read = others[-1]
    policy.remove(read)  # a retrieve locks ...
    policy.add(read)  # ... and releases: used while on probation, so protected too
    for key in range(100, 300):  # a flood of chunks stored once and never read
        policy.add(Item(key))
        victim = policy.victim()
        assert victim is not again and victim is not read
        policy.forget(victim, evicted=True)
        policy.check()


def test_2q_long_steers_its_probation_by_near_misses_only() -> None:
    policy = Long2QPolicy(lambda item: item.key)  # type: ignore[attr-defined]
    items = [Item(k) for k in range(100)]
    for item in items:
        policy.add(item)
    floor = policy._clamped(100)  # the minimum share: 10 items
    assert floor == pytest.approx(10)
    victim = policy.victim()
    policy.forget(victim, evicted=True)
    policy.add(Item(victim.key))  # type: ignore[attr-defined]  # back at once: a bigger P would have kept it
    assert policy._clamped(100) == pytest.approx(floor + 1)
    for _ in range(50):  # 50 evictions ...
        policy.forget(policy.victim(), evicted=True)
    far = next(reversed(policy._ghost))
    for _ in range(40):
        policy.forget(policy.victim(), evicted=True)
    policy.add(Item(far))  # ... then back after 40 more: far beyond P's size, no steer
    assert policy._clamped(100) == pytest.approx(floor + 1)
    policy.check()


def test_2q_long_demotes_the_least_recent_protected_chunk_to_a_last_probation() -> None:
    policy = Long2QPolicy(lambda item: item.key)  # type: ignore[attr-defined]
    old, recent = Item(1), Item(2)
    for item in (old, recent):  # both used once: protected, old the least recent
        policy.add(item)
        policy.remove(item)
        policy.add(item)
    assert policy.victim() is old  # probation was empty: old was demoted to it, and is next
    policy.remove(old)  # ... but it is read before it goes:
    policy.add(old)  # protected again, now the most recent
    assert policy.victim() is recent
    policy.check()


@pytest.mark.parametrize("value", ["s3fifo", "ARC", "lru", "arc-long", "2q-long"])
def test_the_flag_takes_every_policy_in_any_case(value: str) -> None:
    assert ServerConfig(l1_size_gb=0.01, eviction_policy=value).eviction_policy.value == value.upper()


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ConfigError):
        ServerConfig(l1_size_gb=0.01, eviction_policy="MRU")
