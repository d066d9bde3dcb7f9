"""CacheEngine semantics (in-process, real pool) and its Lookup/lock messages over real ZMQ."""

from __future__ import annotations

import random
import threading
import time

import pytest

from lmcache import protocol as p
from lmcache._fast.pool import MemoryPool, slot_size
from lmcache.client import MPClient, ServerError
from lmcache.config import ServerConfig
from lmcache.keys import CacheScope, prompt_hashes, split_hashes
from lmcache.server.engine import CacheEngine, StoreResult
from lmcache.server.errors import RequestError
from lmcache.storage.l1 import State

OBJ = 16 * 1024
SCOPE = CacheScope("m", world_size=2, rank=0, page_format="f")


@pytest.fixture
def engine():
    config = ServerConfig(l1_size_gb=64 * OBJ / (1 << 30), port=1, http_port=2)
    eng = CacheEngine(config, MemoryPool(64 * OBJ, slab_bytes=16 * OBJ, prefault=False))
    eng.start()
    yield eng
    eng.close()


def prompt(n_chunks: int, seed: int = 0) -> bytes:
    return prompt_hashes(random.Random(seed).choices(range(50_000), k=16 * n_chunks), 16)


def pattern(h: bytes, nbytes: int) -> bytes:
    return h * (nbytes // len(h))


def store(engine: CacheEngine, scope: CacheScope, hashes: bytes) -> int:
    res = engine.begin_store(scope, hashes, OBJ)
    for handle in res.handles:
        if handle is not None:
            engine.l1.view(handle.obj)[:] = pattern(handle.obj.chunk_hash, OBJ)
    return engine.end_store(res.handles)


def test_store_then_lookup_and_retrieve_bytes(engine: CacheEngine) -> None:
    hashes = prompt(4)
    assert engine.lookup(SCOPE, hashes) == 0
    assert store(engine, SCOPE, hashes) == 4
    assert engine.lookup(SCOPE, hashes) == 4
    handles = engine.begin_retrieve(SCOPE, hashes)
    for h, handle in zip(split_hashes(hashes), handles):
        assert bytes(engine.l1.view(handle.obj)) == pattern(h, OBJ)
    assert engine.end_retrieve(handles) == 4


def test_lookup_for_all_ranks_counts_chunks_every_rank_has(engine: CacheEngine) -> None:
    hashes = prompt(4)
    store(engine, SCOPE, hashes)
    store(engine, SCOPE.for_rank(1), hashes[: 2 * 16])
    assert engine.lookup(SCOPE, hashes) == 4
    assert engine.lookup(SCOPE, hashes, all_ranks=True) == 2
    assert engine.lookup(SCOPE, hashes, all_ranks=True, lock=True, session="req-1") == 2
    stats = engine.status()["l1"]
    assert stats["read_locked"] == 4  # two chunks on each rank; nothing past the count
    assert engine.status()["sessions"]["active"] == 1
    assert engine.release_locks("req-1", hashes[:16]) == 2  # chunk 0 on both ranks
    assert engine.end_session("req-1") == 2
    assert engine.status()["l1"]["read_locked"] == 0
    assert engine.status()["sessions"]["active"] == 0


def test_bad_requests_are_refused(engine: CacheEngine) -> None:
    with pytest.raises(RequestError, match="16-byte"):
        engine.lookup(SCOPE, b"x" * 15)
    with pytest.raises(RequestError, match="rank 2"):
        engine.lookup(CacheScope("m", 2, 2), prompt(1))
    with pytest.raises(RequestError, match="session"):
        engine.lookup(SCOPE, prompt(1), lock=True)
    with pytest.raises(RequestError, match="does not fit"):
        engine.begin_store(SCOPE, prompt(1), 1 << 30)
    assert engine.status()["l1"]["allocated_bytes"] == 0


def test_concurrent_stores_lookups_and_clears_keep_bytes_and_accounting_right(engine: CacheEngine) -> None:
    prompts = [prompt(6, seed) for seed in range(40)]  # more than fits: eviction runs too
    errors: list[str] = []
    stop = time.monotonic() + 2.0

    def storer(seed: int) -> None:
        rng = random.Random(seed)
        stores = 0
        while time.monotonic() < stop:
            store(engine, SCOPE, rng.choice(prompts))
            stores += 1
            if seed == 0 and stores % 20 == 0:
                engine.clear()  # with lookups and retrieves holding locks in other threads

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        session = f"reader-{seed}"
        while time.monotonic() < stop:
            hashes = rng.choice(prompts)
            n = engine.lookup(SCOPE, hashes, lock=True, session=session)
            handles = engine.begin_retrieve(SCOPE, hashes[: 16 * n])
            for h, handle in zip(split_hashes(hashes[: 16 * n]), handles):
                if handle is not None and bytes(engine.l1.view(handle.obj)) != pattern(h, OBJ):
                    errors.append(f"wrong bytes for {h.hex()}")
            engine.end_retrieve(handles)
            engine.end_session(session)

    threads = [threading.Thread(target=storer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:5]
    objects = engine.l1.snapshot()
    assert all(o.state is State.READY for o in objects)
    for obj in objects:
        assert bytes(engine.l1.view(obj)) == pattern(obj.chunk_hash, OBJ)
    stats = engine.status()["l1"]
    assert stats["writing"] == 0 and stats["read_locked"] == 0
    assert stats["objects"] == len(objects)
    assert stats["used_bytes"] == len(objects) * OBJ
    assert stats["allocated_bytes"] == len(objects) * slot_size(OBJ)
    assert stats["evictions"] > 0 and stats["clears"] > 0


# --- over ZMQ -------------------------------------------------------------------------------


def test_lookup_and_locks_over_zmq(client: MPClient) -> None:
    hashes = prompt(3)
    assert client.lookup(SCOPE, hashes) == 0
    assert client.lookup(SCOPE, hashes, all_ranks=True, lock=True, session="s") == 0
    assert client.release_locks("s") == 0
    assert client.end_session("s") == 0
    status = client.status()
    assert status["l1"]["misses"] >= 6


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (p.Lookup(SCOPE, b"short"), "16-byte"),
        (p.Lookup(CacheScope("m", 1, 3), b""), "rank 3"),
        (p.Lookup(SCOPE, b"", lock=True), "session"),
        (p.ReleaseLocks("s", b"abc"), "16-byte"),
    ],
)
def test_bad_lookups_get_bad_request_errors(client: MPClient, request_: p.Request, text: str) -> None:
    with pytest.raises(ServerError) as info:
        client.submit(request_).result()
    assert info.value.code == p.ErrorCode.BAD_REQUEST
    assert text in info.value.message
    assert client.ping() == p.Pong()


