"""The CPU page-copy kernel against a plain numpy reference, on both of its paths: streaming
stores (32-byte aligned destination, pages a multiple of 128 bytes) and memcpy (the rest)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from lmcache._fast.kernels import copy_pages, gather, scatter


def aligned(nbytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)  # page aligned


@pytest.mark.parametrize(
    ("page_bytes", "dst_shift"),
    [(4096, 0), (65536, 0), (640, 0), (4096, 8), (100, 0), (129, 64), (1, 3)],
    ids=["stream-4k", "stream-64k", "stream-640", "memcpy-unaligned", "memcpy-100", "memcpy-129", "memcpy-1"],
)
def test_copy_pages_matches_numpy(page_bytes: int, dst_shift: int) -> None:
    rng = np.random.default_rng(page_bytes + dst_shift)
    src = aligned(1 << 22)
    src[:] = rng.integers(0, 256, src.size, dtype=np.uint8)
    n_pages = min(64, (1 << 22) // page_bytes // 2)
    src_offsets = rng.choice((1 << 22) // page_bytes, n_pages, replace=False).astype(np.int64) * page_bytes
    dst = aligned(n_pages * page_bytes + 4096 + dst_shift)
    dst[:] = 0xEE
    dst_offsets = np.arange(n_pages, dtype=np.int64)[::-1] * page_bytes + dst_shift  # reversed order
    copy_pages(src, src_offsets, dst, dst_offsets, page_bytes)
    expected = np.full_like(dst, 0xEE)
    for s, d in zip(src_offsets, dst_offsets):
        expected[d : d + page_bytes] = src[s : s + page_bytes]
    assert np.array_equal(dst, expected)  # every page right, and nothing around them touched


def test_gather_then_scatter_round_trips_with_a_skip() -> None:
    page = 2048
    storage = aligned(1 << 20)
    storage[:] = np.arange(storage.size, dtype=np.uint64).astype(np.uint8)
    offsets = np.array([7, 3, 100, 42], dtype=np.int64) * page
    obj = aligned(4 * page)
    gather(storage, offsets, obj, page)
    back = aligned(1 << 20)
    scatter(obj, back, offsets, page, first_page=1)
    assert not back[offsets[0] : offsets[0] + page].any()  # skipped
    for off in offsets[1:]:
        assert np.array_equal(back[off : off + page], storage[off : off + page])
