/*
 * CPU kernels of the fixed fan-in layer: y[b, l] = bias[l] + sum_j w[l, j] * x[b, idx[l, j]].
 *
 * Every kernel walks the labels once, in tiles of LABEL_TILE labels, and keeps the small operand (the transposed
 * input xt[in, batch], a few hundred KB) in cache. The output-gradient row of each label is therefore read once per
 * label, not once per connection as a transposed sparse product would: at 670K labels that is the difference between
 * ~170 MB and ~5.5 GB of memory traffic for the input gradient. Accumulation is in the element type (fp32 or fp64).
 *
 * Built on first use with the system C compiler (see xmc_dst/kernels.py); the pure-PyTorch paths remain the
 * reference and the fallback.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define LABEL_TILE 16
#define BATCH_TILE 64

/* The full batch tile is handled with GCC/Clang vector types of 64 bytes (4 x 16 floats or 8 x 8 doubles for a tile
 * of 64), so the accumulators are plain values the compiler keeps in registers (zmm with AVX-512, pairs of ymm with
 * AVX2); a partial tile at the end of the batch takes the scalar loops. Vectors are loaded from unaligned memory. */
#define VEC_BYTES 64
typedef float vf32 __attribute__((vector_size(VEC_BYTES), aligned(4), may_alias));
typedef double vf64 __attribute__((vector_size(VEC_BYTES), aligned(8), may_alias));

/* A 64-byte store past the cache (no read for ownership) where AVX-512 has one; a plain store elsewhere. ``p`` must be
 * 64-byte aligned. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline void stream_f32(float *p, vf32 v) { _mm512_stream_ps(p, (__m512)v); }
static inline void stream_f64(double *p, vf64 v) { _mm512_stream_pd(p, (__m512d)v); }
static inline void stream_fence(void) { _mm_sfence(); }
#else
static inline void stream_f32(float *p, vf32 v) { *(vf32 *)p = v; }
static inline void stream_f64(double *p, vf64 v) { *(vf64 *)p = v; }
static inline void stream_fence(void) {}
#endif

/* Horizontal sums as a shuffle tree (a lane-by-lane loop costs more than the dot product it finishes). */
typedef float vf32x8 __attribute__((vector_size(32)));
typedef float vf32x4 __attribute__((vector_size(16)));
typedef double vf64x4 __attribute__((vector_size(32)));
typedef double vf64x2 __attribute__((vector_size(16)));

