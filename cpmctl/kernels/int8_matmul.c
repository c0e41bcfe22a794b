/* y = x @ (scale[:, None] * w).T + bias: int8 weights, bf16 activations, for x86 CPUs with
 * AVX-512 BW + VNNI, or AVX2 (with AVX-VNNI where present). Built on first use by
 * cpmctl/kernels/library.py; cpmctl/kernels/int8.py explains why it exists. This file is only
 * the arithmetic.
 *
 * The weights come packed (int8.pack): blocks of ROWS output channels, and inside a
 * block the input dimension in slices of COLS: [N/ROWS][K/COLS][ROWS][COLS] int8, zero-padded.
 * A block is one contiguous run the hardware prefetcher can follow, read once for every row of
 * x.
 *
 * Each row of x is quantized on the fly to int16 against its own max |x| (15 bits of precision
 * per row, finer than bf16's 8-bit mantissa for all but far-from-max values), so that the
 * product is an integer dot product of int16 pairs into int32 lanes: one VPDPWSSD (AVX-512
 * VNNI: 32 pairs, 16 lanes; AVX-VNNI: 16 pairs, 8 lanes) or VPMADDWD + VPADDD (AVX2), the int8
 * weights widened by one VPMOVSXBW. One weight times one activation is at most 127 * 32767 <
 * 2^22, so a lane may add 512 of them (< 2^31): the int32 lanes are moved to fp32 every FLUSH
 * slices, before that, and never overflow.
 */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

#define ROWS 4        /* output channels per packed block */
#define COLS 32       /* inputs per slice */
#define PREFETCH 4096 /* bytes ahead of the slice being read (on a 2-core Zen 5 VM, a CPM-Small
                       * token's matmuls stream at 25 GB/s with 512, 42 GB/s with 4096) */
#define TINY 1e-30f   /* the smallest max |x| of a row that is not taken for zeros */

/* The vector back-end: ivec holds STEP int16 (as int32 lanes after a dot), fvec as many fp32
 * lanes; widen() loads STEP int8 as int16, dot() adds the pairwise products to int32 lanes. */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VARIANT "avx512-vnni"
