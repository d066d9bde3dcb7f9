# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Prefix-chained 128-bit chunk hashes: the identity of a chunk of tokens and everything before it.

For a prompt cut into chunks of ``chunk_size`` tokens, chunk i's hash is

    h[i] = XXH3-128( h[i-1] (16 bytes) || tokens of chunk i (uint32 little-endian each) )

with h[-1] = ``CHAIN_SEED``, the XXH3-128 of the ASCII bytes ``lmcache chunk chain v1``. A hash
is 16 bytes: the low 64 bits little-endian, then the high 64 bits little-endian (that is also
how it enters the next chunk's input). Tokens are hashed as uint32, so int32 and int64 arrays
of the same ids give the same hashes; ids outside [0, 2**32) are refused. A tail shorter than
a chunk gets no hash. The whole chain is one call that releases the GIL.

XXH3-128 is implemented in ``xxh3_128.h`` from the published xxHash specification.
"""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

cnp.import_array()

cdef extern from "xxh3_128.h" nogil:
    ctypedef struct lm_u128:
        uint64_t lo
        uint64_t hi
    ctypedef void (*lm_stripes_fn)(uint64_t *, const uint8_t *, const uint8_t *, size_t)
    lm_stripes_fn lm_pick_stripes(int force)
    lm_u128 lm_xxh3_128(const uint8_t *p, size_t n, lm_stripes_fn stripes)
    void lm_store(uint8_t *out, lm_u128 h)
    int lm_chain(const void *tokens, int itemsize, size_t n_chunks, size_t chunk,
                 const uint8_t *parent, uint8_t *out, uint8_t *buf)

HASH_BYTES = 16
CHAIN_SEED_TEXT = b"lmcache chunk chain v1"


def xxh3_128(data, int variant=0):
    """XXH3-128 of ``data`` (bytes-like) as 16 bytes: low 64 bits LE, then high 64 bits LE.

    ``variant`` forces the large-input loop (1 scalar, 2 SSE2, 3 AVX2) for tests; 0 picks.
    """
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef lm_u128 h
    cdef lm_stripes_fn fn = lm_pick_stripes(variant)
    with nogil:
        h = lm_xxh3_128(&view[0] if view.shape[0] else <const uint8_t *>b"", view.shape[0], fn)
    return _pack(h)


cdef bytes _pack(lm_u128 h):
    cdef uint8_t out[16]
    lm_store(out, h)
    return (<char *>out)[:16]


CHAIN_SEED = xxh3_128(CHAIN_SEED_TEXT)


def chunk_hashes(tokens, Py_ssize_t chunk_size, bytes parent=None):
    """The chained hashes of every full chunk of ``tokens``, as ``n_chunks * 16`` bytes.

    ``tokens``: token ids (a list, or a 1-D numpy int32/int64 array). ``parent``: the hash of the
    chunk just before ``tokens`` (default ``CHAIN_SEED``, i.e. ``tokens`` starts the prompt), so
    a growing prompt can be extended without rehashing its start.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive (got {chunk_size})")
    if parent is None:
        parent = CHAIN_SEED
    elif len(parent) != 16:
        raise ValueError(f"parent must be a 16-byte hash (got {len(parent)} bytes)")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional (got shape {arr.shape})")
    if arr.dtype != np.int32 and arr.dtype != np.int64:
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integers (got {arr.dtype})")
        arr = arr.astype(np.int64)
    arr = np.ascontiguousarray(arr)
    cdef Py_ssize_t n_chunks = arr.shape[0] // chunk_size
    if n_chunks == 0:
        return b""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16 * n_chunks)  # filled below, never shared before
    cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
    cdef const uint8_t[::1] raw = arr.view(np.uint8)
    cdef const uint8_t *par = parent
    cdef int itemsize = arr.dtype.itemsize
    cdef uint8_t *buf = <uint8_t *>PyMem_Malloc(16 + 4 * chunk_size)
    cdef int bad
    if buf == NULL:
        raise MemoryError()
    with nogil:
        bad = lm_chain(&raw[0], itemsize, n_chunks, chunk_size, par, dst, buf)
    PyMem_Free(buf)
    if bad:
        raise ValueError("token ids must lie in [0, 2**32)")
    return out
