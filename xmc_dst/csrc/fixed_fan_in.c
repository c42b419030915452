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

/* acc[0:n] = init + sum_j w[j] * xt[idx[j], b0:b0+n]. With n == BATCH_TILE the trip count is a constant, so the
 * accumulator lives in vector registers across the connections instead of going through memory. */
#define DEFINE_ROW_KERNELS(T, SUFFIX)                                                                                 \
static inline void row_axpy_##SUFFIX(T *restrict acc, const T *restrict xt, const T *restrict w,                     \
                                     const int32_t *restrict idx, int64_t K, int64_t B, int64_t b0, int64_t n) {     \
    if (n == BATCH_TILE) {                                                                                            \
        T a[BATCH_TILE];                                                                                              \
        for (int64_t bb = 0; bb < BATCH_TILE; ++bb) a[bb] = acc[bb];                                                  \
        for (int64_t j = 0; j < K; ++j) {                                                                             \
            const T wv = w[j];                                                                                        \
            const T *restrict xr = xt + (int64_t)idx[j] * B + b0;                                                     \
            _Pragma("omp simd")                                                                                      \
            for (int64_t bb = 0; bb < BATCH_TILE; ++bb) a[bb] += wv * xr[bb];                                         \
        }                                                                                                             \
        for (int64_t bb = 0; bb < BATCH_TILE; ++bb) acc[bb] = a[bb];                                                  \
    } else {                                                                                                          \
        for (int64_t j = 0; j < K; ++j) {                                                                             \
            const T wv = w[j];                                                                                        \
            const T *restrict xr = xt + (int64_t)idx[j] * B + b0;                                                     \
            _Pragma("omp simd")                                                                                      \
            for (int64_t bb = 0; bb < n; ++bb) acc[bb] += wv * xr[bb];                                                \
        }                                                                                                             \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* gw[j] (+)= sum_b g[b] * xt[idx[j], b0 + b] and acc[idx[j], b0 + b] += w[j] * g[b], for one label. */              \
static inline void row_backward_##SUFFIX(const T *restrict g, const T *restrict xt, const T *restrict w,             \
                                         const int32_t *restrict idx, T *restrict gw, T *restrict acc, int64_t K,    \
                                         int64_t B, int64_t b0, int64_t n) {                                          \
    for (int64_t j = 0; j < K; ++j) {                                                                                 \
        const int64_t i = idx[j];                                                                                     \
        if (gw) {                                                                                                     \
            const T *restrict xr = xt + i * B + b0;                                                                   \
            T s = 0;                                                                                                  \
            _Pragma("omp simd reduction(+:s)")                                                                       \
            for (int64_t bb = 0; bb < n; ++bb) s += g[bb] * xr[bb];                                                   \
            gw[j] = b0 == 0 ? s : gw[j] + s;                                                                          \
        }                                                                                                             \
        if (acc) {                                                                                                    \
            const T wv = w[j];                                                                                        \
            T *restrict r = acc + i * B + b0;                                                                         \
            _Pragma("omp simd")                                                                                      \
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
 * depend on the number of threads. Returns 0, or -1 if a row cannot be filled (too few free inputs).
 */
int ffi_regrow(const int32_t *idx, const uint8_t *pruned, int64_t L, int64_t K, int64_t D, uint64_t seed,
               int exclude_old, int32_t *out_idx, int64_t *out_perm, int nthreads) {
    int64_t words = (D + 63) / 64;
    int failed = 0;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        uint64_t *bits = (uint64_t *)malloc((size_t)words * sizeof(uint64_t));
        int64_t *key = (int64_t *)malloc((size_t)K * sizeof(int64_t));
        if (!bits || !key) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (int64_t l = 0; l < L; ++l) {
            if (!bits || !key) continue;
            const int32_t *row = idx + l * K;
            const uint8_t *mask = pruned + l * K;
            memset(bits, 0, (size_t)words * sizeof(uint64_t));
            int64_t n_taken = 0;
            for (int64_t j = 0; j < K; ++j) {
                if (exclude_old || !mask[j]) { bits[row[j] >> 6] |= 1ULL << (row[j] & 63); ++n_taken; }
            }
            int64_t n_new = 0;
            for (int64_t j = 0; j < K; ++j) n_new += mask[j] ? 1 : 0;
            if (D - n_taken < n_new) {
                _Pragma("omp atomic write")
                failed = 1;
                continue;
            }
            uint64_t state = seed ^ (0xD1B54A32D192ED03ULL * (uint64_t)(l + 1));
            for (int64_t j = 0; j < K; ++j) {
                int64_t value = row[j];
                if (mask[j]) {
                    do { value = (int64_t)uniform_below(&state, (uint64_t)D); }
                    while (bits[value >> 6] & (1ULL << (value & 63)));
                    bits[value >> 6] |= 1ULL << (value & 63);
                }
                key[j] = value * K + j; /* sort by value; values are unique, the slot rides along */
            }
            for (int64_t a = 1; a < K; ++a) { /* insertion sort: rows are short and mostly sorted */
                int64_t v = key[a], b = a - 1;
                while (b >= 0 && key[b] > v) { key[b + 1] = key[b]; --b; }
                key[b + 1] = v;
            }
            for (int64_t j = 0; j < K; ++j) {
                out_idx[l * K + j] = (int32_t)(key[j] / K);
                out_perm[l * K + j] = key[j] % K;
            }
        }
        free(bits);
        free(key);
    }
    return failed ? -1 : 0;
}
