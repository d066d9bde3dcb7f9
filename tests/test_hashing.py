"""Chunk hashing: XXH3-128 against the reference library, and the prefix chain's contract."""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash

from lmcache._fast import hashing

# Recorded once; these must never change (stored chunks would stop matching after an upgrade).
RECORDED_CHAIN = (
    "a3e7989ab0e291a460bd30970297c7ce" "b8f84782f62a193c2a747b8ddfb8ccac"
    "a784f7549a09cb9797697ca0e8526ce9" "6913b0630e348d22445720f704842b62"
)


def reference(data: bytes) -> bytes:
    digest = xxhash.xxh3_128_intdigest(data)
    return (digest & (2**64 - 1)).to_bytes(8, "little") + (digest >> 64).to_bytes(8, "little")


@pytest.mark.parametrize("variant", [0, 1, 2, 3], ids=["auto", "scalar", "sse2", "avx2"])
def test_xxh3_128_matches_the_reference_for_every_length(variant: int) -> None:
    if variant == 3 and not _has_avx2():
        pytest.skip("CPU without AVX2")
    rng = random.Random(variant)
    lengths = [*range(0, 1100), 2047, 2048, 2049, 3072, 4096 + 7, 65536 + 17]
    for n in lengths:
        data = rng.randbytes(n)
        assert hashing.xxh3_128(data, variant) == reference(data), n


def _has_avx2() -> bool:
    try:
        return "avx2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_chain_seed_is_the_documented_text() -> None:
    assert hashing.CHAIN_SEED == reference(b"lmcache chunk chain v1")


def test_chain_definition() -> None:
    tokens = np.random.default_rng(0).integers(0, 200_000, 1024).astype(np.int32)
    hashes = hashing.chunk_hashes(tokens, 256)
    previous = hashing.CHAIN_SEED
    for i in range(4):
        previous = reference(previous + tokens[256 * i : 256 * (i + 1)].astype("<u4").tobytes())
        assert hashes[16 * i : 16 * (i + 1)] == previous


def test_recorded_vectors_are_stable() -> None:
    assert hashing.chunk_hashes(np.arange(1000, 2024, dtype=np.int64), 256).hex() == RECORDED_CHAIN


def test_int32_int64_and_lists_agree() -> None:
    tokens = np.random.default_rng(1).integers(0, 2**31 - 1, 4096)
    expected = hashing.chunk_hashes(tokens.astype(np.int64), 256)
    assert hashing.chunk_hashes(tokens.astype(np.int32), 256) == expected
    assert hashing.chunk_hashes(tokens.tolist(), 256) == expected
    assert hashing.chunk_hashes(tokens.astype(np.uint32), 256) == expected
    assert hashing.chunk_hashes(tokens[::-1].copy()[::-1], 256) == expected  # strided input


def test_partial_tail_gets_no_hash_and_prefixes_share_hashes() -> None:
    tokens = np.random.default_rng(2).integers(0, 50_000, 2048).astype(np.int32)
    full = hashing.chunk_hashes(tokens, 256)
    assert len(full) == 8 * 16
    assert hashing.chunk_hashes(tokens[:1000], 256) == full[: 3 * 16]
    assert hashing.chunk_hashes(tokens[:255], 256) == b""
    assert hashing.chunk_hashes([], 256) == b""


def test_extending_from_a_parent_hash_equals_hashing_from_the_start() -> None:
    tokens = np.random.default_rng(3).integers(0, 50_000, 2048).astype(np.int64)
    full = hashing.chunk_hashes(tokens, 256)
    assert hashing.chunk_hashes(tokens[512:], 256, parent=full[16:32]) == full[32:]


def test_a_changed_token_changes_its_chunk_and_every_later_one() -> None:
    tokens = np.random.default_rng(4).integers(0, 50_000, 1024).astype(np.int32)
    before = hashing.chunk_hashes(tokens, 256)
    tokens[300] += 1
    after = hashing.chunk_hashes(tokens, 256)
    assert before[:16] == after[:16]
    for i in range(1, 4):
        assert before[16 * i : 16 * (i + 1)] != after[16 * i : 16 * (i + 1)]


def test_chunk_size_changes_the_hashes() -> None:
    tokens = np.arange(1024, dtype=np.int32)
    assert hashing.chunk_hashes(tokens, 256)[:16] != hashing.chunk_hashes(tokens, 128)[16:32]


@pytest.mark.parametrize(
    ("tokens", "chunk_size", "error"),
    [
        (np.full(256, -1, dtype=np.int32), 256, ValueError),
        (np.full(256, -1, dtype=np.int64), 256, ValueError),
        (np.full(256, 2**32, dtype=np.int64), 256, ValueError),
        (np.zeros((2, 256), dtype=np.int32), 256, ValueError),
        (np.zeros(256, dtype=np.float32), 256, TypeError),
        (np.zeros(256, dtype=np.int32), 0, ValueError),
    ],
)
def test_bad_input_is_refused(tokens: np.ndarray, chunk_size: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        hashing.chunk_hashes(tokens, chunk_size)


def test_bad_parent_is_refused() -> None:
    with pytest.raises(ValueError, match="16-byte"):
        hashing.chunk_hashes(np.zeros(256, dtype=np.int32), 256, parent=b"short")
