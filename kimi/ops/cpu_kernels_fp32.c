// kimi's C kernels for fp32 models on CPUs without native bf16 (AVX2 + FMA: most laptops, AMD Zen 2-3), built and
// loaded by kimi/ops/cpu_kernels.py. Activations and sums are fp32; the weight is read as bf16 and widened in
// registers, which is exact where the fp32 weight is bf16-representable (a bf16 checkpoint loaded in fp32): the
// product is the fp32 product, in a different summation order, from half the bytes. Batch-1 decode streams every
// weight once per token, so half the bytes is up to twice the speed. In file order: gemv, MLA absorbed decode
// attention, one token through a SwiGLU MLP or routed expert; then the small per-token steps that in torch are
// several ops each (~5-20 us apiece, ~100 per token at bench size): RMSNorm, MLA's projections for one token,
// one token's MoE routing, a whole MoE block for one token, and KDA decode of single tokens.
//
// gemv: y = x W^T. x [M, K] fp32, W [N, K] bf16 (row-major, one output feature per row), y [M, N] fp32.
// Up to GEMV_MAX_ROWS rows of x (bandwidth-bound): accumulated along K in 4 x 8 lanes, then reduced; rows of x in
// blocks of four share each widened weight (row4). W streams one row at a time, start to end (the one sequential
// stream the hardware prefetcher follows best), with a software prefetch 1 KB ahead (8-13% faster on an AVX2 EPYC,
// where the plain loop reached ~11 GB/s of ~17 GB/s one core reads); a row, a few KB, is reused from L1 for all M
// rows of x. A prefetch never faults, so running past the end of W is harmless. More rows (a decode batch: compute-
// bound) go through register tiles of 4 rows of x by 3 of W over cache blocks of both (gemm_block).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "cpu_route.h"

static inline __m256 load_bf16(const uint16_t *p) {  // 8 bf16 -> 8 fp32: the bf16 bits are a float's top half
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline float from_bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

static inline float reduce_add(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// row n of W against four rows of x (x [4, K]): each eight weights are widened once for all four rows, so with a few
// rows (a decode batch, a routed expert's tokens) the product is FMA-bound, not conversion-bound
static inline void row4(const float *x, int64_t K, const uint16_t *w, int64_t N, int64_t n, float *y, int prefetch) {
    const int64_t K16 = K & ~(int64_t)15, K8 = K & ~(int64_t)7;
    __m256 a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
        if (prefetch) _mm_prefetch((const char *)(w + k) + 1024, _MM_HINT_T0);
        const __m256 w0 = load_bf16(w + k), w1 = load_bf16(w + k + 8);
        for (int j = 0; j < 4; j++) {
            a[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * K + k), a[j][0]);
            a[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * K + k + 8), a[j][1]);
        }
    }
    for (; k < K8; k += 8) {
        const __m256 w0 = load_bf16(w + k);
        for (int j = 0; j < 4; j++) a[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * K + k), a[j][0]);
    }
    for (int j = 0; j < 4; j++) {
        float s = reduce_add(_mm256_add_ps(a[j][0], a[j][1]));
        for (int64_t i = k; i < K; i++) s += from_bf16(w[i]) * x[j * K + i];
        y[j * N + n] = s;
    }
}

// row n of W against every row of x: blocks of four rows (row4), then one at a time with four accumulators along K,
// so four FMA chains are in flight while W streams
static void row(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, int64_t n, float *y) {
    const int64_t K32 = K & ~(int64_t)31, K8 = K & ~(int64_t)7;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row4(x + m * K, K, w, N, n, y + m * N, m == 0);
    for (; m < M; m++) {
        const float *xm = x + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k < K32; k += 32) {
            if (m == 0) _mm_prefetch((const char *)(w + k) + 1024, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(xm + k), a0);
            a1 = _mm256_fmadd_ps(load_bf16(w + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
            a2 = _mm256_fmadd_ps(load_bf16(w + k + 16), _mm256_loadu_ps(xm + k + 16), a2);
            a3 = _mm256_fmadd_ps(load_bf16(w + k + 24), _mm256_loadu_ps(xm + k + 24), a3);
        }
        for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(xm + k), a0);
        float s = reduce_add(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; k++) s += from_bf16(w[k]) * xm[k];
        y[m * N + n] = s;
    }
}

