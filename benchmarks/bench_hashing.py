"""Hashing a 32k-token prompt into 128 chained chunk hashes (goal: GOAL below).

Next to it, in the same run, the same chain with hashlib.sha256 (what a naive implementation
would use) and the reference xxhash package called once per chunk from Python. The figure is the
median of our chain and the xxhash loop timed in turn; the tables show all three.
"""

from __future__ import annotations

import hashlib
import statistics

import numpy as np
import pytest
import xxhash
from figures import at_most, interleaved
from lmcache._fast.hashing import chunk_hashes

CHUNK = 256
TOKENS = np.random.default_rng(0).integers(0, 150_000, 32 * 1024)


def sha256_chain(data: bytes) -> bytes:
    previous, out = b"\0" * 32, []
    for i in range(0, len(data) - 4 * CHUNK + 1, 4 * CHUNK):
        previous = hashlib.sha256(previous + data[i : i + 4 * CHUNK]).digest()
        out.append(previous)
    return b"".join(out)


def xxhash_per_chunk(data: bytes) -> bytes:
    previous, out = b"\0" * 16, []
    for i in range(0, len(data) - 4 * CHUNK + 1, 4 * CHUNK):
        previous = xxhash.xxh3_128_digest(previous + data[i : i + 4 * CHUNK])
        out.append(previous)
    return b"".join(out)


GOAL = at_most(10, "us")  # ../shared/DESIGN.md, section 9


@pytest.mark.benchmark(group="hash-32k-prompt")
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_chunk_hashes(benchmark, figures, dtype: str) -> None:
    tokens = TOKENS.astype(dtype)
    assert len(benchmark(chunk_hashes, tokens, CHUNK)) == 128 * 16
    data = TOKENS.astype("<u4").tobytes()
    ours, ceiling = interleaved([lambda: chunk_hashes(tokens, CHUNK), lambda: xxhash_per_chunk(data)],
                                rounds=50 if benchmark.disabled else 500, inner=10)
    figures.record(f"hash a 32k-token prompt ({dtype})", statistics.median(ours) * 1e6, "us",
                   ceiling=("xxhash per chunk", statistics.median(ceiling) * 1e6, "us"), goal=GOAL)


@pytest.mark.benchmark(group="hash-32k-prompt")
def test_sha256_chain_ceiling(benchmark) -> None:
    assert len(benchmark(sha256_chain, TOKENS.astype("<u4").tobytes())) == 128 * 32


@pytest.mark.benchmark(group="hash-32k-prompt")
def test_xxhash_python_loop_ceiling(benchmark) -> None:
    assert len(benchmark(xxhash_per_chunk, TOKENS.astype("<u4").tobytes())) == 128 * 16
