"""How one chunk is kept outside L1: a small fixed header, then the payload (the L1 object's bytes).

The header names everything a reader must check before a byte is served: the format version, the
scope the chunk belongs to (a digest of model, world size, rank, page format and cache salt, so
chunks of another model, layout or tenant can never be mixed in), the chunk hash, the token
count, the payload length and an XXH3-128 checksum of the payload. A header or checksum that
does not match makes the chunk a miss, never a wrong byte. The disk tier also writes its epoch,
which each clear changes: a file of another epoch is from before a clear, never served.

    offset  size  field
    0       4     magic b"LMKV"
    4       2     version (1; 2 if the epoch is not 0, so that an older reader, blind to epochs,
                  takes the file for a foreign one instead of serving a chunk a clear disowned)
    6       2     header size (80)
    8       4     tokens in the chunk
    12      4     reserved (0)
    16      8     payload length
    24      16    scope digest
    40      16    chunk hash
    56      16    payload checksum (XXH3-128)
    72      8     epoch (the disk tier's when written; 0 elsewhere)
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgspec

from lmcache._fast.hashing import xxh3_128
from lmcache.keys import CacheScope

MAGIC = b"LMKV"
VERSION = 1
VERSION_WITH_EPOCH = 2
_HEADER = struct.Struct("<4sHHII Q16s16s16sQ")
HEADER_BYTES = _HEADER.size  # 80


class Header(NamedTuple):
    tokens: int
    payload_bytes: int
    scope_id: bytes
    chunk_hash: bytes
    checksum: bytes
    epoch: int


class BadChunk(ValueError):
    """A stored chunk that must not be served (what is wrong is in the message)."""


def scope_id(scope: CacheScope) -> bytes:
    """16 bytes naming a scope; equal across processes for equal scopes."""
    return xxh3_128(msgspec.msgpack.encode(scope))


def checksum(payload: memoryview | bytes) -> bytes:
    return xxh3_128(payload)  # releases the GIL while it reads


def pack(tokens: int, scope: bytes, chunk_hash: bytes, payload: memoryview | bytes, epoch: int = 0) -> bytes:
    version = VERSION_WITH_EPOCH if epoch else VERSION
    return _HEADER.pack(MAGIC, version, HEADER_BYTES, tokens, 0, len(payload), scope, chunk_hash, checksum(payload),
                        epoch)


def unpack(raw: bytes) -> Header:
    """The header in ``raw``; raises BadChunk if it is not one of this version."""
    if len(raw) < HEADER_BYTES:
        raise BadChunk(f"header is {len(raw)} bytes, expected {HEADER_BYTES}")
    magic, version, size, tokens, _, payload, scope, chunk_hash, check, epoch = _HEADER.unpack_from(raw)
    if magic != MAGIC or version not in (VERSION, VERSION_WITH_EPOCH) or size != HEADER_BYTES:
        raise BadChunk(f"not an lmcache chunk of version {VERSION} or {VERSION_WITH_EPOCH} "
                       f"(magic {magic!r}, version {version})")
    return Header(tokens, payload, scope, chunk_hash, check, epoch)


def verify(header: Header, scope: bytes, chunk_hash: bytes, payload: memoryview) -> None:
    """Raises BadChunk unless ``payload`` is the chunk ``header`` describes, of ``scope``."""
    if header.scope_id != scope or header.chunk_hash != chunk_hash:
        raise BadChunk("the chunk belongs to another scope or hash")
    if header.payload_bytes != len(payload):
        raise BadChunk(f"payload is {header.payload_bytes} bytes, the slot {len(payload)}")
    if checksum(payload) != header.checksum:
        raise BadChunk("payload checksum mismatch")