int kimi_fp32_kernels_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// gemm tiles, for more rows than a few: TILE_R rows of x against TILE_C rows of W at once, TILE_R x TILE_C independent
// accumulators along K. Per 8 weights of each W row: TILE_C widenings, TILE_R loads of x, TILE_R x TILE_C FMAs (12
// FMAs to 7 loads), so the product is FMA-bound where row4 (8 FMAs to 10 loads) is load-bound. Each y element has one
// 8-lane accumulator over K, reduced, then the K % 8 tail: the same order whichever tile and thread computes it.
#define TILE_R 4
#define TILE_C 3
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const uint16_t *w, int64_t N,
                                                       int64_t n, float *y, const int R, const int C) {
    const int64_t K8 = K & ~(int64_t)7;
    __m256 a[TILE_R][TILE_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) a[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv[TILE_C];
        for (int c = 0; c < C; c++) wv[c] = load_bf16(w + c * K + k);
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_loadu_ps(x + r * K + k);
            for (int c = 0; c < C; c++) a[r][c] = _mm256_fmadd_ps(wv[c], xv, a[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = reduce_add(a[r][c]);
            for (int64_t k = K8; k < K; k++) s += from_bf16(w[c * K + k]) * x[r * K + k];
            y[r * N + n + c] = s;
        }
}

// y[:, n0:n1] for W rows n0 .. n1 - 1 (a block of ~96 KB, kept in L2), x in blocks of GEMM_MB rows (kept in L1): each
// W tile is reused from L1 for the block's rows
#define GEMM_MB 8
static void gemm_block(const float *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t n0, int64_t n1,
                       float *y) {
    for (int64_t m0 = 0; m0 < M; m0 += GEMM_MB) {
        const int64_t m1 = m0 + GEMM_MB < M ? m0 + GEMM_MB : M;
        for (int64_t n = n0; n < n1; n += TILE_C) {
            const uint16_t *w = W + n * K;
            int64_t m = m0;
            if (n + TILE_C <= n1) {
                for (; m + TILE_R <= m1; m += TILE_R) tile(x + m * K, K, w, N, n, y + m * N, TILE_R, TILE_C);
                for (; m < m1; m++) tile(x + m * K, K, w, N, n, y + m * N, 1, TILE_C);
            } else {  // the last one or two rows of W
                for (; m < m1; m++)
                    for (int64_t c = n; c < n1; c++) tile(x + m * K, K, W + c * K, N, c, y + m * N, 1, 1);
            }
        }
    }
}

// up to this many rows of x, W streams row by row (row4 / row: bandwidth-bound, one sequential stream); more rows
// go through the tiles (FMA-bound)
#define GEMV_MAX_ROWS 12

// one unit of kimi_gemv_f32_bf16w's work: W row i (up to GEMV_MAX_ROWS rows of x) or its block i of nb rows (more)
static void gemv_unit(const float *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t nb, int64_t i,
                      float *y) {
    if (M <= GEMV_MAX_ROWS) row(x, M, K, W + i * K, N, i, y);
    else gemm_block(x, M, K, W, N, i * nb, i * nb + nb < N ? i * nb + nb : N, y);
}

void kimi_gemv_f32_bf16w(const float *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, float *y, int threads) {
    int64_t nb = (96 * 1024 / (2 * K)) / TILE_C * TILE_C;  // W rows per block: ~96 KB of bf16, whole tiles
    if (nb < TILE_C) nb = TILE_C;
    const int64_t units = M <= GEMV_MAX_ROWS ? N : (N + nb - 1) / nb;
    if (threads > 1 && N >= 256) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < units; i++) gemv_unit(x, M, K, W, N, nb, i, y);
    } else {  // no OpenMP region at all: entering one costs microseconds even with one thread
        for (int64_t i = 0; i < units; i++) gemv_unit(x, M, K, W, N, nb, i, y);
    }
}


