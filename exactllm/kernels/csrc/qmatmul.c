/* Fused block-quantized matmul for CPU: y[M, N] = x[M, K] @ W[N, K].T (float32 x and y).
 *
 * W is a QuantWeight in planes (see exactllm/formats/quant.py):
 *   q4_0 / q4_1: qs uint8 [N, K/2], per 32-block 16 bytes, byte j = weight j (low nibble)
 *                and weight j+16 (high nibble); q8_0: qs int8 [N, K].
 *   scale fp16 [N, K/32]; min fp16 [N, K/32] for q4_1.
 *
 * Numerics. Each 32-block is dequantized in registers as w = q * d + c, with c = -8d (q4_0),
 * the block min (q4_1) or 0 (q8_0); q * d is exact in float32 (d is an fp16 value), so w is
 * bit-identical to QuantWeight.dequantize. Each output keeps 32 float32 partial sums, one
 * per position j in a block: lane j accumulates w[b, j] * x[b, j] (one FMA) over the blocks
 * b in order; the 32 lanes are then added in a fixed binary tree (16 + 16, 8 + 8, ..., 1 + 1).
 * That order depends on K only: not on M, N, the tile shapes or the thread count (threads
 * split N, never K). So results are deterministic, and a row of y is the same whatever other
 * rows are in x.
 *
 * Speed. Written with GCC/Clang vector extensions (16 float32 lanes: one zmm, two ymm or
 * four xmm registers, as -march allows) rather than intrinsics, so it builds anywhere; the
 * arithmetic is lane-wise, so no -ffast-math is needed. A tile computes NT columns x MTILE
 * rows: each block of W is dequantized once per tile and used for MTILE rows, and each x
 * load serves NT columns; all accumulators stay in registers. Columns are walked in chunks
 * of NCHUNK within each row tile so the chunk of W and the row tile of x stay in L1/L2.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32
#define NCHUNK 32 /* columns per chunk; a multiple of every NT */
#ifndef PF_TILES
#define PF_TILES 4
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
/* Unaligned, may-alias views for vector loads (memcpy into a vector makes gcc 12 split the
 * 16-byte load into general-purpose registers and rebuild the vector byte by byte). */
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint8_t v16u8_u __attribute__((vector_size(16), aligned(1), may_alias));

/* Bytes -> float32 through int32 (vpmovzxbd + vcvtdq2ps). gcc 12 scalarizes a direct
 * byte -> float conversion, an int8 -> int32 one, and even uint8 -> int32 when the bytes
 * come straight from a load; so int8 is taken as uint8 with its top bit flipped (q + 128)
 * and 128 is subtracted in int32. */
#define U8F(v) __builtin_convertvector(__builtin_convertvector((v), v16i32), v16f)
#define I8F(v) __builtin_convertvector(__builtin_convertvector((v) ^ 0x80, v16i32) - 128, v16f)

static inline float h2f(uint16_t h) {
#if defined(__FLT16_MAX__)
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline v16f loadf(const float *p) { return *(const v16f_u *)p; }
static inline v16u8 loadq(const uint8_t *p) { return *(const v16u8_u *)p; }

/* Sum of the 32 lanes of (a, b) in the fixed tree: lane j + lane j+16, then j + j+8, ... */
static inline float tree32(v16f a, v16f b) {
    v16f s16 = a + b;
    v8f h8[2];
    memcpy(h8, &s16, sizeof s16);
    v8f s8 = h8[0] + h8[1];
    v4f h4[2];
    memcpy(h4, &s8, sizeof s8);
    v4f s4 = h4[0] + h4[1];
    float s[4];
    memcpy(s, &s4, sizeof s);
    return (s[0] + s[2]) + (s[1] + s[3]);
}

/* Block b of a row of W (qs points at the row) as w0 = weights 0..15, w1 = weights 16..31. */
static inline __attribute__((always_inline)) void deq_block(const int qtype, const uint8_t *qs, int64_t b,
                                                            float d, float c, v16f *w0, v16f *w1) {
    if (qtype == 2) {
        *w0 = I8F(loadq(qs + b * QK)) * d;
        *w1 = I8F(loadq(qs + b * QK + 16)) * d;
    } else {
        const v16u8 q = loadq(qs + b * (QK / 2));
        *w0 = U8F(q & 15) * d + c;
        *w1 = U8F(q >> 4) * d + c;
    }
}

/* y[m0 : m0+MTILE, n0 : n0+NT]. dc[i] holds column n0+i's block scales (dc[i][0 .. nb)) and
 * offsets (dc[i][nb .. 2nb)) in float32. MTILE and NT are compile-time constants at every
 * call, so the loops over them unroll and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const int qtype, const float *restrict x, int64_t K,
                                                       const uint8_t *qs, int64_t row_bytes,
                                                       float *const *dc, int64_t n0, const int NT,
                                                       int64_t N, int64_t m0, const int MTILE,
                                                       float *restrict y) {
    const int64_t nb = K / QK;
    v16f acc[4][4][2]; /* fixed sizes (not VLAs) so gcc can keep them in registers */
    for (int i = 0; i < NT; i++)
        for (int r = 0; r < MTILE; r++) acc[i][r][0] = acc[i][r][1] = (v16f){0};
    for (int64_t b = 0; b < nb; b++) {
        v16f w[4][2];
        for (int i = 0; i < NT; i++) {
            const uint8_t *row = qs + (n0 + i) * row_bytes;
            /* Rows are short (K/2 or K bytes) and visited NT at a time, too irregular for the
             * hardware prefetcher: fetch the same block PF_TILES tiles ahead (harmless past
             * the end of W: prefetches never fault). */
            __builtin_prefetch(row + PF_TILES * NT * row_bytes + b * (row_bytes / nb));
            deq_block(qtype, row, b, dc[i][b], dc[i][nb + b], &w[i][0], &w[i][1]);
        }
        for (int r = 0; r < MTILE; r++) {
            const float *xb = x + (m0 + r) * K + b * QK;
            const v16f x0 = loadf(xb), x1 = loadf(xb + 16);
            for (int i = 0; i < NT; i++) {
                acc[i][r][0] += w[i][0] * x0;
                acc[i][r][1] += w[i][1] * x1;
            }
        }
    }
    for (int i = 0; i < NT; i++)
        for (int r = 0; r < MTILE; r++) y[(m0 + r) * N + n0 + i] = tree32(acc[i][r][0], acc[i][r][1]);
}

