// kimi's C kernels for batch-1 decode on a CPU, where a step is hundreds of small products and torch's per-call cost
// and bf16 GEMV speed set the pace. Built and loaded by kimi/ops/cpu_kernels.py (plain C with AVX-512F intrinsics;
// no torch headers, so it compiles in about a second). Every tensor is bf16 stored as uint16, sums are fp32, and each
// kernel rounds to bf16 where the torch path it replaces rounds, so the two differ only in fp32 summation order.
// In file order: gemv, MLA absorbed decode attention, MLA prefill attention, RMSNorm, MLA's projection tail for one
// token, one token's SwiGLU expert, the MoE combine, a MoE block's routed experts, one token's MoE routing, KDA
// decode of single tokens.
//
// gemv: y = x W^T. x [M, K], W [N, K] (row-major, one output feature per row), y [M, N].
// Products are exact in fp32 (bf16 has an 8-bit significand), accumulated in fp32 along K in 4 x 16 lanes, reduced,
// then rounded to bf16 to nearest even (as torch rounds). W streams one row at a time, start to end: a single
// sequential stream is what the hardware prefetcher follows best (four rows interleaved ran at half the speed), and
// a row, a few KB, is reused from L1 for all M rows of x.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cpu_route.h"

static inline __m512 load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m512 load_bf16_tail(const uint16_t *p, __mmask16 m) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  // NaN stays a quiet NaN
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

static inline float from_bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

static inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

// to_bf16 on 16 values at once (AVX-512F only)
static inline __m256i to_bf16_ps(__m512 x) {
    const __m512i u = _mm512_castps_si512(x), hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

// 16 fp32 values rounded to bf16 and back (as torch's bf16 results are)
static inline __m512 round_bf16_ps(__m512 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_ps(x)), 16));
}

static inline __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << (n & 15)) - 1u); }

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

// sum_i a[i] * b[i], a fp32, b bf16, n >= 0
static inline float dot_f32_bf16(const float *a, const uint16_t *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load_bf16(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load_bf16(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load_bf16(b + i), s0);
    if (i < n) {
        __mmask16 m = tail_mask(n);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), load_bf16_tail(b + i, m), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// y[i] += a * x[i], y fp32, x bf16
static inline void axpy_bf16(float *y, float a, const uint16_t *x, int64_t n) {
    const __m512 av = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, load_bf16(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, load_bf16_tail(x + i, m), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

// e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + f, |f| <= ln2 / 2, e^f by its degree-7 Taylor
// polynomial (relative error < 2e-8 there), times 2^n by scalef; below -104 the result is 0, as it is in fp32
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts (Cody-Waite)
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// p = softmax(x) over n values, in place, fp32
static void softmax(float *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 t = tail_mask(n);
        __m512 e = _mm512_maskz_mov_ps(t, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, x + i), mv)));
        _mm512_mask_storeu_ps(x + i, t, e);
        acc = _mm512_add_ps(acc, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(acc);
    for (i = 0; i < n; i++) x[i] *= inv;
}

// row n of W against every row of xf (the fp32 copy of x, [M, K]): four accumulators along K, so four FMA chains
// are in flight while the row streams in
static void row(const float *xf, int64_t M, int64_t K, const uint16_t *w, int64_t N, int64_t n, uint16_t *y) {
    const int64_t K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = xf + m * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k < K64; k += 64) {
            a0 = _mm512_fmadd_ps(load_bf16(w + k), _mm512_loadu_ps(xm + k), a0);
            a1 = _mm512_fmadd_ps(load_bf16(w + k + 16), _mm512_loadu_ps(xm + k + 16), a1);
            a2 = _mm512_fmadd_ps(load_bf16(w + k + 32), _mm512_loadu_ps(xm + k + 32), a2);
            a3 = _mm512_fmadd_ps(load_bf16(w + k + 48), _mm512_loadu_ps(xm + k + 48), a3);
        }
        for (; k < K16; k += 16) a0 = _mm512_fmadd_ps(load_bf16(w + k), _mm512_loadu_ps(xm + k), a0);
        if (tail) a1 = _mm512_fmadd_ps(load_bf16_tail(w + K16, tail), _mm512_maskz_loadu_ps(tail, xm + K16), a1);
        y[m * N + n] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
    }
}

int kimi_cpu_kernels_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

// returns 0, or -1 when the fp32 copy of x could not be allocated
int kimi_gemv_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, uint16_t *y,
                   int threads) {
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float));
    if (!xf) return -1;
    for (int64_t i = 0; i < M * K; i++) {
        union { uint32_t u; float f; } v = {(uint32_t)x[i] << 16};
        xf[i] = v.f;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N >= 256)
    for (int64_t n = 0; n < N; n++) row(xf, M, K, W + n * K, N, n, y);
    free(xf);
    return 0;
}


#define HB 8  // heads per register block in the attention loops below

// dots of one context row with HB heads' queries at once: out[j] = q[j * W :] . row; q fp32 [HB, W], row bf16 [W].
// The row is converted once for all HB heads (per head, it was converted HB times).
static inline void dots_block(const float *q, int64_t W, const uint16_t *row, float *out) {
    __m512 acc[HB];
    for (int j = 0; j < HB; j++) acc[j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= W; i += 16) {
        const __m512 x = load_bf16(row + i);
        for (int j = 0; j < HB; j++) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * W + i), x, acc[j]);
    }
    if (i < W) {
        const __mmask16 t = tail_mask(W);
        const __m512 x = load_bf16_tail(row + i, t);
        for (int j = 0; j < HB; j++) acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, q + j * W + i), x, acc[j]);
    }
    for (int j = 0; j < HB; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
}

// o[j * r + c ..+32] = sum_s p[j * n + s] * row_s[c ..+32] for HB heads, 32 columns at a time: 2 x HB accumulators
// stay in registers while the rows stream by (per head and row, it was a load, FMA and store of o per 16 values).
// Columns past the last multiple of 32 are left to the caller.
static inline void weighted_rows_block(const float *p, int64_t n, const uint16_t *const *rowp, int64_t r, float *o) {
    for (int64_t c = 0; c + 32 <= r; c += 32) {
        __m512 a0[HB], a1[HB];
        for (int j = 0; j < HB; j++) a0[j] = a1[j] = _mm512_setzero_ps();
        for (int64_t s = 0; s < n; s++) {
            const __m512 x0 = load_bf16(rowp[s] + c), x1 = load_bf16(rowp[s] + c + 16);
            for (int j = 0; j < HB; j++) {
                const __m512 pj = _mm512_set1_ps(p[j * n + s]);
                a0[j] = _mm512_fmadd_ps(pj, x0, a0[j]);
                a1[j] = _mm512_fmadd_ps(pj, x1, a1[j]);
            }
        }
        for (int j = 0; j < HB; j++) {
            _mm512_storeu_ps(o + j * r + c, a0[j]);
            _mm512_storeu_ps(o + j * r + c + 16, a1[j]);
        }
    }
}