def _register(engine: CacheEngine, instance_id: str):
    from lmcache.transfer.layouts import describe
    from lmcache.transfer.liveness import process_mark
    from lmcache.testing.vllm_like import make_kv

    layout, _ = describe(make_kv("LBHNC", "float16"))
    spec = p.RegisterKVCache(instance_id, "m", 1, 0, layout, [], p.TransferMode.LMCACHE_DRIVEN, liveness=process_mark())
    return engine.register_kv_cache(spec)


@pytest.fixture
def eng():
    """An engine for lmcache_driven registrations of make_kv's tiny model."""
    engine = CacheEngine(ServerConfig(l1_size_gb=0.01, port=1, http_port=2, chunk_size=64))
    yield engine
    engine.close()


def test_registrations_are_bounded(eng: CacheEngine, monkeypatch) -> None:
    from lmcache.server import registry

    monkeypatch.setattr(registry, "MAX_ENGINES", 3)
    for i in range(3):
        _register(eng, f"e{i}")
    with pytest.raises(RequestError, match="3 engines are registered already"):
        _register(eng, "one-too-many")
    _register(eng, "e1")  # an engine registering again is not a new one
    eng.unregister_kv_cache("e0")
    _register(eng, "now-there-is-room")
    assert len(eng.status()["engines"]) == 3


def test_a_prepare_that_holds_nothing_leaves_no_ticket(eng: CacheEngine) -> None:
    _register(eng, "e")
    for i in range(1000):  # a flood of misses must not grow anything
        grant = eng.prepare_retrieve("e", prompt(1, seed=i))
        assert (grant.ticket, grant.offsets) == (0, [])
    assert eng.status()["tickets"]["open"] == 0
    assert eng.finish_retrieve(0) == 0
    hashes = prompt(2, seed=5)
    ticket, offsets, present, skipped = eng.prepare_store("e", hashes)
    assert ticket != 0 and all(o >= 0 for o in offsets)
    assert eng.commit_store(ticket, [True, True])[0] == 2
    again = eng.prepare_store("e", hashes)  # both present: nothing reserved
    assert again[0] == 0 and again[2] == 2
    assert eng.commit_store(0, [False, False]) == StoreResult(0, 0, 0)
    assert eng.status()["tickets"]["open"] == 0


