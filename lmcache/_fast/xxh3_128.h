/*
 * XXH3-128 (seed 0, default secret), written for lmcache from the published xxHash
 * specification (doc/xxhash_spec.md, "XXH3 Algorithm Description"). Results equal the
 * reference XXH3_128bits() for every input length; tests check that against the xxhash
 * package.
 *
 * The large-input accumulation has an SSE2 loop (baseline on x86-64) and an AVX2 loop chosen
 * at run time; elsewhere a portable scalar loop. All three compute the same thing.
 */
#ifndef LMCACHE_XXH3_128_H
#define LMCACHE_XXH3_128_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LM_X86 1
#endif

#define LM_P32_1 0x9E3779B1U
#define LM_P32_2 0x85EBCA77U
#define LM_P32_3 0xC2B2AE3DU
#define LM_P64_1 0x9E3779B185EBCA87ULL
#define LM_P64_2 0xC2B2AE3D27D4EB4FULL
#define LM_P64_3 0x165667B19E3779F9ULL
#define LM_P64_4 0x85EBCA77C2B2AE63ULL
#define LM_P64_5 0x27D4EB2F165667C5ULL
#define LM_PMX1 0x165667919E3779F9ULL
#define LM_PMX2 0x9FB21C651E98DF25ULL
#define LM_SECRET_LEN 192
#define LM_STRIPES_PER_BLOCK ((LM_SECRET_LEN - 64) / 8)
#define LM_BLOCK_LEN (64 * LM_STRIPES_PER_BLOCK)

static const uint8_t lm_secret[LM_SECRET_LEN] __attribute__((aligned(64))) = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

typedef struct { uint64_t lo, hi; } lm_u128;

/* Little-endian loads: the spec reads every word little-endian, whatever the host. */
static inline uint64_t lm_rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t lm_rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* A hash as 16 bytes: low 64 bits little-endian, then high 64 bits little-endian. */
static inline void lm_store(uint8_t *out, lm_u128 h) {
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(h.lo >> (8 * i));
        out[8 + i] = (uint8_t)(h.hi >> (8 * i));
    }
}

static inline lm_u128 lm_mul128(uint64_t a, uint64_t b) {
    unsigned __int128 r = (unsigned __int128)a * b;
    lm_u128 out = {(uint64_t)r, (uint64_t)(r >> 64)};
    return out;
}

static inline uint64_t lm_fold(uint64_t a, uint64_t b) {
    lm_u128 r = lm_mul128(a, b);
    return r.lo ^ r.hi;
}

static inline uint64_t lm_avalanche(uint64_t x) {
    x ^= x >> 37;
    x *= LM_PMX1;
    return x ^ (x >> 32);
}

static inline uint64_t lm_avalanche64(uint64_t x) {
    x ^= x >> 33;
    x *= LM_P64_2;
    x ^= x >> 29;
    x *= LM_P64_3;
    return x ^ (x >> 32);
}

static inline uint32_t lm_rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

/* ---- 0..16 bytes ------------------------------------------------------------------------ */