// MLA's absorbed decode (k2.md §2.3) for B single-token queries over a paged latent cache, one call per layer:
//   q_lat = W_UK^T q_nope; score_s = scale * [q_lat, q_pe] . cache[row_s]; p = softmax(score);
//   o_lat = sum_s p_s cache[row_s][:r]; out = W_UV o_lat.
// q_nope [B, H, nope], q_pe [B, H, rope]; kv_b [H, nope + v, r] (kv_b_proj.weight as it is: W_UK rows, then W_UV
// rows); cache [R, W = r + rope]; rows [B, S] cache rows of each context (or NULL: one sequence at rows start..);
// lengths [B] (sequence b reads rows[b, :lengths[b]]); out [B, H, v]. q_lat, the scores, p and o_lat are rounded to
// bf16 where torch's bf16 products round them (ops/attention.py's torch path), so the two differ only in the order
// of their fp32 sums. The context is read in place, never gathered; each row is read twice (scores, then o_lat).
// This is the fp32 multiply-add form, for CPUs without AVX512-BF16; kimi_mla_decode_pairs below is the one with.
// Returns 0, or -1 when scratch memory could not be allocated.
int kimi_mla_decode_bf16(const uint16_t *q_nope, const uint16_t *q_pe, const uint16_t *kv_b, const uint16_t *cache,
                         const int64_t *rows, int64_t start, const int64_t *lengths, int64_t B, int64_t S, int64_t H,
                         int64_t nope, int64_t rope, int64_t v, int64_t r, float scale, uint16_t *out, int threads) {
    const int64_t W = r + rope;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1 && B > 1) reduction(| : failed)
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = lengths[b];
        float *q = (float *)malloc((size_t)(H * W + H * n + H * r) * sizeof(float));
        const uint16_t **rowp = (const uint16_t **)malloc((size_t)(n > 0 ? n : 1) * sizeof(*rowp));
        if (!q || !rowp) {
            free(q);
            free(rowp);
            failed = 1;
            continue;
        }
        float *score = q + H * W, *o = score + H * n;  // [H, W], [H, n], [H, r]
        for (int64_t s = 0; s < n; s++) rowp[s] = cache + (rows ? rows[b * S + s] : start + s) * W;
        const int64_t HB_END = H - H % HB, R32 = r - r % 32;  // heads and columns the register blocks cover
        for (int64_t h = 0; h < H; h++) {
            float *qh = q + h * W;
            for (int64_t j = 0; j < r; j++) qh[j] = 0.0f;
            const uint16_t *qn = q_nope + (b * H + h) * nope;
            for (int64_t i = 0; i < nope; i++) axpy_bf16(qh, from_bf16(qn[i]), kv_b + (h * (nope + v) + i) * r, r);
            for (int64_t j = 0; j < r; j++) qh[j] = round_bf16(qh[j]);
            for (int64_t j = 0; j < rope; j++) qh[r + j] = from_bf16(q_pe[(b * H + h) * rope + j]);
        }
        for (int64_t s = 0; s < n; s++) {
            float dots[HB];
            for (int64_t h = 0; h < HB_END; h += HB) {
                dots_block(q + h * W, W, rowp[s], dots);
                for (int j = 0; j < HB; j++) score[(h + j) * n + s] = round_bf16(dots[j]) * scale;
            }
            for (int64_t h = HB_END; h < H; h++)
                score[h * n + s] = round_bf16(dot_f32_bf16(q + h * W, rowp[s], W)) * scale;
        }
        for (int64_t h = 0; h < H; h++) {
            softmax(score + h * n, n);
            for (int64_t s = 0; s < n; s++) score[h * n + s] = round_bf16(score[h * n + s]);
            for (int64_t j = 0; j < r; j++) o[h * r + j] = 0.0f;
        }
        for (int64_t h = 0; h < HB_END; h += HB) weighted_rows_block(score + h * n, n, rowp, r, o + h * r);
        for (int64_t s = 0; s < n; s++) {  // what the blocks leave: heads past HB_END, columns past R32
            for (int64_t h = 0; h < H; h++) {
                if (h < HB_END) {
                    if (R32 < r) axpy_bf16(o + h * r + R32, score[h * n + s], rowp[s] + R32, r - R32);
                } else {
                    axpy_bf16(o + h * r, score[h * n + s], rowp[s], r);
                }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float *oh = o + h * r;
            for (int64_t j = 0; j < r; j++) oh[j] = round_bf16(oh[j]);
            for (int64_t j = 0; j < v; j++)
                out[(b * H + h) * v + j] = to_bf16(dot_f32_bf16(oh, kv_b + (h * (nope + v) + nope + j) * r, r));
        }
        free(q);
        free(rowp);
    }
    return failed ? -1 : 0;
}

// ---- MLA's absorbed decode with AVX512-BF16 pair dot products -----------------------------------------------------
// vdpbf16ps: acc += a[2i] b[2i] + a[2i+1] b[2i+1], exact products, fp32 sums. Every product of the form runs on pairs:
// the operands that torch's bf16 path rounds to bf16 (q_lat, p, o_lat) are rounded here at the same points, so they
// multiply bf16 weights and cache rows as they are. Heads go in blocks of 8 (heads past H are zero queries, computed
// and dropped). A block's scores live as [rows][8 heads]: two context rows' 16 scores fill one register, so the
// rounding and the softmax run 16 lanes wide, and a head's probability pair (p_s, p_s+1) is one 32-bit value for the
// weighted sum. The context is read from memory once, by the scores, with software prefetch: a paged block is a few
// KB, too short for the hardware prefetcher to lock on. kv_b_proj's two halves come as pairs along the summed
// dimension (built once per weight by cpu_kernels.py): wk2 [H, ceil(nope / 2), r] holds (W_UK[2i][j], W_UK[2i+1][j])
// and wv2 [H, ceil(r / 2), v] holds (W_UV[j][2c], W_UV[j][2c+1]), zero-padded past an odd end.
#define BF16_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define PREFETCH_ROWS 8  // rows ahead, into L2; at the bench's batch of 64 over random blocks, 4-16 all gave ~25%,
                         // and into L2 (T1) rather than L1 (T0) ~20% more: 18 lines a step filled L1's miss buffers

int kimi_cpu_has_bf16_dot(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
}

static inline __mmask32 tail_mask32(int64_t n) { return (__mmask32)((1ull << (n & 31)) - 1u); }

// lane k of the result = the sum of a[k]'s 16 lanes, by a transposing tree: 45 shuffles and adds for the 16 sums,
// where 16 separate reductions take ~130
BF16_DOT static inline __m512 sums16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++)  // per 128-bit block: [x0+x2, y0+y2, x1+x3, y1+y3], x = a[2k], y = a[2k+1]
        b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; k++) {  // per block: the block's sums of a[4k], a[4k+1], a[4k+2], a[4k+3]
        const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
        c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int k = 0; k < 2; k++)  // blocks: c[2k]'s (q0 + q1), (q2 + q3), then c[2k+1]'s
        d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// o [8, r] = sum_s p[h, s] * row_s[:r] for a block of 8 heads: p2 [ceil(n / 2), 8] probability pairs, rowp [n rounded
// up to even] (a pad row has p = 0). Two rows per step: their 16-bit values interleaved into (row_s[c], row_s+1[c])
// pairs meet each head's pair. Rows go by in tiles small enough to stay in L1 while every 32-column block reads them.
// unpacklo/hi interleave within 128-bit lanes, so the accumulators hold each block's columns in the order PERM,
// undone at the end; acc [8, r] fp32 is their scratch. Columns past the last multiple of 32 go one by one.
BF16_DOT static void weighted_rows_pairs(const uint32_t *p2, int64_t n, const uint16_t *const *rowp, int64_t r,
                                         float *acc, float *o) {
    static const int PERM[32] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                                 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const int64_t R32 = r - r % 32, n_even = n + n % 2, TILE = 32;
    for (int64_t i = 0; i < 8 * r; i++) acc[i] = 0.0f;
    for (int64_t t0 = 0; t0 < n_even; t0 += TILE) {
        const int64_t t1 = t0 + TILE < n_even ? t0 + TILE : n_even;
        for (int64_t c = 0; c < R32; c += 32) {
            __m512 lo[8], hi[8];
            for (int j = 0; j < 8; j++) {
                lo[j] = _mm512_loadu_ps(acc + j * r + c);
                hi[j] = _mm512_loadu_ps(acc + j * r + c + 16);
            }
            for (int64_t s = t0; s < t1; s += 2) {
                const __m512i r0 = _mm512_loadu_si512(rowp[s] + c), r1 = _mm512_loadu_si512(rowp[s + 1] + c);
                const __m512bh xl = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
                const __m512bh xh = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
                for (int j = 0; j < 8; j++) {
                    const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)p2[s / 2 * 8 + j]);
                    lo[j] = _mm512_dpbf16_ps(lo[j], pj, xl);
                    hi[j] = _mm512_dpbf16_ps(hi[j], pj, xh);
                }
            }
            for (int j = 0; j < 8; j++) {
                _mm512_storeu_ps(acc + j * r + c, lo[j]);
                _mm512_storeu_ps(acc + j * r + c + 16, hi[j]);
            }
        }
    }
    for (int j = 0; j < 8; j++) {
        for (int64_t c = 0; c < R32; c += 32)
            for (int i = 0; i < 32; i++) o[j * r + c + PERM[i]] = acc[j * r + c + i];
        for (int64_t c = R32; c < r; c++) {
            float sum = 0.0f;
            for (int64_t s = 0; s < n; s++) {
                const uint16_t p = (uint16_t)(p2[s / 2 * 8 + j] >> (16 * (s % 2)));
                sum += from_bf16(p) * from_bf16(rowp[s][c]);
            }
            o[j * r + c] = sum;
        }
    }
}

// The softmax of a block's scores x [n_even / 2, 16] (rows s, s+1 x 8 heads per register; a pad row holds -inf) over
// the rows of each head, in two steps, so that a context split into chunks normalises each p as a whole one does:
// block_max_sum gives each head's max and sum of exp(x - max) ml [8, 2]; probability_pairs then rounds p = exp(x - m)
// / l (m, l: the whole context's) to bf16 pairs p2 [n_even / 2, 8]: (p[s, h], p[s+1, h]) per head.
static const int ROW_SWAP[16] = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};  // row s <-> s+1