#define STEP 32
typedef __m512i ivec;
typedef __m512 fvec;
static inline ivec izero(void) { return _mm512_setzero_si512(); }
static inline fvec fzero(void) { return _mm512_setzero_ps(); }
static inline ivec load16(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline ivec widen(const int8_t *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
static inline ivec dot(ivec acc, ivec x, ivec w) { return _mm512_dpwssd_epi32(acc, x, w); }
static inline fvec add_lanes(fvec sum, ivec lanes) {
    return _mm512_add_ps(sum, _mm512_cvtepi32_ps(lanes));
}
static inline float total(fvec sum) { return _mm512_reduce_add_ps(sum); }
#elif defined(__AVX2__)
#define STEP 16
typedef __m256i ivec;
typedef __m256 fvec;
static inline ivec izero(void) { return _mm256_setzero_si256(); }
static inline fvec fzero(void) { return _mm256_setzero_ps(); }
static inline ivec load16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline ivec widen(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
#if defined(__AVXVNNI__)
#define VARIANT "avx-vnni"
static inline ivec dot(ivec acc, ivec x, ivec w) { return _mm256_dpwssd_avx_epi32(acc, x, w); }
#else
#define VARIANT "avx2"
static inline ivec dot(ivec acc, ivec x, ivec w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w));
}
#endif
static inline fvec add_lanes(fvec sum, ivec lanes) {
    return _mm256_add_ps(sum, _mm256_cvtepi32_ps(lanes));
}
static inline float total(fvec sum) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
#else
#error "the int8 kernel needs AVX2 or AVX-512 BW + VNNI"
#endif

/* A vector has STEP / 2 int32 lanes, so a lane adds COLS / (STEP / 2) products per slice: 2
 * (AVX-512) or 4 (AVX2), and at most 512 between flushes. */
#define FLUSH (512 / (COLS / (STEP / 2)))

int cpmctl_int8_layout(int which) { return which == 0 ? ROWS : COLS; }
const char *cpmctl_int8_variant(void) { return VARIANT; }

/* xq[m] = round(x[m] / xscale[m]) with xscale[m] = max|x[m]| / 32767; padded with zeros to kp.
 * A row holding inf or NaN gets a NaN scale, which makes its outputs NaN; a row below TINY
 * (where 32767 / max|x| would overflow) counts as zeros. */
static void quantize_rows(const uint16_t *x, int m_rows, int k, int kp, int16_t *xq,
                          float *xscale, int threads) {
    #pragma omp parallel for num_threads(threads) if (m_rows >= 4 * threads)
    for (int m = 0; m < m_rows; m++) {
        const uint16_t *row = x + (size_t)m * k;
        const int whole = k / 8 * 8;  /* inputs taken 8 at a time (AVX2), the rest one by one */
        __m256 sizes = _mm256_setzero_ps(), worst = _mm256_setzero_ps();
        for (int i = 0; i < whole; i += 8) {
            const __m256 size = _mm256_and_ps(load8(row, i, 1), _mm256_castsi256_ps(
                _mm256_set1_epi32(0x7fffffff)));
            sizes = _mm256_max_ps(sizes, size);
            worst = _mm256_or_ps(worst, _mm256_cmp_ps(size, _mm256_set1_ps(FLT_MAX),
                                                      _CMP_NLE_UQ));  /* inf or NaN */
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, sizes);
        float largest = 0.0f;
        int finite = _mm256_movemask_ps(worst) == 0;
        for (int i = 0; i < 8; i++) largest = fmaxf(largest, lanes[i]);
        for (int i = whole; i < k; i++) {
            float size = fabsf(bf16_to_float(row[i]));
            finite &= isfinite(size) != 0;
            largest = fmaxf(largest, size);
        }
        int16_t *out = xq + (size_t)m * kp;
        if (!finite || largest < TINY) {
            xscale[m] = finite ? 0.0f : NAN;
            memset(out, 0, (size_t)kp * sizeof *out);
            continue;
        }
        float scale = largest / 32767.0f, inverse = 1.0f / scale;
        xscale[m] = scale;
        const __m256 times = _mm256_set1_ps(inverse);
        for (int i = 0; i < whole; i += 8) {  /* rounded to nearest even, as lrintf */
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8(row, i, 1), times));
            _mm_storeu_si128((__m128i *)(out + i), _mm_packs_epi32(
                _mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
        for (int i = whole; i < k; i++) out[i] = (int16_t)lrintf(bf16_to_float(row[i]) * inverse);
        for (int i = k; i < kp; i++) out[i] = 0;
    }
}

/* Keeps v in a register at this point: GCC otherwise folds each load of x into every multiply
 * that uses it and reassociates the sums, which spills accumulators to the stack; with it the
 * loop holds every accumulator in a register (1.3-1.4x at 8 rows on Zen 3's AVX2). */
#define IN_REGISTER(v) __asm__("" : "+v"(v))

/* Rows m .. m+mt-1 of y for channels r0 .. r0+rc-1 of one packed block, mt x rc <= 8: mt rows
 * share each widened weight, rc channels each loaded row of x, and the mt x rc accumulators
 * plus the weights fit the registers. */
static inline __attribute__((always_inline)) void block_rows(
        const int8_t *block, const int16_t *xq, const float *xscale, int m, const int mt,
        const int r0, const int rc, int kp, int n0, int n, const float *scale,
        const float *bias, uint16_t *y) {
    const int slices = kp / COLS;
    fvec sums[4][ROWS];
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rc; r++) sums[i][r] = fzero();
    for (int first = 0; first < slices; first += FLUSH) {
        const int last = first + FLUSH < slices ? first + FLUSH : slices;
        ivec dots[4][ROWS];
        for (int i = 0; i < mt; i++)
            for (int r = 0; r < rc; r++) dots[i][r] = izero();
        for (int s = first; s < last; s++) {
            const int8_t *slice = block + (size_t)s * ROWS * COLS;
            _mm_prefetch((const char *)slice + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)slice + PREFETCH + 64, _MM_HINT_T0);
            for (int c = 0; c < COLS; c += STEP) {
                ivec w[ROWS];
                for (int r = 0; r < rc; r++) w[r] = widen(slice + (r0 + r) * COLS + c);
                for (int i = 0; i < mt; i++) {
                    ivec xs = load16(xq + (size_t)(m + i) * kp + (size_t)s * COLS + c);
                    IN_REGISTER(xs);
                    for (int r = 0; r < rc; r++) {
                        dots[i][r] = dot(dots[i][r], xs, w[r]);
                        IN_REGISTER(dots[i][r]);
                    }
                }
            }
        }
        for (int i = 0; i < mt; i++)
            for (int r = 0; r < rc; r++) sums[i][r] = add_lanes(sums[i][r], dots[i][r]);
    }
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < rc && n0 + r0 + r < n; r++) {
            const int channel = n0 + r0 + r;
            float value = total(sums[i][r]) * xscale[m + i] * scale[channel];
            if (bias) value += bias[channel];
            y[(size_t)(m + i) * n + channel] = float_to_bf16(value);
        }
}

/* x: [m_rows][k] bf16; packed: [ceil(n/ROWS)][kp/COLS][ROWS][COLS] int8 with kp = k rounded up
 * to COLS; scale, bias: [n] fp32 (bias may be NULL); y: [m_rows][n] bf16. Returns 0, or -1 when
 * out of memory. */
int cpmctl_int8_matmul(const uint16_t *x, int m_rows, int k, const int8_t *packed,
                       const float *scale, const float *bias, uint16_t *y, int n, int kp,
                       int threads) {
    int16_t *xq = aligned_alloc(64, ((size_t)m_rows * kp * sizeof(int16_t) + 63) / 64 * 64);
    float *xscale = malloc((size_t)m_rows * sizeof(float));
    if (!xq || !xscale) {
        free(xq);
        free(xscale);
        return -1;
    }
    quantize_rows(x, m_rows, k, kp, xq, xscale, threads);
    const int blocks = (n + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        const int8_t *block = packed + (size_t)b * ROWS * kp;
        const int n0 = b * ROWS;
        int m = 0;  /* fours, then a pair, against two channels at a time (four spill) */
        for (; m + 4 <= m_rows; m += 4)
            for (int r0 = 0; r0 < ROWS; r0 += 2)
                block_rows(block, xq, xscale, m, 4, r0, 2, kp, n0, n, scale, bias, y);
        for (; m + 2 <= m_rows; m += 2)
            for (int r0 = 0; r0 < ROWS; r0 += 2)
                block_rows(block, xq, xscale, m, 2, r0, 2, kp, n0, n, scale, bias, y);
        if (m < m_rows) block_rows(block, xq, xscale, m, 1, 0, ROWS, kp, n0, n, scale, bias, y);
    }
    free(xq);
    free(xscale);
    return 0;
}