// sum_i a[i] * b[i], a fp32, b bf16
static inline float dot_bf16(const float *a, const uint16_t *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_bf16(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load_bf16(b + i + 8), s1);
    }
    float s = reduce_add(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * from_bf16(b[i]);
    return s;
}

// sum_i a[i] * b[i], both fp32
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = reduce_add(s0);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// y[i] += a * x[i], y fp32, x bf16
static inline void axpy_bf16(float *y, float a, const uint16_t *x, int64_t n) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load_bf16(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * from_bf16(x[i]);
}

#define HB 8  // heads per register block in the attention loops below

// dots of one context row with HB heads' queries: out[j] = q[j * W :] . row, q [HB, W], row [W], both fp32. The row
// is loaded once for all HB heads.
static inline void dots_block(const float *q, int64_t W, const float *row, float *out) {
    __m256 acc[HB];
    for (int j = 0; j < HB; j++) acc[j] = _mm256_setzero_ps();
    const int64_t W8 = W & ~(int64_t)7;
    for (int64_t c = 0; c < W8; c += 8) {
        const __m256 x = _mm256_loadu_ps(row + c);
        for (int j = 0; j < HB; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * W + c), x, acc[j]);
    }
    for (int j = 0; j < HB; j++) {
        out[j] = reduce_add(acc[j]);
        for (int64_t c = W8; c < W; c++) out[j] += q[j * W + c] * row[c];
    }
}

// o[j * ostride :][:r] += sum_s p[j * n + s] * rows[s][:r] for HB heads j, eight columns at a time in registers:
// each row's eight columns are loaded once for all HB heads. Columns past the last multiple of 8 are left to the
// caller.
static inline void weighted_rows_block(const float *p, int64_t n, const float *const *rowp, int64_t r, float *o,
                                       int64_t ostride) {
    for (int64_t c = 0; c + 8 <= r; c += 8) {
        __m256 acc[HB];
        for (int j = 0; j < HB; j++) acc[j] = _mm256_loadu_ps(o + j * ostride + c);
        for (int64_t s = 0; s < n; s++) {
            const __m256 x = _mm256_loadu_ps(rowp[s] + c);
            for (int j = 0; j < HB; j++) acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j * n + s), x, acc[j]);
        }
        for (int j = 0; j < HB; j++) _mm256_storeu_ps(o + j * ostride + c, acc[j]);
    }
}

// x[i] = exp(x[i] - max x) for n > 0 scores; returns the max, and the sum of the exponentials in *sum
static float exp_scores(float *x, int64_t n, float *sum) {
    float m = -INFINITY, l = 0.0f;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    for (int64_t i = 0; i < n; i++) l += (x[i] = expf(x[i] - m));
    *sum = l;
    return m;
}

// context rows per task of kimi_mla_decode_f32: a fixed split, so one sequence's result depends neither on the
// thread count nor on the other sequences of the batch, and a long context is shared among threads
#define CTX_CHUNK 512