static inline float hsum_f32(vf32 v) {
    vf32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vf32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline double hsum_f64(vf64 v) {
    vf64x4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    vf64x2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
    return b[0] + b[1];
}

#define DEFINE_ROW_KERNELS(T, SUFFIX)                                                                                 \
enum { LANES_##SUFFIX = VEC_BYTES / sizeof(T), NVEC_##SUFFIX = BATCH_TILE / (VEC_BYTES / sizeof(T)) };              \
                                                                                                                      \
/* acc[0:n] += sum_j w[j] * xt[idx[j], b0:b0+n] */                                                                    \
static inline void row_axpy_##SUFFIX(T *restrict acc, const T *restrict xt, const T *restrict w,                     \
                                     const int32_t *restrict idx, int64_t K, int64_t B, int64_t b0, int64_t n) {     \
    if (n == BATCH_TILE) {                                                                                            \
        v##SUFFIX a[NVEC_##SUFFIX];                                                                                   \
        for (int v = 0; v < NVEC_##SUFFIX; ++v) a[v] = *(const v##SUFFIX *)(acc + v * LANES_##SUFFIX);                \
        for (int64_t j = 0; j < K; ++j) {                                                                             \
            const T wv = w[j];                                                                                        \
            const T *restrict xr = xt + (int64_t)idx[j] * B + b0;                                                     \
            for (int v = 0; v < NVEC_##SUFFIX; ++v) a[v] += wv * *(const v##SUFFIX *)(xr + v * LANES_##SUFFIX);       \
        }                                                                                                             \
        for (int v = 0; v < NVEC_##SUFFIX; ++v) *(v##SUFFIX *)(acc + v * LANES_##SUFFIX) = a[v];                      \
        return;                                                                                                       \
    }                                                                                                                 \
    for (int64_t j = 0; j < K; ++j) {                                                                                 \
        const T wv = w[j];                                                                                            \
        const T *restrict xr = xt + (int64_t)idx[j] * B + b0;                                                         \
        for (int64_t bb = 0; bb < n; ++bb) acc[bb] += wv * xr[bb];                                                    \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* For one label with output gradient g[0:n]: gw[j] (+)= <g, xt[idx[j], b0:b0+n]> and                               \
 * acc[idx[j], b0:b0+n] += w[j] * g. */                                                                              \
static inline void row_backward_##SUFFIX(const T *restrict g, const T *restrict xt, const T *restrict w,             \
                                         const int32_t *restrict idx, T *restrict gw, T *restrict acc, int64_t K,    \
                                         int64_t B, int64_t b0, int64_t n) {                                          \
    if (n == BATCH_TILE) {                                                                                            \
        v##SUFFIX gv[NVEC_##SUFFIX];                                                                                  \
        for (int v = 0; v < NVEC_##SUFFIX; ++v) gv[v] = *(const v##SUFFIX *)(g + v * LANES_##SUFFIX);                 \
        for (int64_t j = 0; j < K; ++j) {                                                                             \
            const int64_t i = idx[j];                                                                                 \
            if (gw) {                                                                                                 \
                const T *restrict xr = xt + i * B + b0;                                                               \
                v##SUFFIX s = gv[0] * *(const v##SUFFIX *)xr;                                                         \
                for (int v = 1; v < NVEC_##SUFFIX; ++v) s += gv[v] * *(const v##SUFFIX *)(xr + v * LANES_##SUFFIX);  \
                gw[j] = b0 == 0 ? hsum_##SUFFIX(s) : gw[j] + hsum_##SUFFIX(s);                                        \
            }                                                                                                         \
            if (acc) {                                                                                                \
                const T wv = w[j];                                                                                    \
                T *restrict r = acc + i * B + b0;                                                                     \
                for (int v = 0; v < NVEC_##SUFFIX; ++v)                                                               \
                    *(v##SUFFIX *)(r + v * LANES_##SUFFIX) += wv * gv[v];                                             \
            }                                                                                                         \
        }                                                                                                             \
        return;                                                                                                       \
    }                                                                                                                 \
    for (int64_t j = 0; j < K; ++j) {                                                                                 \
        const int64_t i = idx[j];                                                                                     \
        if (gw) {                                                                                                     \
            const T *restrict xr = xt + i * B + b0;                                                                   \
            T s = 0;                                                                                                  \
            for (int64_t bb = 0; bb < n; ++bb) s += g[bb] * xr[bb];                                                   \
            gw[j] = b0 == 0 ? s : gw[j] + s;                                                                          \
        }                                                                                                             \
        if (acc) {                                                                                                    \
            const T wv = w[j];                                                                                        \
            T *restrict r = acc + i * B + b0;                                                                         \
            for (int64_t bb = 0; bb < n; ++bb) r[bb] += wv * g[bb];                                                   \
        }                                                                                                             \
    }                                                                                                                 \
}

#define DEFINE_KERNELS(T, SUFFIX)                                                                                     \
DEFINE_ROW_KERNELS(T, SUFFIX)                                                                                         \
/* out[b * so_b + l * so_l] = bias[l] + sum_j w[l, j] * xt[idx[l, j], b]; xt is [in, B] contiguous. */              \
void ffi_forward_##SUFFIX(const T *xt, const T *w, const int32_t *idx, const T *bias, T *out, int64_t L,            \
                          int64_t K, int64_t B, int64_t so_b, int64_t so_l, int nthreads) {                          \
    int64_t ntiles = (L + LABEL_TILE - 1) / LABEL_TILE;                                                              \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                             \
    for (int64_t tile = 0; tile < ntiles; ++tile) {                                                                  \
        T acc[LABEL_TILE][BATCH_TILE];                                                                                \
        int64_t l0 = tile * LABEL_TILE;                                                                               \
        int64_t nl = L - l0 < LABEL_TILE ? L - l0 : LABEL_TILE;                                                       \
        for (int64_t b0 = 0; b0 < B; b0 += BATCH_TILE) {                                                              \
            int64_t nb = B - b0 < BATCH_TILE ? B - b0 : BATCH_TILE;                                                   \
            for (int64_t t = 0; t < nl; ++t) {                                                                        \
                int64_t l = l0 + t;                                                                                   \
                T b_val = bias ? bias[l] : (T)0;                                                                      \
                for (int64_t bb = 0; bb < nb; ++bb) acc[t][bb] = b_val;                                               \
                row_axpy_##SUFFIX(acc[t], xt, w + l * K, idx + l * K, K, B, b0, nb);                                  \
            }                                                                                                         \
            for (int64_t bb = 0; bb < nb; ++bb) {                                                                     \
                T *o = out + (b0 + bb) * so_b + l0 * so_l;                                                            \
                for (int64_t t = 0; t < nl; ++t) o[t * so_l] = acc[t][bb];                                            \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* Weight gradient gw[l, j] = sum_b g[b, l] * xt[idx[l, j], b] (when gw is not NULL) and the transposed input        \
 * gradient gxt[i, b] = sum_{(l, j): idx[l, j] = i} w[l, j] * g[b, l] (when gxt is not NULL), accumulated per thread  \
 * in an [in, B] buffer that stays in cache, then reduced. */                                                        \
void ffi_backward_##SUFFIX(const T *xt, const T *w, const int32_t *idx, const T *g, T *gw, T *gxt, int64_t L,       \
                           int64_t K, int64_t B, int64_t D, int64_t sg_b, int64_t sg_l, int nthreads) {              \
    int64_t ntiles = (L + LABEL_TILE - 1) / LABEL_TILE;                                                              \
    T *scratch = NULL;                                                                                                \
    if (gxt) {                                                                                                        \
        scratch = (T *)calloc((size_t)nthreads * (size_t)D * (size_t)B, sizeof(T));                                   \
        if (!scratch) { nthreads = 1; memset(gxt, 0, (size_t)D * (size_t)B * sizeof(T)); }                          \
    }                                                                                                                 \
    _Pragma("omp parallel num_threads(nthreads)")                                                                    \
    {                                                                                                                 \
        int tid = omp_get_thread_num();                                                                               \
        T *my = gxt ? (scratch ? scratch + (size_t)tid * D * B : gxt) : NULL;                                         \
        T gt[LABEL_TILE][BATCH_TILE];                                                                                 \
        _Pragma("omp for schedule(static)")                                                                          \
        for (int64_t tile = 0; tile < ntiles; ++tile) {                                                              \
            int64_t l0 = tile * LABEL_TILE;                                                                           \
            int64_t nl = L - l0 < LABEL_TILE ? L - l0 : LABEL_TILE;                                                   \
            for (int64_t b0 = 0; b0 < B; b0 += BATCH_TILE) {                                                          \
                int64_t nb = B - b0 < BATCH_TILE ? B - b0 : BATCH_TILE;                                               \
                for (int64_t bb = 0; bb < nb; ++bb) {                                                                 \
                    const T *gr = g + (b0 + bb) * sg_b + l0 * sg_l;                                                   \
                    for (int64_t t = 0; t < nl; ++t) gt[t][bb] = gr[t * sg_l];                                        \
                }                                                                                                     \
                for (int64_t t = 0; t < nl; ++t) {                                                                    \
                    int64_t l = l0 + t;                                                                               \
                    row_backward_##SUFFIX(gt[t], xt, w + l * K, idx + l * K, gw ? gw + l * K : NULL, my, K, B, b0,   \
                                          nb);                                                                        \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
    if (gxt && scratch) {                                                                                             \
        int64_t n = D * B;                                                                                            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                         \
        for (int64_t e = 0; e < n; ++e) {                                                                             \
            T s = 0;                                                                                                  \
            for (int th = 0; th < nthreads; ++th) s += scratch[(size_t)th * n + e];                                   \
            gxt[e] = s;                                                                                               \
        }                                                                                                             \
        free(scratch);                                                                                                \
    }                                                                                                                 \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* ---- Group-shared fan-in ------------------------------------------------------------------------------------
 *
 * Groups of G labels share one index row: group g has idx[g, 0:K] and weights w[g, 0:G, 0:K]; order[g * G + r] is
 * the label in slot r of group g (-1: padding). Outputs and output gradients are label-major, [L, B] contiguous.
 * Per group the K input rows xt[idx[g, j]] (K x B, in L1 for K = 32, B = 64) are read once and reused by all G
 * labels: the forward keeps GROUP_ROWS labels' accumulators in registers while it walks the K rows once per block of
 * labels; the backward walks the K rows once, dotting each with the group's output-gradient rows (weight gradient)
 * and summing the labels' weighted gradient rows into the row's input gradient (per-thread [in, B] scratch).
 */
#define GROUP_ROWS 4
/* The weights of one group as T: the stored block itself, or (w_bf16, fp32 kernels only) the bf16 block widened into
 * the thread's buffer (bf16 is the top half of an fp32). */
static inline const float *group_weights_f32(const void *w, int w_bf16, int64_t g, int64_t n, float *buf) {
    if (!w_bf16) return (const float *)w + g * n;
    const uint16_t *src = (const uint16_t *)w + g * n;
    uint32_t *dst = (uint32_t *)buf;
    for (int64_t e = 0; e < n; ++e) dst[e] = (uint32_t)src[e] << 16;
    return buf;
}
static inline const double *group_weights_f64(const void *w, int w_bf16, int64_t g, int64_t n, double *buf) {
    (void)w_bf16; (void)buf;
    return (const double *)w + g * n;
}

/* Output-gradient elements a backward thread gathers at a time (1 MB of fp32: stays in L2). */
#define GATHER_ELEMENTS (1 << 18)

/* 16 fp32 dot products at once: the 16 vector partial sums s[0..15] reduced into one vector whose lane j is the sum
 * of s[j]'s lanes, by four levels of pairwise shuffles (45 operations instead of 16 separate horizontal sums). */
static inline vf32 reduce16_f32(vf32 *s) {
    vf32 a[8], b[4], c[2];
    for (int k = 0; k < 8; ++k)
        a[k] = __builtin_shufflevector(s[2 * k], s[2 * k + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(s[2 * k], s[2 * k + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                       30, 31);
    for (int k = 0; k < 4; ++k)
        b[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                                       27) +
               __builtin_shufflevector(a[2 * k], a[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                       31);
    for (int k = 0; k < 2; ++k)
        c[k] = __builtin_shufflevector(b[2 * k], b[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                                       29) +
               __builtin_shufflevector(b[2 * k], b[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                       31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* o[j] (+)= <g[0:64], xt[idx[j], b0:b0+64]> for j < K, a full batch tile; 16 inputs at a time for fp32. */
static inline void group_dots_f32(const float *restrict g, const float *restrict xt, const int32_t *restrict ix,
                                  int64_t K, int64_t B, int64_t b0, float *restrict o, int accumulate) {
    vf32 gv[NVEC_f32];
    for (int v = 0; v < NVEC_f32; ++v) gv[v] = *(const vf32 *)(g + v * LANES_f32);
    int64_t j = 0;
    for (; j + 16 <= K; j += 16) {
        vf32 sv[16];
        for (int t = 0; t < 16; ++t) {
            const float *restrict xr = xt + (int64_t)ix[j + t] * B + b0;
            vf32 acc = gv[0] * *(const vf32 *)xr;
            for (int v = 1; v < NVEC_f32; ++v) acc += gv[v] * *(const vf32 *)(xr + v * LANES_f32);
            sv[t] = acc;
        }
        vf32 sums = reduce16_f32(sv);
        if (accumulate) sums += *(const vf32 *)(o + j);
        *(vf32 *)(o + j) = sums;
    }
    for (; j < K; ++j) {
        const float *restrict xr = xt + (int64_t)ix[j] * B + b0;
        vf32 acc = gv[0] * *(const vf32 *)xr;
        for (int v = 1; v < NVEC_f32; ++v) acc += gv[v] * *(const vf32 *)(xr + v * LANES_f32);
        o[j] = accumulate ? o[j] + hsum_f32(acc) : hsum_f32(acc);
    }
}

static inline void group_dots_f64(const double *restrict g, const double *restrict xt, const int32_t *restrict ix,
                                  int64_t K, int64_t B, int64_t b0, double *restrict o, int accumulate) {
    vf64 gv[NVEC_f64];
    for (int v = 0; v < NVEC_f64; ++v) gv[v] = *(const vf64 *)(g + v * LANES_f64);
    for (int64_t j = 0; j < K; ++j) {
        const double *restrict xr = xt + (int64_t)ix[j] * B + b0;
        vf64 acc = gv[0] * *(const vf64 *)xr;
        for (int v = 1; v < NVEC_f64; ++v) acc += gv[v] * *(const vf64 *)(xr + v * LANES_f64);
        o[j] = accumulate ? o[j] + hsum_f64(acc) : hsum_f64(acc);
    }
}

#define DEFINE_GROUPED_KERNELS(T, SUFFIX)                                                                             \
void ffi_grouped_forward_##SUFFIX(const T *xt, const void *w, int w_bf16, const int32_t *idx, const int32_t *order,\
                                  const T *bias, T *out, int64_t NG, int64_t G, int64_t K, int64_t B, int nthreads) {\
    _Pragma("omp parallel num_threads(nthreads)")                                                                    \
    {                                                                                                                 \
    T *wbuf = w_bf16 ? (T *)malloc((size_t)G * K * sizeof(T)) : NULL;                                                \
    _Pragma("omp for schedule(static)")                                                                              \
    for (int64_t g = 0; g < NG; ++g) {                                                                               \
        const int32_t *ix = idx + g * K;                                                                              \
        const T *wg = group_weights_##SUFFIX(w, w_bf16, g, G * K, wbuf);                                              \
        for (int64_t r0 = 0; r0 < G; r0 += GROUP_ROWS) {                                                              \
            int64_t nr = G - r0 < GROUP_ROWS ? G - r0 : GROUP_ROWS;                                                   \
            const T *wr = wg + r0 * K;                                                                                \
            for (int64_t b0 = 0; b0 < B; b0 += BATCH_TILE) {                                                          \
                int64_t nb = B - b0 < BATCH_TILE ? B - b0 : BATCH_TILE;                                               \
                T acc[GROUP_ROWS][BATCH_TILE];                                                                        \
                if (nb == BATCH_TILE && nr == GROUP_ROWS) {                                                           \
                    v##SUFFIX a[GROUP_ROWS][NVEC_##SUFFIX];                                                           \
                    for (int t = 0; t < GROUP_ROWS; ++t)                                                              \
                        for (int v = 0; v < NVEC_##SUFFIX; ++v) a[t][v] = (v##SUFFIX){0};                             \
                    for (int64_t j = 0; j < K; ++j) {                                                                 \
                        const T *restrict xr = xt + (int64_t)ix[j] * B + b0;                                          \
                        v##SUFFIX xv[NVEC_##SUFFIX];                                                                  \
                        for (int v = 0; v < NVEC_##SUFFIX; ++v) xv[v] = *(const v##SUFFIX *)(xr + v * LANES_##SUFFIX);\
                        for (int t = 0; t < GROUP_ROWS; ++t) {                                                        \
                            const T wv = wr[t * K + j];                                                               \
                            for (int v = 0; v < NVEC_##SUFFIX; ++v) a[t][v] += wv * xv[v];                            \
                        }                                                                                             \
                    }                                                                                                 \
                    for (int t = 0; t < GROUP_ROWS; ++t)                                                              \
                        for (int v = 0; v < NVEC_##SUFFIX; ++v)                                                       \
                            *(v##SUFFIX *)(acc[t] + v * LANES_##SUFFIX) = a[t][v];                                    \
                } else {                                                                                              \
                    for (int64_t t = 0; t < nr; ++t) {                                                                \
                        for (int64_t bb = 0; bb < nb; ++bb) acc[t][bb] = 0;                                           \
                        row_axpy_##SUFFIX(acc[t], xt, wr + t * K, ix, K, B, b0, nb);                                  \
                    }                                                                                                 \
                }                                                                                                     \
                for (int64_t t = 0; t < nr; ++t) {                                                                    \
                    int32_t label = order[g * G + r0 + t];                                                            \
                    if (label < 0) continue;                                                                          \
                    T *o = out + (int64_t)label * B + b0;                                                             \
                    const T bv = bias ? bias[label] : (T)0;                                                           \
                    if (nb == BATCH_TILE && ((uintptr_t)o % VEC_BYTES) == 0) {                                        \
                        /* a row of the output is written once: stream it past the cache (no read for ownership \
                         * of a line that may be anywhere in memory) */                                               \
                        for (int v = 0; v < NVEC_##SUFFIX; ++v) {                                                     \
                            v##SUFFIX val = *(const v##SUFFIX *)(acc[t] + v * LANES_##SUFFIX) + bv;                   \
                            stream_##SUFFIX(o + v * LANES_##SUFFIX, val);                                             \
                        }                                                                                             \
                    } else {                                                                                          \
                        for (int64_t bb = 0; bb < nb; ++bb) o[bb] = acc[t][bb] + bv;                                  \
                    }                                                                                                 \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }                                                                                                                 \
    stream_fence();  /* each thread's streamed rows are visible before the region's barrier */                     \
    free(wbuf);                                                                                                       \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* gw[g, r, j] = <g_t[order[g, r]], xt[idx[g, j]]> (when gw is not NULL); gxt[i] = sum over (g, j) with idx[g, j] = i \
 * of sum_r w[g, r, j] * g_t[order[g, r]] (when gxt is not NULL); gb[l] = sum_b g_t[l, b] (when gb is not NULL).      \
 * Padding slots get zero weight gradients. */                                                                        \
void ffi_grouped_backward_##SUFFIX(const T *xt, const void *w, int w_bf16, const int32_t *idx, const int32_t *order,\
                                   const T *gt, T *gw, T *gxt, T *gb, int64_t NG, int64_t G, int64_t K, int64_t D,  \
                                   int64_t B, int nthreads) {                                                         \
    T *scratch = NULL;                                                                                                \
    if (gxt) {                                                                                                        \
        scratch = (T *)calloc((size_t)nthreads * (size_t)D * (size_t)B, sizeof(T));                                   \
        if (!scratch) { nthreads = 1; memset(gxt, 0, (size_t)D * (size_t)B * sizeof(T)); }                          \
    }                                                                                                                 \
    _Pragma("omp parallel num_threads(nthreads)")                                                                    \
    {                                                                                                                 \
        int tid = omp_get_thread_num();                                                                               \
        T *my = gxt ? (scratch ? scratch + (size_t)tid * D * B : gxt) : NULL;                                         \
        const T **rows = (const T **)malloc((size_t)G * sizeof(T *));                                                 \
        /* The output-gradient rows of a block of groups are copied together first: the labels sit anywhere in gt, \
         * and a loop of independent row copies keeps many cache misses in flight, which the arithmetic between    \
         * one group's reads would not. */                                                                        \
        int64_t block = GATHER_ELEMENTS / (G * B) > 0 ? GATHER_ELEMENTS / (G * B) : 1;                                \
        T *gathered = (T *)malloc((size_t)block * G * B * sizeof(T));                                                 \
        T *wbuf = w_bf16 ? (T *)malloc((size_t)G * K * sizeof(T)) : NULL;                                             \
        int64_t nblocks = (NG + block - 1) / block;                                                                   \
        _Pragma("omp for schedule(static)")                                                                          \
        for (int64_t blk = 0; blk < nblocks; ++blk) {                                                                \
          int64_t g0 = blk * block, g1 = g0 + block < NG ? g0 + block : NG;                                           \
          for (int64_t s = g0 * G; s < g1 * G; ++s) {                                                                 \
              T *dst = gathered + (s - g0 * G) * B;                                                                   \
              if (order[s] < 0) memset(dst, 0, (size_t)B * sizeof(T));                                                \
              else memcpy(dst, gt + (int64_t)order[s] * B, (size_t)B * sizeof(T));                                    \
          }                                                                                                           \
          for (int64_t g = g0; g < g1; ++g) {                                                                         \
            const int32_t *ix = idx + g * K;                                                                          \
            const T *wg = my ? group_weights_##SUFFIX(w, w_bf16, g, G * K, wbuf) : NULL;                              \
            for (int64_t r = 0; r < G; ++r) rows[r] = gathered + ((g - g0) * G + r) * B;                              \
            for (int64_t b0 = 0; b0 < B; b0 += BATCH_TILE) {                                                          \
                int64_t nb = B - b0 < BATCH_TILE ? B - b0 : BATCH_TILE;                                               \
                for (int64_t r = 0; gb && r < G; ++r) {                                                               \
                    int32_t label = order[g * G + r];                                                                 \
                    if (label < 0) continue;                                                                          \
                    T sum = 0;                                                                                        \
                    for (int64_t bb = 0; bb < nb; ++bb) sum += rows[r][b0 + bb];                                      \
                    gb[label] = b0 == 0 ? sum : gb[label] + sum;                                                      \
                }                                                                                                     \
                if (gw && nb == BATCH_TILE)                                                                           \
                    for (int64_t r = 0; r < G; ++r)                                                                   \
                        group_dots_##SUFFIX(rows[r] + b0, xt, ix, K, B, b0, gw + (g * G + r) * K, b0 != 0);           \
                for (int64_t j = 0; j < K; ++j) {                                                                     \
                    const int64_t i = ix[j];                                                                          \
                    const T *restrict xr = xt + i * B + b0;                                                           \
                    if (nb == BATCH_TILE) {                                                                           \
                        if (my) {                                                                                     \
                            v##SUFFIX acc[NVEC_##SUFFIX];                                                             \
                            for (int v = 0; v < NVEC_##SUFFIX; ++v) acc[v] = (v##SUFFIX){0};                          \
                            for (int64_t r = 0; r < G; ++r) {                                                         \
                                const T *restrict gr = rows[r] + b0;                                                  \
                                const T wv = wg[r * K + j];                                                           \
                                for (int v = 0; v < NVEC_##SUFFIX; ++v)                                               \
                                    acc[v] += wv * *(const v##SUFFIX *)(gr + v * LANES_##SUFFIX);                     \
                            }                                                                                         \
                            T *restrict dst = my + i * B + b0;                                                        \
                            for (int v = 0; v < NVEC_##SUFFIX; ++v)                                                   \
                                *(v##SUFFIX *)(dst + v * LANES_##SUFFIX) += acc[v];                                   \
                        }                                                                                             \
                    } else {                                                                                          \
                        for (int64_t r = 0; r < G; ++r) {                                                             \
                            const T *restrict gr = rows[r] + b0;                                                      \
                            if (gw) {                                                                                 \
                                T sum = 0;                                                                            \
                                for (int64_t bb = 0; bb < nb; ++bb) sum += gr[bb] * xr[bb];                           \
                                T *o = gw + (g * G + r) * K + j;                                                      \
                                *o = b0 == 0 ? sum : *o + sum;                                                        \
                            }                                                                                         \
                            if (my) {                                                                                 \
                                const T wv = wg[r * K + j];                                                           \
                                T *restrict dst = my + i * B + b0;                                                    \
                                for (int64_t bb = 0; bb < nb; ++bb) dst[bb] += wv * gr[bb];                           \
                            }                                                                                         \
                        }                                                                                             \
                    }                                                                                                 \
                }                                                                                                     \
            }                                                                                                         \
          }                                                                                                           \
        }                                                                                                             \
        free(rows);                                                                                                   \
        free(gathered);                                                                                               \
        free(wbuf);                                                                                                   \
    }                                                                                                                 \
    if (gxt && scratch) {                                                                                             \
        int64_t n = D * B;                                                                                            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                         \
        for (int64_t e = 0; e < n; ++e) {                                                                             \
            T s = 0;                                                                                                  \
            for (int th = 0; th < nthreads; ++th) s += scratch[(size_t)th * n + e];                                   \
            gxt[e] = s;                                                                                               \
        }                                                                                                             \
        free(scratch);                                                                                                \
    }                                                                                                                 \
}

DEFINE_GROUPED_KERNELS(float, f32)
DEFINE_GROUPED_KERNELS(double, f64)

/* ---- Regrowth (SET) ------------------------------------------------------------------------------------------- */

static inline uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform integer in [0, n) by Lemire's multiply-shift with rejection (exactly uniform). */
static inline uint64_t uniform_below(uint64_t *state, uint64_t n) {
    for (;;) {
        unsigned __int128 m = (unsigned __int128)splitmix64(state) * n;
        uint64_t low = (uint64_t)m;
        if (low >= n || low >= (0 - n) % n) return (uint64_t)(m >> 64);
    }
}

/*
 * For every row: replace the pruned slots by inputs drawn uniformly without replacement among the inputs the row does
 * not use (with exclude_old, not the pruned ones either), then sort the row. out_perm[l, j] is the slot of the
 * merged row that new slot j came from. Row l draws from its own stream seeded by (seed, l), so the result does not
 * depend on the number of threads. The sorted row is read straight off the occupancy bitmap (set bits in order), so
 * no sort is needed. Returns 0, or -1 if a row cannot be filled (too few free inputs) or memory ran out.
 */
int ffi_regrow(const int32_t *idx, const uint8_t *pruned, int64_t L, int64_t K, int64_t D, uint64_t seed,
               int exclude_old, int32_t *out_idx, int64_t *out_perm, int nthreads) {
    int64_t words = (D + 63) / 64;
    int failed = 0;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        uint64_t *taken = (uint64_t *)malloc((size_t)words * sizeof(uint64_t));
        uint64_t *final = (uint64_t *)malloc((size_t)words * sizeof(uint64_t));
        int32_t *slot_of = (int32_t *)malloc((size_t)D * sizeof(int32_t));
        int ok = taken && final && slot_of;
        if (!ok) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (int64_t l = 0; l < L; ++l) {
            if (!ok) continue;
            const int32_t *row = idx + l * K;
            const uint8_t *mask = pruned + l * K;
            memset(taken, 0, (size_t)words * sizeof(uint64_t));
            memset(final, 0, (size_t)words * sizeof(uint64_t));
            int64_t n_taken = 0, n_new = 0;
            for (int64_t j = 0; j < K; ++j) {
                const int64_t v = row[j];
                if (exclude_old || !mask[j]) { taken[v >> 6] |= 1ULL << (v & 63); ++n_taken; }
                if (!mask[j]) { final[v >> 6] |= 1ULL << (v & 63); slot_of[v] = (int32_t)j; }
                n_new += mask[j] ? 1 : 0;
            }
            if (D - n_taken < n_new) {
                _Pragma("omp atomic write")
                failed = 1;
                continue;
            }
            uint64_t state = seed ^ (0xD1B54A32D192ED03ULL * (uint64_t)(l + 1));
            for (int64_t j = 0; j < K; ++j) {
                if (!mask[j]) continue;
                int64_t v;
                do { v = (int64_t)uniform_below(&state, (uint64_t)D); } while (taken[v >> 6] & (1ULL << (v & 63)));
                taken[v >> 6] |= 1ULL << (v & 63);
                final[v >> 6] |= 1ULL << (v & 63);
                slot_of[v] = (int32_t)j;
            }
            int64_t out = l * K;
            for (int64_t wd = 0; wd < words; ++wd) {
                for (uint64_t bits = final[wd]; bits; bits &= bits - 1) {
                    const int64_t v = wd * 64 + __builtin_ctzll(bits);
                    out_idx[out] = (int32_t)v;
                    out_perm[out] = slot_of[v];
                    ++out;
                }
            }
        }
        free(taken);
        free(final);
        free(slot_of);
    }
    return failed ? -1 : 0;
}

/* ---- Pruning by magnitude ------------------------------------------------------------------------------------- */

/*
 * out[l, j] = 1 for the connections to prune. mode 0 (fraction): the `count` smallest |w| of each row; mode 1
 * (threshold): |w| < threshold, at most `count` per row (the smallest). Ties go to the lower slot. Each slot's rank
 * is counted against the whole row with branch-free compares, which vectorise; a selection algorithm would branch
 * unpredictably on every comparison.
 */
void ffi_prune_f32(const float *w, int64_t L, int64_t K, int mode, float threshold, int64_t count, uint8_t *out,
                   int nthreads) {
    _Pragma("omp parallel num_threads(nthreads)")
    {
        float *mag = (float *)malloc((size_t)K * sizeof(float));
        int32_t *rank = (int32_t *)malloc((size_t)K * sizeof(int32_t));
        _Pragma("omp for schedule(static)")
        for (int64_t l = 0; l < L; ++l) {
            const float *row = w + l * K;
            uint8_t *o = out + l * K;
            for (int64_t j = 0; j < K; ++j) { mag[j] = __builtin_fabsf(row[j]); rank[j] = 0; }
            for (int32_t k = 0; k < (int32_t)K; ++k) {  /* rank[j] = #{k : (mag[k], k) < (mag[j], j)} */
                const float mk = mag[k];
                for (int32_t j = 0; j < (int32_t)K; ++j) rank[j] += (mk < mag[j]) | ((mk == mag[j]) & (k < j));
            }
            for (int64_t j = 0; j < K; ++j) o[j] = (uint8_t)(rank[j] < count && (mode == 0 || mag[j] < threshold));
        }
        free(mag);
        free(rank);
    }
}