static inline lm_u128 lm_small(const uint8_t *p, size_t n) {
    const uint8_t *s = lm_secret;
    lm_u128 h;
    if (n == 0) {
        h.lo = lm_avalanche64(lm_rd64(s + 64) ^ lm_rd64(s + 72));
        h.hi = lm_avalanche64(lm_rd64(s + 80) ^ lm_rd64(s + 88));
    } else if (n <= 3) {
        uint32_t c = (uint32_t)p[n - 1] | ((uint32_t)n << 8) | ((uint32_t)p[0] << 16) |
                     ((uint32_t)p[n >> 1] << 24);
        uint64_t lo = (uint64_t)(lm_rd32(s) ^ lm_rd32(s + 4)) ^ (uint64_t)c;
        uint64_t hi = (uint64_t)(lm_rd32(s + 8) ^ lm_rd32(s + 12)) ^
                      (uint64_t)lm_rotl32(__builtin_bswap32(c), 13);
        h.lo = lm_avalanche64(lo);
        h.hi = lm_avalanche64(hi);
    } else if (n <= 8) {
        uint64_t combined = (uint64_t)lm_rd32(p) | ((uint64_t)lm_rd32(p + n - 4) << 32);
        uint64_t v = (lm_rd64(s + 16) ^ lm_rd64(s + 24)) ^ combined;
        lm_u128 m = lm_mul128(v, LM_P64_1 + ((uint64_t)n << 2));
        uint64_t hi = m.hi + (m.lo << 1);
        uint64_t lo = m.lo ^ (hi >> 3);
        lo ^= lo >> 35;
        lo *= LM_PMX2;
        lo ^= lo >> 28;
        h.lo = lo;
        h.hi = lm_avalanche(hi);
    } else {
        uint64_t first = lm_rd64(p), last = lm_rd64(p + n - 8);
        uint64_t v1 = (lm_rd64(s + 32) ^ lm_rd64(s + 40)) ^ first ^ last;
        uint64_t v2 = (lm_rd64(s + 48) ^ lm_rd64(s + 56)) ^ last;
        lm_u128 m = lm_mul128(v1, LM_P64_1);
        uint64_t lo = m.lo + ((uint64_t)(n - 1) << 54);
        uint64_t hi = m.hi + (v2 & 0xFFFFFFFF00000000ULL) + (uint64_t)(uint32_t)v2 * LM_P32_2;
        lo ^= __builtin_bswap64(hi);
        lm_u128 m2 = lm_mul128(lo, LM_P64_2);
        h.lo = lm_avalanche(m2.lo);
        h.hi = lm_avalanche(m2.hi + hi * LM_P64_2);
    }
    return h;
}

/* ---- 17..240 bytes ---------------------------------------------------------------------- */

static inline void lm_mix2(uint64_t acc[2], const uint8_t *d1, const uint8_t *d2, const uint8_t *s) {
    acc[0] += lm_fold(lm_rd64(d1) ^ lm_rd64(s), lm_rd64(d1 + 8) ^ lm_rd64(s + 8));
    acc[1] += lm_fold(lm_rd64(d2) ^ lm_rd64(s + 16), lm_rd64(d2 + 8) ^ lm_rd64(s + 24));
    acc[0] ^= lm_rd64(d2) + lm_rd64(d2 + 8);
    acc[1] ^= lm_rd64(d1) + lm_rd64(d1 + 8);
}

static inline lm_u128 lm_medium(const uint8_t *p, size_t n) {
    uint64_t acc[2] = {(uint64_t)n * LM_P64_1, 0};
    if (n <= 128) {
        for (long i = (long)((n - 1) >> 5); i >= 0; i--)
            lm_mix2(acc, p + 16 * i, p + n - 16 * i - 16, lm_secret + 32 * i);
    } else {
        size_t chunks = n >> 5;
        for (size_t i = 0; i < 4; i++)
            lm_mix2(acc, p + 32 * i, p + 32 * i + 16, lm_secret + 32 * i);
        acc[0] = lm_avalanche(acc[0]);
        acc[1] = lm_avalanche(acc[1]);
        for (size_t i = 4; i < chunks; i++)
            lm_mix2(acc, p + 32 * i, p + 32 * i + 16, lm_secret + 32 * (i - 4) + 3);
        lm_mix2(acc, p + n - 16, p + n - 32, lm_secret + 103);
    }
    lm_u128 h;
    h.lo = lm_avalanche(acc[0] + acc[1]);
    h.hi = (uint64_t)0 - lm_avalanche(acc[0] * LM_P64_1 + acc[1] * LM_P64_4 + (uint64_t)n * LM_P64_2);
    return h;
}

/* ---- more than 240 bytes ---------------------------------------------------------------- */

/* Accumulates `count` consecutive 64-byte stripes, stripe k keyed by secret + 8k. */
static inline void lm_stripes_scalar(uint64_t acc[8], const uint8_t *p, const uint8_t *s, size_t count) {
    for (size_t k = 0; k < count; k++, p += 64, s += 8) {
        for (int i = 0; i < 8; i++) {
            uint64_t v = lm_rd64(p + 8 * i);
            uint64_t key = v ^ lm_rd64(s + 8 * i);
            acc[i ^ 1] += v;
            acc[i] += (uint64_t)(uint32_t)key * (key >> 32);
        }
    }
}