BF16_DOT static void block_max_sum(const float *x, int64_t n2, float *ml) {
    const __m512i swap = _mm512_loadu_si512(ROW_SWAP);
    __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < n2; k++) m = _mm512_max_ps(m, _mm512_loadu_ps(x + 16 * k));
    m = _mm512_max_ps(m, _mm512_permutexvar_ps(swap, m));  // each head's max, in both halves
    for (int64_t k = 0; k < n2; k++) sum = _mm512_add_ps(sum, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + 16 * k), m)));
    sum = _mm512_add_ps(sum, _mm512_permutexvar_ps(swap, sum));
    float mv[16], sv[16];
    _mm512_storeu_ps(mv, m);
    _mm512_storeu_ps(sv, sum);
    for (int j = 0; j < 8; j++) ml[2 * j] = mv[j], ml[2 * j + 1] = sv[j];
}

BF16_DOT static void probability_pairs(const float *x, int64_t n2, const float *ml, uint32_t *p2) {
    const __m256i PAIRS = _mm256_set_epi16(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    float mv[16], iv[16];
    for (int j = 0; j < 16; j++) mv[j] = ml[2 * (j % 8)], iv[j] = 1.0f / ml[2 * (j % 8) + 1];
    const __m512 m = _mm512_loadu_ps(mv), inv = _mm512_loadu_ps(iv);
    for (int64_t k = 0; k < n2; k++) {
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + 16 * k), m));
        const __m256i p = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(e, inv));
        _mm256_storeu_si256((__m256i *)(p2 + 8 * k), _mm256_permutexvar_epi16(PAIRS, p));
    }
}

// A context longer than SPLIT_ROWS rows is attended in chunks of CHUNK_ROWS in parallel (flash-decoding): one long
// sequence then uses every thread and each chunk stays in cache. The split depends on the length alone, so a
// sequence's result does not depend on its batch or the thread count.
#define SPLIT_ROWS 2048
#define CHUNK_ROWS 1024

// y[i, :cols] = bf16(x_i W) for n rows x_i (bf16, ldx apart, read as K2 pairs) and one tile of up to 64 columns of
// W: w2 [K2, ld] pairs from the tile's first column; y rows ldy apart. A batch's absorbed products per head
// (W_UK into the queries, W_UV out of the latent outputs): each tile is read once per 4 rows, not once per sequence.
// The sums run along k in order, one pair product at a time. A last block of fewer than 4 rows repeats its last
// row, unstored.
BF16_DOT static void absorb_tile(const uint16_t *x, int64_t ldx, int64_t n, const uint32_t *w2, int64_t ld,
                                 int64_t K2, int64_t cols, uint16_t *y, int64_t ldy) {
    __mmask16 m[4];
    for (int c = 0; c < 4; c++)
        m[c] = cols >= 16 * (c + 1) ? (__mmask16)0xffff : cols > 16 * c ? tail_mask(cols - 16 * c) : (__mmask16)0;
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
        const uint32_t *xr[4];
        for (int r = 0; r < 4; r++) xr[r] = (const uint32_t *)(x + (r0 + r < n ? r0 + r : n - 1) * ldx);
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < K2; p++) {
            const uint32_t *w = w2 + p * ld;
            __m512bh wc[4];
            for (int c = 0; c < 4; c++) wc[c] = (__m512bh)_mm512_maskz_loadu_epi32(m[c], w + 16 * c);
            for (int r = 0; r < 4; r++) {
                const __m512bh xp = (__m512bh)_mm512_set1_epi32((int)xr[r][p]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xp, wc[c]);
            }
        }
        for (int r = 0; r < 4 && r0 + r < n; r++)
            for (int c = 0; c < 4; c++)
                _mm256_mask_storeu_epi16(y + (r0 + r) * ldy + 16 * c, m[c], (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
    }
}

// sc [HP / 8, n_even / 2, 16] = bf16(q16 . row_s) * scale over n rows rowp [n rounded up to even] (a pad row repeats
// the last, and its scores are -inf), two rows x 8 heads per step
BF16_DOT static void scores_pairs(const uint16_t *q16, const uint16_t *const *rowp, int64_t n, int64_t HP, int64_t W,
                                  float scale, float *sc) {
    const int64_t n2 = (n + 1) / 2;
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t s = 0; s < 2 * n2; s += 2) {
        if (s + PREFETCH_ROWS + 1 < n)
            for (int64_t l = 0; l < 2 * W; l += 64) {
                _mm_prefetch((const char *)rowp[s + PREFETCH_ROWS] + l, _MM_HINT_T1);
                _mm_prefetch((const char *)rowp[s + PREFETCH_ROWS + 1] + l, _MM_HINT_T1);
            }
        const uint16_t *x0 = rowp[s], *x1 = rowp[s + 1];
        for (int64_t hb = 0; hb < HP; hb += 8) {
            const uint16_t *q = q16 + hb * W;
            __m512 a[16];
            for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
            for (int64_t i = 0; i < W; i += 32) {
                const __mmask32 t = i + 32 <= W ? (__mmask32)0xffffffffu : tail_mask32(W);
                const __m512bh y0 = (__m512bh)_mm512_maskz_loadu_epi16(t, x0 + i);
                const __m512bh y1 = (__m512bh)_mm512_maskz_loadu_epi16(t, x1 + i);
                for (int j = 0; j < 8; j++) {
                    const __m512bh qj = (__m512bh)_mm512_maskz_loadu_epi16(t, q + j * W + i);
                    a[j] = _mm512_dpbf16_ps(a[j], qj, y0);
                    a[8 + j] = _mm512_dpbf16_ps(a[8 + j], qj, y1);
                }
            }
            _mm512_storeu_ps(sc + (hb / 8 * n2 + s / 2) * 16, _mm512_mul_ps(round_bf16_ps(sums16(a)), sv));
        }
    }
    if (n % 2)
        for (int64_t hb = 0; hb < HP; hb += 8)
            for (int j = 0; j < 8; j++) sc[(hb / 8 * n2 + n2 - 1) * 16 + 8 + j] = -INFINITY;
}

// the context rows of a unit: rows lo .. lo + n of sequence b (a pad row repeats the last)
static void unit_rows(const uint16_t *cache, const int64_t *rows, int64_t start, int64_t S, int64_t W, int64_t b,
                      int64_t lo, int64_t n, const uint16_t **rowp) {
    for (int64_t s = 0; s < n; s++) rowp[s] = cache + (rows ? rows[b * S + lo + s] : start + lo + s) * W;
    if (n % 2) rowp[n] = rowp[n - 1];
}

// p = softmax rounded to bf16 pairs, then o [HP, r] = sum_s p[h, s] row_s[:r], for one unit of context: sc its scores
// [HP / 8, n2, 16], mls [HP, 2] its sequence's max and sum per head, rowp its rows; scratch p2 [HP / 8, n2, 8], acc
// [8, r]
BF16_DOT static void weigh_unit(const float *sc, const float *mls, const uint16_t *const *rowp, int64_t n,
                                int64_t HP, int64_t r, uint32_t *p2, float *acc, float *o) {
    const int64_t n2 = (n + 1) / 2;
    for (int64_t hb = 0; hb < HP; hb += 8) {
        probability_pairs(sc + hb / 8 * n2 * 16, n2, mls + hb * 2, p2 + hb * n2);
        weighted_rows_pairs(p2 + hb * n2, n, rowp, r, acc, o + hb * r);
    }
}