// MLA's absorbed decode (k2.md §2.3) for B single-token queries over a paged fp32 latent cache, one call per layer:
//   q_lat = W_UK^T q_nope; score_s = scale * [q_lat, q_pe] . cache[row_s]; p = softmax(score);
//   o_lat = sum_s p_s cache[row_s][:r]; out = W_UV o_lat.
// q_nope [B, H, nope], q_pe [B, H, rope] fp32; kv_b [H, nope + v, r] bf16 (the bf16 copy of kv_b_proj.weight: W_UK
// rows, then W_UV rows); cache [R, W = r + rope] fp32; rows [B, S] cache rows of each context (or NULL: one
// sequence at rows start..); lengths [B] (sequence b reads rows[b, :lengths[b]]); out [B, H, v] fp32. All fp32, as
// ops/attention.py's torch path computes it, summed in another order. The context is read in place, never
// gathered. Each sequence's context is split into chunks of CTX_CHUNK rows, attended in parallel (flash-decoding):
// a chunk's rows are read twice (scores, then the weighted sum of exp(score - chunk max)) while they are in cache,
// and the chunks merge in order, rescaled to the sequence's max. Returns 0, or -1 when scratch memory ran out.
int kimi_mla_decode_f32(const float *q_nope, const float *q_pe, const uint16_t *kv_b, const float *cache,
                        const int64_t *rows, int64_t start, const int64_t *lengths, int64_t B, int64_t S, int64_t H,
                        int64_t nope, int64_t rope, int64_t v, int64_t r, float scale, float *out, int threads) {
    const int64_t W = r + rope, P = r + 2;  // a chunk's partial per head: o [r], its max, its sum
    const int64_t HB_END = H - H % HB, R8 = r & ~(int64_t)7;  // heads and columns the register blocks cover
    int64_t *first = (int64_t *)malloc((size_t)(B + 1) * sizeof(int64_t));  // sequence b's chunks: first[b] ..
    if (!first) return -1;
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) first[b + 1] = first[b] + (lengths[b] + CTX_CHUNK - 1) / CTX_CHUNK;
    const int64_t T = first[B];
    int64_t *task_seq = (int64_t *)malloc((size_t)(T > 0 ? T : 1) * sizeof(int64_t));
    float *q = (float *)malloc((size_t)(B * H * W + T * H * P) * sizeof(float));  // [B, H, W] queries, partials
    if (!task_seq || !q) {
        free(first); free(task_seq); free(q);
        return -1;
    }
    float *part = q + B * H * W;  // [T, H, P]
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = first[b]; t < first[b + 1]; t++) task_seq[t] = b;

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B > 1)
    for (int64_t b = 0; b < B; b++)  // the absorbed queries [q_lat | q_pe]
        for (int64_t h = 0; h < H; h++) {
            float *qh = q + (b * H + h) * W;
            for (int64_t j = 0; j < r; j++) qh[j] = 0.0f;
            const float *qn = q_nope + (b * H + h) * nope;
            for (int64_t i = 0; i < nope; i++) axpy_bf16(qh, qn[i], kv_b + (h * (nope + v) + i) * r, r);
            for (int64_t j = 0; j < rope; j++) qh[r + j] = q_pe[(b * H + h) * rope + j];
        }

    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && T > 1) reduction(| : failed)
    for (int64_t t = 0; t < T; t++) {  // one chunk of one sequence
        const int64_t b = task_seq[t], s0 = (t - first[b]) * CTX_CHUNK;
        const int64_t n = lengths[b] - s0 < CTX_CHUNK ? lengths[b] - s0 : CTX_CHUNK;
        float *score = (float *)malloc((size_t)(H * n) * sizeof(float));  // [H, n]
        const float **rowp = (const float **)malloc((size_t)n * sizeof(*rowp));
        if (!score || !rowp) {
            free(score); free(rowp);
            failed = 1;
            continue;
        }
        for (int64_t s = 0; s < n; s++) rowp[s] = cache + (rows ? rows[b * S + s0 + s] : start + s0 + s) * W;
        const float *qb = q + b * H * W;
        for (int64_t s = 0; s < n; s++) {
            float dots[HB];
            for (int64_t h = 0; h < HB_END; h += HB) {
                dots_block(qb + h * W, W, rowp[s], dots);
                for (int j = 0; j < HB; j++) score[(h + j) * n + s] = dots[j] * scale;
            }
            for (int64_t h = HB_END; h < H; h++) score[h * n + s] = dot_f32(qb + h * W, rowp[s], W) * scale;
        }
        float *o = part + t * H * P;
        for (int64_t h = 0; h < H; h++) {
            o[h * P + r] = exp_scores(score + h * n, n, o + h * P + r + 1);
            for (int64_t j = 0; j < r; j++) o[h * P + j] = 0.0f;
        }
        for (int64_t h = 0; h < HB_END; h += HB) weighted_rows_block(score + h * n, n, rowp, r, o + h * P, P);
        for (int64_t s = 0; s < n; s++)  // what the blocks leave: heads past HB_END, columns past R8
            for (int64_t h = 0; h < H; h++)
                for (int64_t j = h < HB_END ? R8 : 0; j < r; j++) o[h * P + j] += score[h * n + s] * rowp[s][j];
        free(score);
        free(rowp);
    }

    if (!failed) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B > 1)
        for (int64_t b = 0; b < B; b++)  // merge the chunks in order, then out = W_UV o_lat
            for (int64_t h = 0; h < H; h++) {
                if (first[b + 1] == first[b]) {  // an empty context attends to nothing
                    for (int64_t j = 0; j < v; j++) out[(b * H + h) * v + j] = 0.0f;
                    continue;
                }
                float *o = part + (first[b] * H + h) * P;  // the first chunk's partial, which gathers the rest
                float m = -INFINITY;
                for (int64_t t = first[b]; t < first[b + 1]; t++) m = fmaxf(m, part[(t * H + h) * P + r]);
                float l = 0.0f;
                for (int64_t t = first[b]; t < first[b + 1]; t++) {
                    const float *pt = part + (t * H + h) * P;
                    const float c = expf(pt[r] - m);
                    l += c * pt[r + 1];
                    if (t == first[b]) for (int64_t j = 0; j < r; j++) o[j] *= c;
                    else for (int64_t j = 0; j < r; j++) o[j] += c * pt[j];
                }
                const float inv = 1.0f / l;
                for (int64_t j = 0; j < r; j++) o[j] *= inv;
                for (int64_t j = 0; j < v; j++)
                    out[(b * H + h) * v + j] = dot_bf16(o, kv_b + (h * (nope + v) + nope + j) * r, r);
            }
    }
    free(first);
    free(task_seq);
    free(q);
    return failed ? -1 : 0;
}

