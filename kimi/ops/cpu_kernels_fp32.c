// kimi's C kernel for fp32 models on CPUs without native bf16 (AVX2 + FMA: most laptops, AMD Zen 2-3), built and
// loaded by kimi/ops/cpu_kernels.py. Activations and sums are fp32; the weight is read as bf16 and widened in
// registers, which is exact where the fp32 weight is bf16-representable (a bf16 checkpoint loaded in fp32): the
// product is the fp32 product, in a different summation order, from half the bytes. Batch-1 decode streams every
// weight once per token, so half the bytes is up to twice the speed.
//
// gemv: y = x W^T. x [M, K] fp32, W [N, K] bf16 (row-major, one output feature per row), y [M, N] fp32.
// Accumulated along K in 4 x 8 lanes, then reduced. W streams one row at a time, start to end (the one sequential
// stream the hardware prefetcher follows best), with a software prefetch 1 KB ahead (8-13% faster on an AVX2 EPYC,
// where the plain loop reached ~11 GB/s of ~17 GB/s one core reads); a row, a few KB, is reused from L1 for all M
// rows of x. A prefetch never faults, so running past the end of W is harmless.
#include <immintrin.h>
#include <stdint.h>

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

// row n of W against every row of x: four accumulators along K, so four FMA chains are in flight while W streams
static void row(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, int64_t n, float *y) {
    const int64_t K32 = K & ~(int64_t)31, K8 = K & ~(int64_t)7;
    for (int64_t m = 0; m < M; m++) {
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

void kimi_gemv_f32_bf16w(const float *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, float *y, int threads) {
    if (threads > 1 && N >= 256) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) row(x, M, K, W + n * K, N, n, y);
    } else {  // no OpenMP region at all: entering one costs microseconds even with one thread
        for (int64_t n = 0; n < N; n++) row(x, M, K, W + n * K, N, n, y);
    }
}
