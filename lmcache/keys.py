"""What identifies a cached chunk: the scope it belongs to and the hash of its token prefix.

A chunk is named by (model name, world size, rank, page format, cache salt, chunk hash). The first
five form the ``CacheScope``: the same tokens under another model, another tensor-parallel
rank, another KV page layout or another tenant's salt are different chunks. The hash is the
prefix-chained 128-bit hash of ``_fast.hashing``, so one hash stands for a chunk's tokens and
every token before it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np

from lmcache._fast.hashing import CHAIN_SEED, HASH_BYTES, chunk_hashes

__all__ = ["CHAIN_SEED", "HASH_BYTES", "CacheScope", "prompt_hashes", "split_hashes"]


# Bounds every decoded message is held to before any work is done for it (see protocol.py).
MAX_NAME_CHARS = 4096  # model names, salts, sessions, instance ids, page formats
MAX_WORLD_SIZE = 1024  # ranks of one model instance (tensor x pipeline parallel)
MAX_REQUEST_CHUNKS = 1 << 16  # chunks in one request: 16M tokens at 256 per chunk

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Hashes = Annotated[bytes, msgspec.Meta(max_length=MAX_REQUEST_CHUNKS * HASH_BYTES)]


class CacheScope(msgspec.Struct, frozen=True, array_like=True):
    """Everything besides the tokens that decides whether two chunks are interchangeable."""

    model: Name
    world_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)] = 1
    rank: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)] = 0
    page_format: Name = ""  # layout, dtype, heads, head size, block size: see page_layout.py
    salt: Name = ""  # the request's cache salt: isolates tenants

    def for_rank(self, rank: int) -> CacheScope:
        return msgspec.structs.replace(self, rank=rank)


def prompt_hashes(tokens: list[int] | np.ndarray, chunk_size: int, parent: bytes | None = None) -> bytes:
    """The chained hashes of every full chunk, concatenated (16 bytes each); see _fast.hashing."""
    return chunk_hashes(tokens, chunk_size, parent)


def split_hashes(hashes: bytes) -> list[bytes]:
    """Concatenated 16-byte hashes -> one bytes object per chunk."""
    if len(hashes) % HASH_BYTES:
        raise ValueError(f"hashes must be a multiple of {HASH_BYTES} bytes (got {len(hashes)})")
    return [hashes[i : i + HASH_BYTES] for i in range(0, len(hashes), HASH_BYTES)]