// MLA's absorbed decode for B single-token queries over a paged latent cache, one call per layer, with the pair
// products above: the arguments of kimi_mla_decode_bf16 below, with wk2 and wv2 in place of kv_b. Units of context
// are whole sequences or chunks of long ones, in parallel passes: the queries (W_UK per head and 64 columns, every
// sequence through it: absorb_tile); each unit's scores and their per-head max and sum (a whole sequence goes on to
// its probabilities and weighted rows while its rows are in cache); for split sequences, the max and sum over their
// chunks, then each chunk's probabilities (normalised by the sequence's) and weighted rows; each sequence's sum over
// its units, bf16(o_lat); W_UV per head and 64 columns, every sequence through it. The products' inputs are rows of
// whole pairs (q_nope copied with a zero past an odd nope; o_lat a zero past an odd r), meeting wk2's and wv2's zero
// pair rows. Returns 0, or -1 when scratch memory could not be allocated.
int kimi_mla_decode_pairs(const uint16_t *q_nope, const uint16_t *q_pe, const uint32_t *wk2, const uint32_t *wv2,
                          const uint16_t *cache, const int64_t *rows, int64_t start, const int64_t *lengths,
                          int64_t B, int64_t S, int64_t H, int64_t nope, int64_t rope, int64_t v, int64_t r,
                          float scale, uint16_t *out, int threads) {
    const int64_t W = r + rope, HP = (H + 7) / 8 * 8, r2 = (r + 1) / 2;
    int64_t *first = (int64_t *)malloc((size_t)(B + 1) * sizeof(int64_t));  // sequence b's units: first[b] ..
    if (!first) return -1;
    first[0] = 0;
    for (int64_t b = 0; b < B; b++)
        first[b + 1] = first[b] + (lengths[b] > SPLIT_ROWS ? (lengths[b] + CHUNK_ROWS - 1) / CHUNK_ROWS : 1);
    const int64_t U = first[B];
    // per unit: its sequence, first row, rows and scores' offset
    int64_t *unit = (int64_t *)malloc((size_t)(4 * U + 1) * sizeof(int64_t)), offset = 0;
    if (!unit) { free(first); return -1; }
    for (int64_t b = 0, u = 0; b < B; b++)
        for (; u < first[b + 1]; u++) {
            const int64_t lo = (u - first[b]) * CHUNK_ROWS, left = lengths[b] - lo;
            unit[4 * u] = b, unit[4 * u + 1] = lo;
            unit[4 * u + 2] = first[b + 1] - first[b] > 1 && left > CHUNK_ROWS ? CHUNK_ROWS : left;
            unit[4 * u + 3] = offset;
            offset += HP * ((unit[4 * u + 2] + 1) / 2) * 2;  // [HP / 8, n2, 16]
        }
    // q16 [B, HP, W] | o_lat [B, H, 2 r2] | qn [B, H, 2 nope2], all bf16 (the last two zero-padded to whole pairs)
    const int64_t nope2 = (nope + 1) / 2, rt = (r + 63) / 64, vt = (v + 63) / 64;
    uint16_t *q16 = (uint16_t *)calloc((size_t)(B * HP * W + B * H * 2 * (r2 + nope2)), sizeof(uint16_t));
    uint16_t *o_lat = q16 ? q16 + B * HP * W : NULL, *qn = q16 ? o_lat + B * H * 2 * r2 : NULL;
    // scores of every unit | ml [U, HP, 2] (units') | mls [B, HP, 2] (sequences') | o [U, HP, r]
    float *sc = (float *)malloc((size_t)(offset + (U + B) * HP * 2 + U * HP * r) * sizeof(float));
    float *ml = sc ? sc + offset : NULL, *mls = ml ? ml + U * HP * 2 : NULL, *o = mls ? mls + B * HP * 2 : NULL;
    int failed = !q16 || !sc;
#pragma omp parallel num_threads(threads) if (threads > 1 && (U > 1 || H > 1) && !failed) reduction(| : failed)
    {
        const int ok = q16 && sc;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++)  // q_nope as whole pairs
            if (ok) memcpy(qn + bh * 2 * nope2, q_nope + bh * nope, (size_t)nope * 2);
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < H * rt; u++) {  // W_UK per (head, 64 columns of r), every sequence's query through it
            const int64_t h = u / rt, c0 = 64 * (u % rt);
            if (ok) absorb_tile(qn + h * 2 * nope2, H * 2 * nope2, B, wk2 + h * nope2 * r + c0, r, nope2, r - c0,
                                q16 + h * W + c0, HP * W);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * HP; bh++) {  // the rope columns, and zero rows past H
            uint16_t *qh = q16 + bh * W;
            if (!ok) continue;
            if (bh % HP >= H)
                memset(qh, 0, (size_t)W * 2);
            else
                memcpy(qh + r, q_pe + (bh / HP * H + bh % HP) * rope, (size_t)rope * 2);
        }
        for (int pass = 0; pass < 2; pass++) {  // 0: every unit's scores (and whole sequences to the end); 1: chunks
#pragma omp for schedule(dynamic)
            for (int64_t u = 0; u < U; u++) {
                const int64_t b = unit[4 * u], n = unit[4 * u + 2], n2 = (n + 1) / 2;
                const int whole = first[b + 1] - first[b] == 1;
                if (!ok || (pass == 1 && whole)) continue;
                // rowp [2 n2 + 1] | p2 [HP / 8, n2, 8] | acc [8, r]
                char *mem = (char *)malloc((size_t)(2 * n2 + 1) * sizeof(void *) + (size_t)(HP * n2 + 8 * r) * 4);
                if (!mem) {
                    failed = 1;
                    continue;
                }
                const uint16_t **rowp = (const uint16_t **)mem;
                uint32_t *p2 = (uint32_t *)(rowp + 2 * n2 + 1);
                float *acc = (float *)(p2 + HP * n2), *scu = sc + unit[4 * u + 3];
                unit_rows(cache, rows, start, S, W, b, unit[4 * u + 1], n, rowp);
                if (pass == 0) {
                    float *mlu = whole ? mls + b * HP * 2 : ml + u * HP * 2;  // a whole sequence's are its own
                    scores_pairs(q16 + b * HP * W, rowp, n, HP, W, scale, scu);
                    for (int64_t hb = 0; hb < HP; hb += 8) block_max_sum(scu + hb / 8 * n2 * 16, n2, mlu + hb * 2);
                }
                if (whole || pass == 1) weigh_unit(scu, mls + b * HP * 2, rowp, n, HP, r, p2, acc, o + u * HP * r);
                free(mem);
            }
            if (pass == 0) {
#pragma omp for schedule(static)
                for (int64_t b = 0; b < B; b++)  // split sequences: m = max_u m_u, l = sum_u e^(m_u - m) l_u
                    for (int64_t h = 0; h < HP && first[b + 1] - first[b] > 1; h++) {
                        float m = -INFINITY, l = 0.0f;
                        for (int64_t u = first[b]; u < first[b + 1]; u++) m = fmaxf(m, ml[(u * HP + h) * 2]);
                        for (int64_t u = first[b]; u < first[b + 1]; u++)
                            l += expf(ml[(u * HP + h) * 2] - m) * ml[(u * HP + h) * 2 + 1];
                        mls[(b * HP + h) * 2] = m, mls[(b * HP + h) * 2 + 1] = l;
                    }
            }
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {  // o16 = bf16(o_lat), o_lat the sum over the sequence's units
            if (!ok) continue;
            const int64_t b = bh / H, h = bh % H;
            uint16_t *o16 = o_lat + bh * 2 * r2;
            float *oh = o + (first[b] * HP + h) * r;
            for (int64_t u = first[b] + 1; u < first[b + 1]; u++)
                for (int64_t j = 0; j < r; j++) oh[j] += o[(u * HP + h) * r + j];
            for (int64_t c = 0; c < r; c += 16) {
                const __mmask16 mk = c + 16 <= r ? (__mmask16)0xffff : tail_mask(r);
                _mm256_mask_storeu_epi16(o16 + c, mk, to_bf16_ps(_mm512_maskz_loadu_ps(mk, oh + c)));
            }
        }
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < H * vt; u++) {  // out = W_UV o16, per (head, 64 columns of v)
            const int64_t h = u / vt, c0 = 64 * (u % vt);
            if (ok) absorb_tile(o_lat + h * 2 * r2, H * 2 * r2, B, wv2 + h * r2 * v + c0, v, r2, v - c0,
                                out + h * v + c0, H * v);
        }
    }
    free(first);
    free(unit);
    free(q16);
    free(sc);
    return failed ? -1 : 0;
}

// ---- MLA prefill attention (the expanded form) with AVX512-BF16 pair dot products --------------------------------
// Causal attention of T queries (positions start .. start + T - 1) over S = start + T keys, per head: q = [q_nope,
// q_pe], k = [k_nope, k_pe] (k_pe shared by the heads: MLA's rope key), v; flash-style, in tiles of 8 queries x 32
// keys with an online softmax in fp32. As torch's CPU flash attention does for bf16: scores summed in fp32 and
// scaled, probabilities rounded to bf16 for the product with v, output summed in fp32 and divided by the softmax
// sum before its one rounding to bf16. Each head's keys and values are first repacked as pairs along the summed
// dimension (keys: (k[2d], k[2d+1]) for 32 keys side by side; values: (v_s[c], v_s+1[c])), so that every product is
// one 32-bit broadcast (a query's pair, a probability pair) times a register of packed pairs: no reductions.
#define PQ 8   // queries per tile
#define PK 32  // keys per tile

// Head h's keys and values as pairs (nope and rope even, dv a multiple of 16; rows past S are zero):
// kp [ceil(S / PK), D2, PK]: (k[2d], k[2d+1]) of PK keys side by side, D2 = (nope + rope) / 2 (k = [k_nope | k_pe]);
// vp [ceil(S / PK) * PK / 2, dv]: (v_2j[c], v_2j+1[c]).
typedef uint32_t pair_u32 __attribute__((aligned(2), may_alias));  // two bf16 read as one 32-bit value