// One token through a SwiGLU MLP with bf16 weights, fp32 throughout: [g; u] = gate_up x, h = silu(g) * u,
// y = down h; x [D], gate_up [2I, D] (gate rows, then up rows), down [D, I]. total == NULL: out = y; else
// total += weight * y (a routed expert's weighted term, as model/moe.py's Experts._accumulate adds it in fp32).
// Returns 0, or -1 when scratch memory ran out.
int kimi_swiglu_f32(const float *x, int64_t D, const uint16_t *gate_up, const uint16_t *down, int64_t I, float weight,
                    float *total, float *out) {
    float *gu = (float *)malloc((size_t)(2 * I + D) * sizeof(float));
    if (!gu) return -1;
    float *y = gu + 2 * I;
    for (int64_t n = 0; n < 2 * I; n++) row(x, 1, D, gate_up + n * D, 2 * I, n, gu);
    for (int64_t i = 0; i < I; i++) gu[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[I + i];
    for (int64_t n = 0; n < D; n++) row(gu, 1, I, down + n * I, D, n, y);
    if (total)
        for (int64_t n = 0; n < D; n++) total[n] += y[n] * weight;
    else
        for (int64_t n = 0; n < D; n++) out[n] = y[n];
    free(gu);
    return 0;
}

// model/layers.py's RMSNorm on M fp32 rows: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps); x, y [M, D], w [D].
// y may be x.
void kimi_rmsnorm_f32(const float *x, int64_t M, int64_t D, const float *w, float eps, float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float r = 1.0f / sqrtf(dot_f32(x + m * D, x + m * D, D) / (float)D + eps);
        for (int64_t i = 0; i < D; i++) y[m * D + i] = w[i] * (x[m * D + i] * r);
    }
}