def test_one_engine_that_prepares_and_never_commits_holds_at_most_half_of_l1(eng: CacheEngine) -> None:
    """A store's slots stay its engine's until it commits or dies (it writes them by raw offset),
    so an engine that prepares and never commits, alive, would otherwise take all of L1 for good."""
    _register(eng, "stuck")
    _register(eng, "other")
    obj, size = eng.registry.get("stuck").object_bytes, eng.l1.pool.size
    granted = 0
    for i in range(size // obj + 10):  # one chunk at a time, never committed
        granted += sum(o >= 0 for o in eng.prepare_store("stuck", prompt(1, seed=i)).offsets)
    assert 0 < granted * obj <= CacheEngine.MAX_HELD_SHARE * size
    beyond = eng.prepare_store("stuck", prompt(3, seed=99_999))  # one offset per chunk asked, all refused
    assert (beyond.ticket, beyond.offsets, beyond.skipped) == (0, [-1, -1, -1], 3)
    hashes = prompt(4, seed=100_000)  # the other engine stores as before
    ticket, offsets, _, _ = eng.prepare_store("other", hashes)
    assert all(o >= 0 for o in offsets) and eng.commit_store(ticket, [True] * 4)[0] == 4
    eng.MAX_HELD_SHARE = 2.5 * obj / size  # room for two chunks of three: the prompt's tail is not stored
    partial = eng.prepare_store("other", prompt(3, seed=100_001))
    assert partial.offsets[2] == -1 and min(partial.offsets[:2]) >= 0 and partial.skipped == 1
    assert eng.commit_store(partial.ticket, [True] * 3)[0] == 2  # a commit answers every chunk asked


def test_a_ticket_is_only_its_engines_and_never_guessable(eng: CacheEngine) -> None:
    _register(eng, "a")
    _register(eng, "b")
    ticket, offsets, _, _ = eng.prepare_store("b", prompt(2, seed=9))
    assert ticket > 1 << 20  # random, not 1, 2, 3 ... (a replaced server's tickets must not match)
    with pytest.raises(RequestError, match="unknown or expired"):
        eng.commit_store(ticket, [True, True], instance_id="a")  # another engine's ticket
    assert eng.commit_store(ticket, [True, True], instance_id="b")[0] == 2


def test_locks_of_abandoned_requests_go_after_the_ttl_while_others_keep_locking_the_chunk() -> None:
    """L1 expires an object's read locks once all of them are past the TTL, which a chunk that
    others keep locking never is: the locks of requests abandoned with it (a session never ended,
    a retrieve never finished: an aborted request, a killed engine) must go when their session or
    ticket is swept, else they pile up on the hottest chunks for good."""
    engine = CacheEngine(ServerConfig(l1_size_gb=0.01, port=1, http_port=2, chunk_size=64, lock_ttl_s=0.2))
    try:
        _register(engine, "e")
        scope, hashes = CacheScope("m", 1, 0, ""), prompt(1, seed=7)
        ticket = engine.prepare_store("e", hashes)[0]
        assert engine.commit_store(ticket, [True])[0] == 1
        for i in range(20):
            assert engine.lookup(scope, hashes, lock=True, session=f"abandoned-{i}") == 1
            assert engine.prepare_retrieve("e", hashes).ticket != 0
        assert engine.status()["tickets"]["open"] == 20

        def only_the_busy_client_locks() -> bool:  # which locks and unlocks the chunk all along
            assert engine.lookup(scope, hashes, lock=True, session="busy") == 1
            engine.end_session("busy")
            grant = engine.prepare_retrieve("e", hashes)
            assert grant.ticket != 0 and engine.finish_retrieve(grant.ticket, "e") == 1
            status = engine.status()
            return status["l1"]["read_locked"] == 0 and status["tickets"]["open"] == 0

        deadline = time.monotonic() + 10
        while not only_the_busy_client_locks():
            assert time.monotonic() < deadline, f"abandoned locks still held: {engine.status()['l1']}"
            time.sleep(0.02)
    finally:
        engine.close()