static inline void lm_scramble_scalar(uint64_t acc[8]) {
    const uint8_t *s = lm_secret + LM_SECRET_LEN - 64;
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= lm_rd64(s + 8 * i);
        acc[i] = a * LM_P32_1;
    }
}

#ifdef LM_X86
/* SSE2: two lanes per vector. (key >> 32) * (uint32)key is one _mm_mul_epu32; the
   "acc[i ^ 1] += v" swap is a 64-bit shuffle of the data vector. */
static inline void lm_stripes_sse2(uint64_t acc[8], const uint8_t *p, const uint8_t *s, size_t count) {
    __m128i a[4];
    for (int j = 0; j < 4; j++) a[j] = _mm_loadu_si128((const __m128i *)(acc + 2 * j));
    for (size_t k = 0; k < count; k++, p += 64, s += 8) {
        for (int j = 0; j < 4; j++) {
            __m128i d = _mm_loadu_si128((const __m128i *)(p + 16 * j));
            __m128i key = _mm_xor_si128(d, _mm_loadu_si128((const __m128i *)(s + 16 * j)));
            __m128i prod = _mm_mul_epu32(key, _mm_shuffle_epi32(key, _MM_SHUFFLE(0, 3, 0, 1)));
            __m128i swapped = _mm_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
            a[j] = _mm_add_epi64(a[j], _mm_add_epi64(prod, swapped));
        }
    }
    for (int j = 0; j < 4; j++) _mm_storeu_si128((__m128i *)(acc + 2 * j), a[j]);
}

__attribute__((target("avx2"))) static inline void lm_stripes_avx2(uint64_t acc[8], const uint8_t *p,
                                                             const uint8_t *s, size_t count) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    for (size_t k = 0; k < count; k++, p += 64, s += 8) {
        __m256i d0 = _mm256_loadu_si256((const __m256i *)p);
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(p + 32));
        __m256i k0 = _mm256_xor_si256(d0, _mm256_loadu_si256((const __m256i *)s));
        __m256i k1 = _mm256_xor_si256(d1, _mm256_loadu_si256((const __m256i *)(s + 32)));
        __m256i p0 = _mm256_mul_epu32(k0, _mm256_srli_epi64(k0, 32));
        __m256i p1 = _mm256_mul_epu32(k1, _mm256_srli_epi64(k1, 32));
        a0 = _mm256_add_epi64(a0, _mm256_add_epi64(p0, _mm256_shuffle_epi32(d0, _MM_SHUFFLE(1, 0, 3, 2))));
        a1 = _mm256_add_epi64(a1, _mm256_add_epi64(p1, _mm256_shuffle_epi32(d1, _MM_SHUFFLE(1, 0, 3, 2))));
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}
#endif

typedef void (*lm_stripes_fn)(uint64_t *, const uint8_t *, const uint8_t *, size_t);

/* The stripe loop for this CPU; `force` (0 auto, 1 scalar, 2 sse2, 3 avx2) is for tests. */
static inline lm_stripes_fn lm_pick_stripes(int force) {
#ifdef LM_X86
    if (force == 1) return lm_stripes_scalar;
    if (force == 2) return lm_stripes_sse2;
    if (force == 3 || (force == 0 && __builtin_cpu_supports("avx2"))) return lm_stripes_avx2;
    return lm_stripes_sse2;
#else
    (void)force;
    return lm_stripes_scalar;
#endif
}

static inline uint64_t lm_merge(const uint64_t acc[8], uint64_t init, const uint8_t *s) {
    uint64_t r = init;
    for (int i = 0; i < 4; i++)
        r += lm_fold(acc[2 * i] ^ lm_rd64(s + 16 * i), acc[2 * i + 1] ^ lm_rd64(s + 16 * i + 8));
    return lm_avalanche(r);
}