static void pack_head(const uint16_t *kv, int64_t ld_kv, const uint16_t *k_pe, int64_t ld_pe, int64_t S, int64_t h,
                      int64_t nope, int64_t rope, int64_t dv, uint32_t *kp, uint32_t *vp) {
    const int64_t D2 = (nope + rope) / 2, nkb = (S + PK - 1) / PK;
    for (int64_t kb = 0; kb < nkb; kb++)
        for (int64_t j = 0; j < PK; j++) {
            const int64_t s = kb * PK + j;
            uint32_t *col = kp + kb * D2 * PK + j;
            if (s >= S) {
                for (int64_t d2 = 0; d2 < D2; d2++) col[d2 * PK] = 0u;
                continue;
            }
            const pair_u32 *kn = (const pair_u32 *)(kv + s * ld_kv + h * (nope + dv));
            const pair_u32 *kr = (const pair_u32 *)(k_pe + s * ld_pe);
            for (int64_t d2 = 0; d2 < nope / 2; d2++) col[d2 * PK] = kn[d2];
            for (int64_t d2 = 0; d2 < rope / 2; d2++) col[(nope / 2 + d2) * PK] = kr[d2];
        }
    for (int64_t j = 0; j < nkb * PK / 2; j++) {
        const uint16_t *va = kv + 2 * j * ld_kv + h * (nope + dv) + nope, *vb = va + ld_kv;
        for (int64_t c = 0; c < dv; c += 16) {
            const __m512i a = 2 * j < S ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(va + c)))
                                        : _mm512_setzero_si512();
            const __m512i b = 2 * j + 1 < S ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vb + c)))
                                            : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + j * dv + c, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
        }
    }
}

// o [4, 16 nz] = alpha * o + p v over one tile's PK keys, for 4 queries and 16 nz <= 64 columns: p2 [4][PK / 2]
// probability pairs, vb [PK / 2, ld] value pairs from the block's first column. Inlined with nz = 4, the 16
// accumulators stay in registers.
BF16_DOT static inline __attribute__((always_inline)) void pv_block(const uint32_t *vb, int64_t ld,
                                                                    const uint32_t (*p2)[PK / 2], const float *alpha,
                                                                    float *o, int nz) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int z = 0; z < nz; z++)
            acc[i][z] = _mm512_mul_ps(_mm512_loadu_ps(o + i * ld + 16 * z), _mm512_set1_ps(alpha[i]));
    for (int64_t j = 0; j < PK / 2; j++) {
        __m512bh v[4];
        for (int z = 0; z < nz; z++) v[z] = (__m512bh)_mm512_loadu_si512(vb + j * ld + 16 * z);
        for (int i = 0; i < 4; i++) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32((int)p2[i][j]);
            for (int z = 0; z < nz; z++) acc[i][z] = _mm512_dpbf16_ps(acc[i][z], p, v[z]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int z = 0; z < nz; z++) _mm512_storeu_ps(o + i * ld + 16 * z, acc[i][z]);
}

// lane i < 8 of the result: the max (max8) or sum (sum8) of v[i]'s 16 lanes; lanes 8-15 repeat lanes 0-7. A
// transposing tree as sums16's: 24 shuffles and ops where 8 separate reductions take ~64, in a long chain each.
#define REDUCE8(name, op)                                                                                           \
    static inline __m512 name(const __m512 v[8]) {                                                                \
        __m512 b[4], c[2];                                                                                        \
        for (int k = 0; k < 4; k++)                                                                               \
            b[k] = op(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));   \
        for (int k = 0; k < 2; k++) {                                                                             \
            const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);                     \
            c[k] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));    \
        }                                                                                                         \
        const __m512 d = op(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),                            \
                            _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));                           \
        return op(_mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(d, d, _MM_SHUFFLE(3, 1, 3, 1))); \
    }
REDUCE8(max8, _mm512_max_ps)
REDUCE8(sum8, _mm512_add_ps)

// one tile row block: queries t0 .. t0 + PQ - 1 of head h -> out rows (bf16)
BF16_DOT static void prefill_tile(const uint16_t *q_nope, const uint16_t *q_pe, const uint32_t *kp,
                                  const uint32_t *vp, int64_t t0, int64_t T, int64_t start, int64_t S, int64_t H,
                                  int64_t h, int64_t nope, int64_t rope, int64_t dv, float scale, uint16_t *out,
                                  uint32_t *qt, float *o) {
    const int64_t dq = nope + rope, D2 = dq / 2, nq = T - t0 < PQ ? T - t0 : PQ;
    const int64_t last = start + t0 + nq - 1, nkb = last / PK + 1;  // keys 0 .. last
    uint16_t *q = (uint16_t *)qt;  // the tile's queries [PQ, dq]: [q_nope | q_pe] (pairs [PQ, D2]), zero past the last
    for (int64_t i = 0; i < PQ; i++) {
        uint16_t *qi = q + i * dq;
        if (i < nq) {
            memcpy(qi, q_nope + ((t0 + i) * H + h) * nope, (size_t)nope * 2);
            memcpy(qi + nope, q_pe + ((t0 + i) * H + h) * rope, (size_t)rope * 2);
        } else {
            memset(qi, 0, (size_t)dq * 2);
        }
    }
    float m[2 * PQ], l[2 * PQ];  // per query (lanes 8-15: copies of 0-7, from max8 and sum8)
    uint32_t p2[PQ][PK / 2];
    for (int64_t i = 0; i < 2 * PQ; i++) m[i] = -INFINITY, l[i] = 0.0f;
    for (int64_t i = 0; i < PQ * dv; i++) o[i] = 0.0f;
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t kb = 0; kb < nkb; kb++) {
        __m512 a[PQ][2];
        for (int i = 0; i < PQ; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
        const uint32_t *k = kp + kb * D2 * PK;
        for (int64_t d2 = 0; d2 < D2; d2++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k + d2 * PK);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(k + d2 * PK + 16);
            for (int i = 0; i < PQ; i++) {  // the query pair last: a broadcast operand folded into the product
                a[i][0] = _mm512_dpbf16_ps(a[i][0], k0, (__m512bh)_mm512_set1_epi32((int)qt[i * D2 + d2]));
                a[i][1] = _mm512_dpbf16_ps(a[i][1], k1, (__m512bh)_mm512_set1_epi32((int)qt[i * D2 + d2]));
            }
        }
        // online softmax, the 8 queries together: query i sees keys up to start + t0 + i (and < S); whole blocks
        // below the diagonal need no mask
        const int64_t lim0 = start + t0 - kb * PK;  // the last key query 0 sees, in this block's numbering
        __m512 s[PQ][2], r[PQ];
        __mmask16 v[PQ][2];
        for (int i = 0; i < PQ; i++) {
            const int64_t lim = i < nq ? lim0 + i : lim0;
            v[i][0] = lim >= 15 ? (__mmask16)0xffff : _mm512_cmple_epi32_mask(iota, _mm512_set1_epi32((int)lim));
            v[i][1] = lim >= 31 ? (__mmask16)0xffff : _mm512_cmple_epi32_mask(iota, _mm512_set1_epi32((int)(lim - 16)));
            for (int c = 0; c < 2; c++)
                s[i][c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), v[i][c], a[i][c], _mm512_set1_ps(scale));
            r[i] = _mm512_max_ps(s[i][0], s[i][1]);
        }
        const __m512 m_old = _mm512_loadu_ps(m), m_new = _mm512_max_ps(m_old, max8(r));  // lanes 0-7 (8-15 copies)
        float alpha[2 * PQ];  // e^(m_old - m_new): 0 on the first block (m_old = -inf)
        _mm512_storeu_ps(alpha, exp_ps(_mm512_sub_ps(m_old, m_new)));
        _mm512_storeu_ps(m, m_new);
        for (int i = 0; i < PQ; i++) {
            const __m512 mi = _mm512_set1_ps(m[i]);
            const __m512 e0 = _mm512_maskz_mov_ps(v[i][0], exp_ps(_mm512_sub_ps(s[i][0], mi)));
            const __m512 e1 = _mm512_maskz_mov_ps(v[i][1], exp_ps(_mm512_sub_ps(s[i][1], mi)));
            r[i] = _mm512_add_ps(e0, e1);
            _mm256_storeu_si256((__m256i *)p2[i], (__m256i)_mm512_cvtneps_pbh(e0));
            _mm256_storeu_si256((__m256i *)(p2[i] + 8), (__m256i)_mm512_cvtneps_pbh(e1));
        }
        _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), _mm512_loadu_ps(alpha), sum8(r)));
        const uint32_t *vb = vp + kb * PK / 2 * dv;
        for (int64_t i0 = 0; i0 < PQ; i0 += 4)  // o[i] = alpha o[i] + p[i] v, 4 queries x 64 columns at a time
            for (int64_t c0 = 0; c0 < dv; c0 += 64) {
                if (dv - c0 >= 64)
                    pv_block(vb + c0, dv, p2 + i0, alpha + i0, o + i0 * dv + c0, 4);  // unrolled: 16 registers
                else
                    pv_block(vb + c0, dv, p2 + i0, alpha + i0, o + i0 * dv + c0, (int)(dv - c0) / 16);
            }
    }
    for (int64_t i = 0; i < nq; i++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        for (int64_t c = 0; c < dv; c += 16)
            _mm256_storeu_si256((__m256i *)(out + ((t0 + i) * H + h) * dv + c),
                                to_bf16_ps(_mm512_mul_ps(_mm512_loadu_ps(o + i * dv + c), inv)));
    }
}