/* Columns per tile for 1, 2, 3 and 4 rows: NT x MTILE accumulators of 2 vectors each plus
 * 2 NT dequantized vectors must fit the register file: 32 zmm with AVX-512, else 16 ymm
 * (8 v16f). */
#if defined(__AVX512F__)
#define NT1 4
#define NT2 4
#define NT3 2
#define NT4 2
#else
#define NT1 2
#define NT2 1
#define NT3 1
#define NT4 1
#endif

#define TILE(nt, mt) tile(qtype, x, K, qs, row_bytes, dc + (n - n0), n, nt, N, m0, mt, y)

/* Columns [n0, n1) of y, all M rows; dcbuf: scratch of NCHUNK * 2 * K/32 floats. */
static inline __attribute__((always_inline)) void columns(const int qtype, const float *x, int64_t M,
                                                          int64_t K, const uint8_t *qs,
                                                          const uint16_t *scale, const uint16_t *mn,
                                                          int64_t N, float *y, int64_t n0, int64_t n1,
                                                          float *dcbuf) {
    const int64_t nb = K / QK, row_bytes = qtype == 2 ? K : K / 2;
    float *dc[NCHUNK];
    for (; n0 < n1; n0 += NCHUNK) {
        const int64_t ne = n1 - n0 < NCHUNK ? n1 : n0 + NCHUNK;
        for (int64_t n = n0; n < ne; n++) {
            float *d = dc[n - n0] = dcbuf + (n - n0) * 2 * nb;
            for (int64_t b = 0; b < nb; b++) {
                d[b] = h2f(scale[n * nb + b]);
                d[nb + b] = qtype == 1 ? h2f(mn[n * nb + b]) : qtype == 0 ? -8.0f * d[b] : 0.0f;
            }
        }
        int64_t m0 = 0, n;
#define ROWS(mt, nt)                                                \
    do {                                                            \
        for (n = n0; n + nt <= ne; n += nt) TILE(nt, mt);           \
        for (; n < ne; n++) TILE(1, mt);                            \
    } while (0)
        for (; m0 + 4 <= M; m0 += 4) ROWS(4, NT4);
        switch (M - m0) {
            case 3: ROWS(3, NT3); break;
            case 2: ROWS(2, NT2); break;
            case 1: ROWS(1, NT1); break;
        }
#undef ROWS
    }
}

/* qtype: 0 = q4_0, 1 = q4_1 (mn non-NULL), 2 = q8_0. x [M, K], y [M, N], all contiguous;
 * qs is the uint8 (q4) or int8 (q8_0) plane, scale / mn the fp16 planes as uint16.
 * nthreads <= 0: OpenMP default. Returns 0, -1 on bad arguments, -2 if out of memory. */
int exactllm_qmatmul(int qtype, const float *x, int64_t M, int64_t K, const void *qs,
                     const uint16_t *scale, const uint16_t *mn, int64_t N, float *y, int nthreads) {
    if (qtype < 0 || qtype > 2 || K % QK || K < 0 || M < 0 || N < 0 || (qtype == 1 && !mn)) return -1;
    if (K == 0) {
        memset(y, 0, sizeof(float) * M * N);
        return 0;
    }
#ifdef _OPENMP
    if (nthreads <= 0) nthreads = omp_get_max_threads();
    /* Below ~128K weights a thread team costs more than it saves. */
    if ((double)N * (double)K < 131072.0) nthreads = 1;
#else
    nthreads = 1;
#endif
    const int64_t groups = (N + NCHUNK - 1) / NCHUNK; /* threads take whole chunks */
    int oom = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t n0 = groups * t / nt * NCHUNK, n1e = groups * (t + 1) / nt * NCHUNK;
        const int64_t n1 = n1e < N ? n1e : N;
        float *dcbuf = n0 < n1 ? malloc(sizeof(float) * NCHUNK * 2 * (K / QK)) : NULL;
        if (n0 < n1 && !dcbuf) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            oom = 1;
        } else if (n0 < n1) {
            if (qtype == 0) columns(0, x, M, K, qs, scale, mn, N, y, n0, n1, dcbuf);
            else if (qtype == 1) columns(1, x, M, K, qs, scale, mn, N, y, n0, n1, dcbuf);
            else columns(2, x, M, K, qs, scale, mn, N, y, n0, n1, dcbuf);
        }
        free(dcbuf);
    }
    return oom ? -2 : 0;
}