static inline __attribute__((always_inline)) lm_u128 lm_large(const uint8_t *p, size_t n, lm_stripes_fn stripes) {
    uint64_t acc[8] = {LM_P32_3, LM_P64_1, LM_P64_2, LM_P64_3, LM_P64_4, LM_P32_2, LM_P64_5, LM_P32_1};
    size_t blocks = (n - 1) / LM_BLOCK_LEN; /* the last block, even when full, is left to below */
    for (size_t b = 0; b < blocks; b++) {
        stripes(acc, p + b * LM_BLOCK_LEN, lm_secret, LM_STRIPES_PER_BLOCK);
        lm_scramble_scalar(acc);
    }
    size_t rest = n - blocks * LM_BLOCK_LEN;
    stripes(acc, p + blocks * LM_BLOCK_LEN, lm_secret, (rest - 1) / 64);
    stripes(acc, p + n - 64, lm_secret + LM_SECRET_LEN - 71, 1);
    lm_u128 h;
    h.lo = lm_merge(acc, (uint64_t)n * LM_P64_1, lm_secret + 11);
    h.hi = lm_merge(acc, ~((uint64_t)n * LM_P64_2), lm_secret + LM_SECRET_LEN - 75);
    return h;
}

static inline __attribute__((always_inline)) lm_u128 lm_xxh3_128(const uint8_t *p, size_t n, lm_stripes_fn stripes) {
    if (n <= 16) return lm_small(p, n);
    if (n <= 240) return lm_medium(p, n);
    return lm_large(p, n, stripes);
}

/* ---- the chunk chain -------------------------------------------------------------------- */

/* Hashes n_chunks chunks of `chunk` token ids (int32 or int64, by `itemsize`) into `out`,
   16 bytes per chunk, chunk c's input being (hash of chunk c-1, ids of chunk c as uint32 LE).
   `buf` holds 16 + 4 * chunk bytes. Returns nonzero when some id lies outside [0, 2**32).
   The body is instantiated once per instruction set so that the copy-and-check loop is
   vectorized and the stripe loop inlined for it. */
static inline __attribute__((always_inline)) int lm_chain_body(
    const void *tokens, int itemsize, size_t n_chunks, size_t chunk, const uint8_t *parent,
    uint8_t *out, uint8_t *buf, lm_stripes_fn stripes) {
    uint32_t *ids = (uint32_t *)(buf + 16);
    const uint32_t *t32 = (const uint32_t *)tokens;
    const uint64_t *t64 = (const uint64_t *)tokens;
    uint64_t bad = 0;
    memcpy(buf, parent, 16);
    for (size_t c = 0; c < n_chunks; c++) {
        if (itemsize == 4) {
            uint32_t acc = 0;
            for (size_t j = 0; j < chunk; j++) {
                uint32_t v = t32[c * chunk + j];
                ids[j] = v;
                acc |= v;
            }
            bad |= acc >> 31;
        } else {
            uint64_t acc = 0;
            for (size_t j = 0; j < chunk; j++) {
                uint64_t v = t64[c * chunk + j];
                ids[j] = (uint32_t)v;
                acc |= v;
            }
            bad |= acc >> 32;
        }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        for (size_t j = 0; j < chunk; j++) ids[j] = __builtin_bswap32(ids[j]);
#endif
        lm_store(out + 16 * c, lm_xxh3_128(buf, 16 + 4 * chunk, stripes));
        memcpy(buf, out + 16 * c, 16);
    }
    return bad != 0;
}

#ifdef LM_X86
__attribute__((target("avx2"))) static int lm_chain_avx2(
    const void *tokens, int itemsize, size_t n_chunks, size_t chunk, const uint8_t *parent,
    uint8_t *out, uint8_t *buf) {
    return lm_chain_body(tokens, itemsize, n_chunks, chunk, parent, out, buf, lm_stripes_avx2);
}
#endif

static int lm_chain_base(const void *tokens, int itemsize, size_t n_chunks, size_t chunk,
                         const uint8_t *parent, uint8_t *out, uint8_t *buf) {
#ifdef LM_X86
    return lm_chain_body(tokens, itemsize, n_chunks, chunk, parent, out, buf, lm_stripes_sse2);
#else
    return lm_chain_body(tokens, itemsize, n_chunks, chunk, parent, out, buf, lm_stripes_scalar);
#endif
}

static int lm_chain(const void *tokens, int itemsize, size_t n_chunks, size_t chunk,
                    const uint8_t *parent, uint8_t *out, uint8_t *buf) {
#ifdef LM_X86
    if (__builtin_cpu_supports("avx2"))
        return lm_chain_avx2(tokens, itemsize, n_chunks, chunk, parent, out, buf);
#endif
    return lm_chain_base(tokens, itemsize, n_chunks, chunk, parent, out, buf);
}

#endif