// rotate interleaved pairs (x[2j], x[2j+1]) of one vector by angle j and write them de-interleaved, [rotated evens |
// rotated odds] (model/layers.py's apply_rope); cos, sin [dim / 2]
static void rope_one(const float *x, int64_t dim, const float *cos, const float *sin, float *y) {
    const int64_t half = dim / 2;
    for (int64_t j = 0; j < half; j++) {
        const float x1 = x[2 * j], x2 = x[2 * j + 1];
        y[j] = x1 * cos[j] - x2 * sin[j];
        y[half + j] = x2 * cos[j] + x1 * sin[j];
    }
}

// The tail of MLA.project for one fp32 token, after its products: q [H, nope + rope] (q_b_proj's or q_proj's
// output), kv [r + rope] (kv_a_proj_with_mqa's) -> q_pe [H, rope] rotated, latent [r + rope] = [RMSNorm(c_kv) |
// rotated k_pe]. cos, sin [rope / 2], or NULL for NoPE layers (the rope slices pass through unrotated).
void kimi_mla_project_one_f32(const float *q, int64_t H, int64_t nope, int64_t rope, const float *kv, int64_t r,
                              const float *norm_w, float eps, const float *cos, const float *sin, float *q_pe,
                              float *latent) {
    kimi_rmsnorm_f32(kv, 1, r, norm_w, eps, latent);
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + h * (nope + rope) + nope;
        if (cos) rope_one(qh, rope, cos, sin, q_pe + h * rope);
        else for (int64_t j = 0; j < rope; j++) q_pe[h * rope + j] = qh[j];
    }
    if (cos) rope_one(kv + r, rope, cos, sin, latent + r);
    else for (int64_t j = 0; j < rope; j++) latent[r + j] = kv[r + j];
}

// MoE routing of one fp32 token (model/moe.py's Router): s = sigmoid(x W^T) over E experts, then cpu_route.h's
// selection. x [D], W [E, D], bias [E] -> idx [k], w [k]. E <= 1024.
void kimi_route_one_f32(const float *x, int64_t D, const float *W, const float *bias, int64_t E, int64_t n_group,
                        int64_t topk_group, int64_t k, int norm, float scaling, int64_t *idx, float *w) {
    float s[1024];
    for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-dot_f32(x, W + e * D, D)));
    route_select(s, bias, E, n_group, topk_group, k, norm, scaling, idx, w);
}

// MLA.project for one fp32 token from the layer's input: [q_in | kv] = in_w x (q_a_proj's or q_proj's rows stacked
// with kv_a_proj_with_mqa's, bf16 copies: one weight stream); with q_b (K2's low-rank q) q = q_b RMSNorm(q_in), else
// q = q_in; then kimi_mla_project_one_f32's tail. x [D]; in_w [n_q + r + rope, D]; q_norm_w [n_q] (or NULL without
// q_b); q_b [H * (nope + rope), n_q] -> q [H, nope + rope], q_pe [H, rope], latent [r + rope]. Returns 0, or -1 when
// scratch memory ran out.
int kimi_mla_project_x_f32(const float *x, int64_t D, const uint16_t *in_w, int64_t n_q, const float *q_norm_w,
                           float q_eps, const uint16_t *q_b, int64_t H, int64_t nope, int64_t rope, int64_t r,
                           const float *kv_norm_w, float kv_eps, const float *cos, const float *sin, float *q,
                           float *q_pe, float *latent) {
    const int64_t n_in = n_q + r + rope, qk = nope + rope;
    float *in = (float *)malloc((size_t)n_in * sizeof(float));
    if (!in) return -1;
    for (int64_t n = 0; n < n_in; n++) row(x, 1, D, in_w + n * D, n_in, n, in);
    if (q_b) {
        kimi_rmsnorm_f32(in, 1, n_q, q_norm_w, q_eps, in);
        for (int64_t n = 0; n < H * qk; n++) row(in, 1, n_q, q_b + n * n_q, H * qk, n, q);
    } else {
        for (int64_t n = 0; n < H * qk; n++) q[n] = in[n];
    }
    kimi_mla_project_one_f32(q, H, nope, rope, in + n_q, r, kv_norm_w, kv_eps, cos, sin, q_pe, latent);
    free(in);
    return 0;
}

