"""The L1 memory pool: alignment, the allocation promise, no leaks, SHM backing, prefaulting."""

from __future__ import annotations

import mmap
import os
import random

import numpy as np
import pytest

from lmcache._fast.pool import MemoryPool, slot_size

MiB = 1 << 20


def test_slots_are_aligned_and_do_not_overlap() -> None:
    pool = MemoryPool(64 * MiB, slab_bytes=4 * MiB)
    assert pool.address % 4096 == 0
    live: list[tuple[int, int]] = []
    for n in [100, 4096, 5000, 64 * 1024, 70_000, 1 * MiB, 3 * MiB, 64, 1]:
        for _ in range(3):
            off = pool.alloc(n)
            assert off >= 0
            assert off % 64 == 0
            if n >= 64 * 1024:
                assert off % 4096 == 0
            live.append((off, n))
    spans = sorted((off, off + slot_size(n)) for off, n in live)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert pool.allocated_bytes == sum(slot_size(n) for _, n in live)
    for off, n in live:
        pool.free(off, n)
    assert pool.allocated_bytes == 0 and pool.free_slab_count == pool.n_slabs
    pool.close()


def test_randomized_alloc_free_against_a_model_with_mixed_sizes() -> None:
    rng = random.Random(7)
    pool = MemoryPool(32 * MiB, slab_bytes=1 * MiB, prefault=False)
    sizes = [4096, 16 * 1024, 100_000, 300_000, 1 * MiB]
    live: dict[int, int] = {}
    for step in range(100_000):
        if live and (rng.random() < 0.45 or len(live) > 400):
            off = rng.choice(list(live)) if step % 97 == 0 else next(iter(live))
            pool.free(off, live.pop(off))
        else:
            n = rng.choice(sizes)
            promised = pool.free_slots(n) > 0
            off = pool.alloc(n)
            assert (off >= 0) == promised, (step, n)
            if off >= 0:
                assert off not in live
                live[off] = n
        if step % 5000 == 0:
            assert pool.allocated_bytes == sum(slot_size(n) for n in live.values())
            spans = sorted((o, o + slot_size(n)) for o, n in live.items())
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for off, n in live.items():
        pool.free(off, n)
    assert pool.allocated_bytes == 0
    assert pool.allocations == 0
    assert pool.free_slab_count == pool.n_slabs
    pool.close()


def test_a_full_pool_fails_cleanly_and_recovers() -> None:
    pool = MemoryPool(8 * MiB, slab_bytes=1 * MiB)
    offsets = []
    while (off := pool.alloc(256 * 1024)) >= 0:
        offsets.append(off)
    assert len(offsets) == 32
    assert pool.free_slots(256 * 1024) == 0
    assert pool.alloc(4096) == -1  # no free slab for another size
    pool.free(offsets[0], 256 * 1024)
    assert pool.alloc(4096) == -1  # the slab is still shared with three live objects
    for off in offsets[1:4]:
        pool.free(off, 256 * 1024)
    assert pool.alloc(4096) >= 0  # a whole slab came free and changed size
    pool.close()


@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [(-1, 4096), (1 << 40, 4096), (4096 * 3 + 1, 4096), (0, 8192), (0, 0)],
)
def test_bad_frees_are_refused_and_change_nothing(offset: int, nbytes: int) -> None:
    pool = MemoryPool(4 * MiB, slab_bytes=1 * MiB)
    good = pool.alloc(4096)
    with pytest.raises(ValueError):
        pool.free(offset if offset != 0 else good, nbytes)
    assert pool.allocated_bytes == 4096
    other = pool.alloc(4096)  # keeps the slab in use, so the double free hits a live slab
    pool.free(good, 4096)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(good, 4096)
    assert pool.allocated_bytes == 4096
    pool.free(other, 4096)
    with pytest.raises(ValueError, match="no slot"):
        pool.free(other, 4096)  # the slab itself went back to the free slabs
    assert pool.allocated_bytes == 0
    pool.close()


def test_an_object_larger_than_a_slab_is_refused() -> None:
    pool = MemoryPool(4 * MiB, slab_bytes=1 * MiB)
    with pytest.raises(ValueError, match="does not fit"):
        pool.alloc(2 * MiB)
    pool.close()


def test_views_write_the_arena_and_block_close() -> None:
    pool = MemoryPool(4 * MiB, slab_bytes=1 * MiB)
    off = pool.alloc(8192)
    view = pool.view(off, 8192)
    view[:5] = b"hello"
    arr = np.frombuffer(pool, dtype=np.uint8)
    assert bytes(arr[off : off + 5]) == b"hello"
    with pytest.raises(BufferError):
        pool.close()
    del view, arr
    pool.close()
    assert pool.closed


def test_prefault_covers_the_arena() -> None:
    pool = MemoryPool(16 * MiB, slab_bytes=1 * MiB)
    assert pool.wait_prefaulted(timeout=30)
    assert pool.faulted_bytes == pool.size
    pool.close()


def test_shm_backed_pool_is_visible_to_other_mappings_and_unlinked_on_close() -> None:
    name = f"/lmcache_test_pool_{os.getpid()}"
    pool = MemoryPool(2 * MiB, slab_bytes=1 * MiB, shm_name=name)
    off = pool.alloc(4096)
    view = pool.view(off, 4096)
    view[:4] = b"kvkv"
    with open(f"/dev/shm{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as other:
        assert other[off : off + 4] == b"kvkv"
        other[off + 4 : off + 8] = b"back"
    assert bytes(view[4:8]) == b"back"
    del view
    pool.close()
    assert not os.path.exists(f"/dev/shm{name}")


def test_an_existing_shm_name_is_refused() -> None:
    name = f"/lmcache_test_dup_{os.getpid()}"
    first = MemoryPool(1 * MiB, slab_bytes=1 * MiB, shm_name=name)
    try:
        with pytest.raises(OSError, match="cannot create SHM segment"):
            MemoryPool(1 * MiB, slab_bytes=1 * MiB, shm_name=name)
    finally:
        first.close()