// q_nope [T, H, nope], q_pe [T, H, rope]; kv [S, ld_kv] rows of H x (k_nope [nope] | v [dv]) (kv_b_proj's output);
// k_pe [S, ld_pe] (the latent's rope columns); nope and rope even, dv a multiple of 16 -> out [T, H, dv]. Returns 0,
// or -1 when scratch memory could not be allocated.
int kimi_mla_prefill_bf16(const uint16_t *q_nope, const uint16_t *q_pe, const uint16_t *kv, int64_t ld_kv,
                          const uint16_t *k_pe, int64_t ld_pe, int64_t T, int64_t start, int64_t H, int64_t nope,
                          int64_t rope, int64_t dv, float scale, uint16_t *out, int threads) {
    const int64_t S = start + T, D2 = (nope + rope) / 2, nkb = (S + PK - 1) / PK;
    const int64_t kp_size = nkb * D2 * PK, vp_size = nkb * PK / 2 * dv, nt = (T + PQ - 1) / PQ;
    uint32_t *packed = (uint32_t *)malloc((size_t)(H * (kp_size + vp_size)) * sizeof(uint32_t));
    if (!packed) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t h = 0; h < H; h++)
        pack_head(kv, ld_kv, k_pe, ld_pe, S, h, nope, rope, dv, packed + h * kp_size,
                  packed + H * kp_size + h * vp_size);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        uint32_t *qt = (uint32_t *)malloc((size_t)(PQ * D2) * sizeof(uint32_t));
        float *o = (float *)malloc((size_t)(PQ * dv) * sizeof(float));
        if (!qt || !o) failed = 1;
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < H * nt; u++) {  // longest tiles first: the last query blocks see the most keys
            const int64_t h = u % H, t0 = (nt - 1 - u / H) * PQ;
            if (qt && o)
                prefill_tile(q_nope, q_pe, packed + h * kp_size, packed + H * kp_size + h * vp_size, t0, T, start, S,
                             H, h, nope, rope, dv, scale, out, qt, o);
        }
        free(qt);
        free(o);
    }
    free(packed);
    return failed ? -1 : 0;
}

// RMSNorm of M rows of D values, as model/layers.py's RMSNorm computes it: y = w * bf16(x / sqrt(mean(x^2) + eps)),
// the normalisation in fp32, rounded to bf16 before the weight (bf16 too) multiplies it; x, w, y bf16.
void kimi_rmsnorm_bf16(const uint16_t *x, int64_t M, int64_t D, const uint16_t *w, float eps, uint16_t *y) {
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * D;
        __m512 acc = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) {
            __m512 v = load_bf16(xm + i);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        if (i < D) {
            __m512 v = load_bf16_tail(xm + i, tail_mask(D));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps);
        for (i = 0; i < D; i++) y[m * D + i] = to_bf16(from_bf16(w[i]) * round_bf16(from_bf16(xm[i]) * r));
    }
}

// kimi_rmsnorm_bf16 over M rows split between threads (prefill chunks, decode batches): torch's RMSNorm makes ~7
// passes over fp32 copies of x, ~4 ms at 2,048 x 768 on the dev box, this ~0.35 ms
void kimi_rmsnorm_rows_bf16(const uint16_t *x, int64_t M, int64_t D, const uint16_t *w, float eps, uint16_t *y,
                            int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && M >= 16)
    for (int64_t m = 0; m < M; m++) kimi_rmsnorm_bf16(x + m * D, 1, D, w, eps, y + m * D);
}

// out = bf16(a + b), n values: torch's bf16 add (the sum in fp32, rounded once); out may be a
void kimi_add_bf16(const uint16_t *a, const uint16_t *b, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = i + 16 <= n ? (__mmask16)0xffff : tail_mask(n);
        _mm256_mask_storeu_epi16(out + i, m, to_bf16_ps(_mm512_add_ps(load_bf16_tail(a + i, m),
                                                                      load_bf16_tail(b + i, m))));
    }
}

// rotate interleaved pairs (x[2j], x[2j+1]) of one bf16 vector by angle j and write them de-interleaved, [rotated
// evens | rotated odds] (model/layers.py's apply_rope: fp32 products, rounded to bf16 once); cos, sin [dim / 2]
static void rope_one(const uint16_t *x, int64_t dim, const float *cos, const float *sin, uint16_t *y) {
    const int64_t half = dim / 2;
    for (int64_t j = 0; j < half; j++) {
        const float x1 = from_bf16(x[2 * j]), x2 = from_bf16(x[2 * j + 1]);
        y[j] = to_bf16(x1 * cos[j] - x2 * sin[j]);
        y[half + j] = to_bf16(x2 * cos[j] + x1 * sin[j]);
    }
}

// The tail of MLA.project for one token, after its products: q [H, nope + rope] (q_b_proj's or q_proj's output),
// kv [r + rope] (kv_a_proj_with_mqa's) -> q_pe [H, rope] rotated, latent [r + rope] = [RMSNorm(c_kv) | rotated
// k_pe]. cos, sin [rope / 2] fp32, or NULL for NoPE layers (the rope slices pass through unrotated).
void kimi_mla_project_one_bf16(const uint16_t *q, int64_t H, int64_t nope, int64_t rope, const uint16_t *kv,
                               int64_t r, const uint16_t *norm_w, float eps, const float *cos, const float *sin,
                               uint16_t *q_pe, uint16_t *latent) {
    kimi_rmsnorm_bf16(kv, 1, r, norm_w, eps, latent);
    if (cos) {
        for (int64_t h = 0; h < H; h++) rope_one(q + h * (nope + rope) + nope, rope, cos, sin, q_pe + h * rope);
        rope_one(kv + r, rope, cos, sin, latent + r);
    } else {
        for (int64_t h = 0; h < H; h++)
            for (int64_t j = 0; j < rope; j++) q_pe[h * rope + j] = q[h * (nope + rope) + nope + j];
        for (int64_t j = 0; j < rope; j++) latent[r + j] = kv[r + j];
    }
}

// One SwiGLU expert on one token: y = down(silu(g) * u) with [g; u] = gate_up x, rounded to bf16 wherever torch's
// bf16 single-row path rounds (g and u, silu(g), the product, y), then either written to y (bf16) or, when total
// is given, added to it as total[d] += bf16(y[d] * w) in fp32 (model/moe.py's Experts._one_token).
// x [D], gate_up [2I, D], down [D, I]; the rows of each product split between threads as gemv's are (one stream per
// core: ~1.5x one core's bandwidth on the 2-core dev box). Returns 0, or -1 when scratch memory could not be allocated.
int kimi_swiglu_one_bf16(const uint16_t *x, int64_t D, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                         float w, float *total, uint16_t *y, int threads) {
    float *buf = (float *)malloc((size_t)(D + I) * sizeof(float));
    uint16_t *tmp = (uint16_t *)malloc((size_t)(2 * I > D ? 2 * I : D) * sizeof(uint16_t));
    if (!buf || !tmp) { free(buf); free(tmp); return -1; }
    float *xf = buf, *h = buf + D;
    for (int64_t i = 0; i < D; i++) xf[i] = from_bf16(x[i]);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && 2 * I >= 256)
    for (int64_t n = 0; n < 2 * I; n++) row(xf, 1, D, gate_up + n * D, 2 * I, n, tmp);  // [g; u] bf16
    for (int64_t i = 0; i < I; i++) {
        const float g = from_bf16(tmp[i]);
        h[i] = round_bf16(round_bf16(silu(g)) * from_bf16(tmp[I + i]));
    }
    uint16_t *out = total ? tmp : y;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && D >= 256)
    for (int64_t d = 0; d < D; d++) row(h, 1, I, down + d * I, D, d, out);
    if (total)
        for (int64_t d = 0; d < D; d++) total[d] += round_bf16(from_bf16(out[d]) * w);
    free(buf);
    free(tmp);
    return 0;
}