// model/moe.py's MoE for one fp32 token, in one call: route x (router_w [E, D] fp32, bias [E]; cpu_route.h), add
// the k chosen experts' weighted outputs in ascending expert id, as Experts._one_token sums them, then the shared
// experts' output (shared_gate_up NULL: none). Experts: gate_up [E, 2I, D], down [E, D, I]; shared: [2Is, D],
// [D, Is]; all bf16 copies. x [D] -> out [D]. Returns 0, or -1 when scratch memory ran out.
int kimi_moe_one_f32(const float *x, int64_t D, const float *router_w, const float *bias, int64_t E, int64_t n_group,
                     int64_t topk_group, int64_t k, int norm, float scaling, const uint16_t *gate_up,
                     const uint16_t *down, int64_t I, const uint16_t *shared_gate_up, const uint16_t *shared_down,
                     int64_t Is, float *out) {
    int64_t idx[k];
    float w[k];
    kimi_route_one_f32(x, D, router_w, bias, E, n_group, topk_group, k, norm, scaling, idx, w);
    for (int64_t i = 1; i < k; i++)  // ascending expert id (insertion sort: k is small)
        for (int64_t j = i; j > 0 && idx[j] < idx[j - 1]; j--) {
            const int64_t t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t;
            const float u = w[j]; w[j] = w[j - 1]; w[j - 1] = u;
        }
    for (int64_t n = 0; n < D; n++) out[n] = 0.0f;
    for (int64_t j = 0; j < k; j++)
        if (kimi_swiglu_f32(x, D, gate_up + idx[j] * 2 * I * D, down + idx[j] * D * I, I, w[j], out, NULL)) return -1;
    if (shared_gate_up && kimi_swiglu_f32(x, D, shared_gate_up, shared_down, Is, 1.0f, out, NULL)) return -1;
    return 0;
}

// y[j] = a * y[j] for j < n, and acc[j] += b * y[j] (after the scaling)
static inline void scale_then_axpy(float *y, float a, float b, float *acc, int64_t n) {
    const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(y + j), av);
        _mm256_storeu_ps(y + j, s);
        _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(bv, s, _mm256_loadu_ps(acc + j)));
    }
    for (; j < n; j++) acc[j] += b * (y[j] *= a);
}

// y[j] += a * d[j], then acc[j] += b * y[j]
static inline void axpy_then_axpy(float *y, float a, const float *d, float b, float *acc, int64_t n) {
    const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 s = _mm256_fmadd_ps(av, _mm256_loadu_ps(d + j), _mm256_loadu_ps(y + j));
        _mm256_storeu_ps(y + j, s);
        _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(bv, s, _mm256_loadu_ps(acc + j)));
    }
    for (; j < n; j++) acc[j] += b * (y[j] += a * d[j]);
}

// One head of the causal depthwise short conv for one token, + SiLU, for the n channels from c0 of a [3P]-wide row:
// y = silu(sum_j window[j] w[j]) over the window [the k-1 previous inputs, this input] (model/kda.py's one-token
// conv); the window then slides by one, in place.
static void conv_silu(const float *x, const float *w, float *window, int64_t k, int64_t c0, int64_t n, float *y) {
    for (int64_t c = c0; c < c0 + n; c++) {
        float *win = window + c * (k - 1);
        const float *wc = w + c * k;
        float acc = x[c] * wc[k - 1];
        for (int64_t j = 0; j < k - 1; j++) acc += win[j] * wc[j];
        for (int64_t j = 0; j + 1 < k - 1; j++) win[j] = win[j + 1];
        if (k > 1) win[k - 2] = x[c];
        y[c - c0] = acc / (1.0f + expf(-acc));
    }
}

// KDA decode of B single fp32 tokens, each sequence's short-conv window and state read and updated in place in the
// engine's pools (model/kda.py's KDA.forward between its projections and o_proj; cpu_kernels.c's
// kimi_kda_decode_bf16 is the same step with bf16 roundings; kda.md §1): per head, q, k, v = silu(conv(.)); q, k
// L2-normalised (q also times K^-1/2); g = -exp(A_log) softplus(f + dt_bias), beta = sigmoid(b);
// S = exp(g) * S (per key row), S += k (beta (v - k S)), o = q S; out = w * rmsnorm(o) * sigmoid(gate) per head.
// qkv [B, 3P], f [B, P], b [B, H], gate [B, P], conv_w [3P, k], norm_w [V], dt_bias [P], A_log [H];
// windows [slots, 3P, k-1] and states [slots, H, K, V], indexed by slot [B]; out [B, H V]. K, V <= 256.
// Returns 0, or -1 (touching nothing) when a slot is outside [0, num_slots).
int kimi_kda_decode_f32(const float *qkv, const float *f, const float *b, const float *gate, const float *conv_w,
                        int64_t k, const float *dt_bias, const float *A_log, const float *norm_w, float eps,
                        float *windows, float *states, const int64_t *slot, int64_t num_slots, int64_t B, int64_t H,
                        int64_t K, int64_t V, float *out, int threads) {
    for (int64_t s = 0; s < B; s++)
        if (slot[s] < 0 || slot[s] >= num_slots) return -1;
    const int64_t P = H * K;
    const float scale = 1.0f / sqrtf((float)K);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H > 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t s = bh / H, h = bh % H;
        float q[256], kk[256], v[256], decay[256], kS[256], o[256];
        const float *x = qkv + s * 3 * P;
        float *win = windows + slot[s] * 3 * P * (k - 1);
        conv_silu(x, conv_w, win, k, h * K, K, q);
        conv_silu(x, conv_w, win, k, P + h * K, K, kk);
        conv_silu(x, conv_w, win, k, 2 * P + h * V, V, v);
        const float qs = (1.0f / sqrtf(dot_f32(q, q, K) + 1e-6f)) * scale;
        const float ks = 1.0f / sqrtf(dot_f32(kk, kk, K) + 1e-6f);
        const float a = -expf(A_log[h]);
        for (int64_t i = 0; i < K; i++) {
            q[i] *= qs;
            kk[i] *= ks;
            const float z = f[s * P + h * K + i] + dt_bias[h * K + i];
            decay[i] = expf(a * (z > 20.0f ? z : log1pf(expf(z))));
        }
        const float beta = 1.0f / (1.0f + expf(-b[s * H + h]));
        float *S = states + (slot[s] * H + h) * K * V;  // [K, V]
        for (int64_t j = 0; j < V; j++) kS[j] = o[j] = 0.0f;
        for (int64_t i = 0; i < K; i++) scale_then_axpy(S + i * V, decay[i], kk[i], kS, V);
        for (int64_t j = 0; j < V; j++) kS[j] = beta * (v[j] - kS[j]);  // delta
        for (int64_t i = 0; i < K; i++) axpy_then_axpy(S + i * V, kk[i], kS, q[i], o, V);
        const float r = 1.0f / sqrtf(dot_f32(o, o, V) / (float)V + eps);
        const float *g = gate + s * P + h * V;
        for (int64_t j = 0; j < V; j++) out[s * P + h * V + j] = norm_w[j] * (o[j] * r) * (1.0f / (1.0f + expf(-g[j])));
    }
    return 0;
}