// The end of a MoE block over many tokens (model/moe.py's Experts._combine): out[t] = bf16(sum over the rows i of y
// that token t's experts produced, in increasing i, of bf16(y[i] * w[i]) in fp32), as torch computes
// zeros(N, D).index_add_(0, token, (y * w[:, None]).to(bf16)) with index_add_'s fp32 accumulation, with no [M, D] fp32
// product or bf16 copy in between (fresh tensors that cost ~6 ms in page faults and cache misses per MoE layer of a
// 2,048-token prefill step). y [M, D] bf16, w [M] fp32, token [M] in [0, N), out [N, D] bf16. Tokens go in
// parallel; returns 0, or -1 when scratch memory could not be allocated.
int kimi_moe_combine_bf16(const uint16_t *y, const float *w, const int64_t *token, int64_t M, int64_t N, int64_t D,
                          uint16_t *out, int threads) {
    int64_t *start = (int64_t *)calloc((size_t)(N + 1), sizeof(int64_t));
    int64_t *rows = (int64_t *)malloc((size_t)(M > 0 ? M : 1) * sizeof(int64_t));
    if (!start || !rows) { free(start); free(rows); return -1; }
    for (int64_t i = 0; i < M; i++) start[token[i] + 1]++;  // token t: rows[start[t] .. start[t + 1]), i order
    for (int64_t t = 0; t < N; t++) start[t + 1] += start[t];
    for (int64_t i = 0; i < M; i++) rows[start[token[i]]++] = i;
    for (int64_t t = N; t > 0; t--) start[t] = start[t - 1];
    start[0] = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N > 64)
    for (int64_t t = 0; t < N; t++) {
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = d + 16 <= D ? (__mmask16)0xffff : tail_mask(D);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = start[t]; j < start[t + 1]; j++) {
                const int64_t i = rows[j];
                const __m512 x = _mm512_mul_ps(load_bf16_tail(y + i * D + d, m), _mm512_set1_ps(w[i]));
                acc = _mm512_add_ps(acc, round_bf16_ps(x));
            }
            _mm256_mask_storeu_epi16(out + t * D + d, m, to_bf16_ps(acc));
        }
    }
    free(start);
    free(rows);
    return 0;
}

// A MoE block's routed experts, all of them in one call, in bf16 pair products. oneDNN's per-expert GEMMs cost ~90 us
// per expert matrix at 1 to 16 rows on the dev box (8.5 GB/s of weight) and a Python round trip each; these tiles
// stream each weight tile once per 4 rows of x, sequentially (software prefetch only slowed them), and reach ~84%
// of one core's vdpbf16ps peak at 128 rows per expert. Weights in tile-major pairs:
//   gu [E, I / 32, D / 2, 64] pairs: tile b holds gate columns 32b.. 32b + 31 then the same up columns, pair p =
//      (W[col][2p], W[col][2p + 1]); one tile's pairs are one contiguous run
//   dn [E, D / 64, I / 2, 64] pairs of down_proj the same way.
// x [N, D] bf16, idx [N, k] expert ids, w [N, k] fp32 -> out [N, D] bf16, in model/moe.py's arithmetic: per expert
// g, u = bf16(x Wg^T), bf16(x Wu^T); h = bf16(bf16(silu(g)) * u); y = bf16(h Wd^T); then each token's fp32 sum of
// bf16(y * w) over its experts in increasing id (index_add_'s order after the stable sort), rounded once. Each row's
// sums run in one fixed order, so a token's output does not depend on the other tokens or the threads.
// D a multiple of 64, I of 32. Returns 0, or -1 when scratch memory could not be allocated.
#define XR 4  // rows of x per tile pass: 4 x 4 accumulators

// acc[r][c] += x_r . W tile columns 16c.. for r < R, c < 4: x_r bf16 rows (read as pairs), w2 [K2, 64] pairs
BF16_DOT static inline __attribute__((always_inline)) void expert_tile(const uint32_t *const *xr, int R,
                                                                       const uint32_t *w2, int64_t K2,
                                                                       __m512 acc[XR][4]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K2; p++) {
        const uint32_t *w = w2 + p * 64;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16);
        const __m512bh w2_ = (__m512bh)_mm512_loadu_si512(w + 32), w3 = (__m512bh)_mm512_loadu_si512(w + 48);
        for (int r = 0; r < R; r++) {
            const __m512bh xp = (__m512bh)_mm512_set1_epi32((int)xr[r][p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xp, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xp, w1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xp, w2_);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xp, w3);
        }
    }
}

// expert_tile for R = min(XR, rows left) rows, R a constant in each branch (so the tile's loops unroll)
BF16_DOT static inline __attribute__((always_inline)) void expert_tile_rows(const uint32_t *const *xr, int R,
                                                                            const uint32_t *w2, int64_t K2,
                                                                            __m512 acc[XR][4]) {
    switch (R) {
        case 1: expert_tile(xr, 1, w2, K2, acc); break;
        case 2: expert_tile(xr, 2, w2, K2, acc); break;
        case 3: expert_tile(xr, 3, w2, K2, acc); break;
        default: expert_tile(xr, XR, w2, K2, acc);
    }
}

// silu as torch computes it on a bf16 tensor (in fp32, rounded once): g / (1 + e^-g)
static inline __m512 silu_ps(__m512 g) {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// h rows [rows of one expert] x 32 columns of tile b: R rows at a time
BF16_DOT static void gate_up_tile(const uint32_t *const *xr, int64_t n, const uint32_t *tile, int64_t D2, int64_t b,
                                  uint16_t *const *hr) {
    __m512 acc[XR][4];
    for (int64_t r0 = 0; r0 < n; r0 += XR) {
        const int R = n - r0 < XR ? (int)(n - r0) : XR;
        expert_tile_rows(xr + r0, R, tile, D2, acc);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 2; c++) {  // acc[r][c]: gate columns 32b + 16c.., acc[r][c + 2] their up columns
                const __m512 g = round_bf16_ps(acc[r][c]), u = round_bf16_ps(acc[r][c + 2]);
                const __m512 h = _mm512_mul_ps(round_bf16_ps(silu_ps(g)), u);
                _mm256_storeu_si256((__m256i *)(hr[r0 + r] + 32 * b + 16 * c), to_bf16_ps(h));
            }
    }
}

// y rows x 64 columns of tile b of down_proj
BF16_DOT static void down_tile(const uint32_t *const *hr, int64_t n, const uint32_t *tile, int64_t I2, int64_t D,
                               int64_t b, uint16_t *y) {
    __m512 acc[XR][4];
    for (int64_t r0 = 0; r0 < n; r0 += XR) {
        const int R = n - r0 < XR ? (int)(n - r0) : XR;
        expert_tile_rows(hr + r0, R, tile, I2, acc);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++)
                _mm256_storeu_si256((__m256i *)(y + (r0 + r) * D + 64 * b + 16 * c), to_bf16_ps(acc[r][c]));
    }
}

int kimi_moe_experts_pairs(const uint16_t *x, int64_t N, int64_t D, const int64_t *idx, const float *w, int64_t k,
                           const uint32_t *gu, const uint32_t *dn, int64_t E, int64_t I, uint16_t *out, int threads) {
    const int64_t M = N * k, D2 = D / 2, I2 = I / 2, gt = I / 32, dt = D / 64;
    int64_t *start = (int64_t *)calloc((size_t)(2 * E + 1), sizeof(int64_t)), *fill = start + E + 1;
    int64_t *row = (int64_t *)malloc((size_t)(M > 0 ? M : 1) * sizeof(int64_t));  // (token, slot) -> its row
    const uint32_t **xr = (const uint32_t **)malloc((size_t)M * sizeof(void *));  // row -> its x row, as pairs
    uint16_t **hr = (uint16_t **)malloc((size_t)M * sizeof(void *));              // row -> its h row
    uint16_t *h = (uint16_t *)malloc((size_t)(M * I) * sizeof(uint16_t));
    uint16_t *y = (uint16_t *)malloc((size_t)(M * D) * sizeof(uint16_t));
    int64_t *items = (int64_t *)malloc((size_t)E * sizeof(int64_t));  // the experts with rows
    if (!start || !row || !xr || !hr || !h || !y || !items) {
        free(start); free(row); free(xr); free(hr); free(h); free(y); free(items);
        return -1;
    }
    // rows grouped by expert, (token, slot) order within: row[t * k + j] = the row of token t's slot j
    for (int64_t i = 0; i < M; i++) start[idx[i] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < M; i++) {
        const int64_t rw = fill[idx[i]]++;
        row[i] = rw;
        xr[rw] = (const uint32_t *)(x + (i / k) * D);
        hr[rw] = h + rw * I;
    }
    int64_t active = 0;
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e]) items[active++] = e;
    const int64_t n_gu = active * gt, n_dn = active * dt;  // work items: (expert, tile)
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < n_gu; u++) {
            const int64_t e = items[u / gt], b = u % gt, r0 = start[e];
            gate_up_tile(xr + r0, start[e + 1] - r0, gu + (e * gt + b) * D2 * 64, D2, b, hr + r0);
        }
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < n_dn; u++) {
            const int64_t e = items[u / dt], b = u % dt, r0 = start[e];
            down_tile((const uint32_t *const *)(hr + r0), start[e + 1] - r0, dn + (e * dt + b) * I2 * 64, I2, D, b,
                      y + r0 * D);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N; t++) {
            int64_t j_by_id[64];  // this token's slots by increasing expert id (k <= 64)
            for (int64_t j = 0; j < k; j++) {
                int64_t a = j;
                while (a > 0 && idx[t * k + j_by_id[a - 1]] > idx[t * k + j]) { j_by_id[a] = j_by_id[a - 1]; a--; }
                j_by_id[a] = j;
            }
            for (int64_t d = 0; d < D; d += 16) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t a = 0; a < k; a++) {
                    const int64_t i = t * k + j_by_id[a];
                    const __m512 v = _mm512_mul_ps(load_bf16(y + row[i] * D + d), _mm512_set1_ps(w[i]));
                    acc = _mm512_add_ps(acc, round_bf16_ps(v));
                }
                _mm256_storeu_si256((__m256i *)(out + t * D + d), to_bf16_ps(acc));
            }
        }
    }
    free(start); free(row); free(xr); free(hr); free(h); free(y); free(items);
    return 0;
}

// MoE routing of one token (model/moe.py's Router): s = sigmoid(x W^T) in fp32 over E experts, then cpu_route.h's
// selection. x [D] bf16 (taken to fp32), W [E, D] bf16, bias [E] fp32 -> idx [k], w [k] fp32. E <= 1024.
void kimi_route_one_bf16(const uint16_t *x, int64_t D, const uint16_t *W, const float *bias, int64_t E,
                         int64_t n_group, int64_t topk_group, int64_t k, int norm, float scaling, int64_t *idx,
                         float *w) {
    float xf[D], s[1024];
    for (int64_t i = 0; i < D; i++) xf[i] = from_bf16(x[i]);
    for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-dot_f32_bf16(xf, W + e * D, D)));
    route_select(s, bias, E, n_group, topk_group, k, norm, scaling, idx, w);
}

// y[j] = a * y[j] for j < n, and acc[j] += b * y[j] (after the scaling); fp32
static inline void scale_then_axpy(float *y, float a, float b, float *acc, int64_t n) {
    const __m512 av = _mm512_set1_ps(a), bv = _mm512_set1_ps(b);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
        __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + j), av);
        _mm512_mask_storeu_ps(y + j, m, s);
        _mm512_mask_storeu_ps(acc + j, m, _mm512_fmadd_ps(bv, s, _mm512_maskz_loadu_ps(m, acc + j)));
    }
}

// y[j] += a * d[j], then acc[j] += b * y[j]; fp32
static inline void axpy_then_axpy(float *y, float a, const float *d, float b, float *acc, int64_t n) {
    const __m512 av = _mm512_set1_ps(a), bv = _mm512_set1_ps(b);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : tail_mask(n - j);
        __m512 s = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, d + j), _mm512_maskz_loadu_ps(m, y + j));
        _mm512_mask_storeu_ps(y + j, m, s);
        _mm512_mask_storeu_ps(acc + j, m, _mm512_fmadd_ps(bv, s, _mm512_maskz_loadu_ps(m, acc + j)));
    }
}

// One head of the causal depthwise short conv for one token, + SiLU, for the n channels from c0 of a [3P]-wide row:
// y = bf16(silu(bf16(sum_j window[j] w[j]))) over the window [the k-1 previous inputs, this input], fp32 products
// (model/kda.py's one-token conv); the window then slides by one, in place. Returns y in fp32.
static void conv_silu(const uint16_t *x, const uint16_t *w, uint16_t *window, int64_t k, int64_t c0, int64_t n,
                      float *y) {
    for (int64_t c = c0; c < c0 + n; c++) {
        uint16_t *win = window + c * (k - 1);
        const uint16_t *wc = w + c * k;
        float acc = from_bf16(x[c]) * from_bf16(wc[k - 1]);
        for (int64_t j = 0; j < k - 1; j++) acc += from_bf16(win[j]) * from_bf16(wc[j]);
        for (int64_t j = 0; j + 1 < k - 1; j++) win[j] = win[j + 1];
        if (k > 1) win[k - 2] = x[c];
        y[c - c0] = round_bf16(silu(round_bf16(acc)));
    }
}

// KDA decode of B single tokens, each sequence's short-conv window and fp32 state read and updated in place in the
// engine's pools (model/kda.py's KDA.forward between its projections and o_proj; the delta rule as ops/kda.py's
// recurrent form; kda.md §1): per head, q, k, v = silu(conv(.)); q, k L2-normalised (q also times K^-1/2);
// g = -exp(A_log) softplus(f + dt_bias), beta = sigmoid(b); S = exp(g) * S (per key row), S += k (beta (v - k S)),
// o = bf16(q S); out = bf16(w * rmsnorm(o) * sigmoid(gate)) per head (GatedRMSNorm).
// qkv [B, 3P], f [B, P], b [B, H], gate [B, P], conv_w [3P, k], norm_w [V]: bf16; dt_bias [P], A_log [H]: fp32;
// windows [slots, 3P, k-1] bf16 and states [slots, H, K, V] fp32, indexed by slot [B]; out [B, H V] bf16. K, V <= 256.
// Returns 0, or -1 (touching nothing) when a slot is outside [0, num_slots).
int kimi_kda_decode_bf16(const uint16_t *qkv, const uint16_t *f, const uint16_t *b, const uint16_t *gate,
                         const uint16_t *conv_w, int64_t k, const float *dt_bias, const float *A_log,
                         const uint16_t *norm_w, float eps, uint16_t *windows, float *states, const int64_t *slot,
                         int64_t num_slots, int64_t B, int64_t H, int64_t K, int64_t V, uint16_t *out, int threads) {
    for (int64_t s = 0; s < B; s++)
        if (slot[s] < 0 || slot[s] >= num_slots) return -1;
    const int64_t P = H * K;
    const float scale = 1.0f / sqrtf((float)K);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H > 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t s = bh / H, h = bh % H;
        float q[256], kk[256], v[256], decay[256], kS[256], o[256];
        const uint16_t *x = qkv + s * 3 * P;
        uint16_t *win = windows + slot[s] * 3 * P * (k - 1);
        conv_silu(x, conv_w, win, k, h * K, K, q);
        conv_silu(x, conv_w, win, k, P + h * K, K, kk);
        conv_silu(x, conv_w, win, k, 2 * P + h * V, V, v);
        float qq = 0.0f, kn = 0.0f;
        for (int64_t i = 0; i < K; i++) { qq += q[i] * q[i]; kn += kk[i] * kk[i]; }
        const float qs = (1.0f / sqrtf(qq + 1e-6f)) * scale, ks = 1.0f / sqrtf(kn + 1e-6f);
        const float a = -expf(A_log[h]);
        for (int64_t i = 0; i < K; i++) {
            q[i] *= qs;
            kk[i] *= ks;
            const float z = from_bf16(f[s * P + h * K + i]) + dt_bias[h * K + i];
            decay[i] = expf(a * (z > 20.0f ? z : log1pf(expf(z))));
        }
        const float beta = 1.0f / (1.0f + expf(-from_bf16(b[s * H + h])));
        float *S = states + (slot[s] * H + h) * K * V;  // [K, V]
        for (int64_t j = 0; j < V; j++) kS[j] = o[j] = 0.0f;
        for (int64_t i = 0; i < K; i++) scale_then_axpy(S + i * V, decay[i], kk[i], kS, V);
        for (int64_t j = 0; j < V; j++) kS[j] = beta * (v[j] - kS[j]);  // delta
        for (int64_t i = 0; i < K; i++) axpy_then_axpy(S + i * V, kk[i], kS, q[i], o, V);
        float ss = 0.0f;
        for (int64_t j = 0; j < V; j++) {
            o[j] = round_bf16(o[j]);
            ss += o[j] * o[j];
        }
        const float r = 1.0f / sqrtf(ss / (float)V + eps);
        const uint16_t *g = gate + s * P + h * V;
        for (int64_t j = 0; j < V; j++) {
            const float sig = 1.0f / (1.0f + expf(-from_bf16(g[j])));
            out[s * P + h * V + j] = to_bf16(from_bf16(norm_w[j]) * (o[j] * r) * sig);
        }
    }
    return 0;
}
