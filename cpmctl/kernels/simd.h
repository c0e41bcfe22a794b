/* 8 fp32 lanes (AVX2 + FMA) for cpmctl's C kernels (blocks.c, attend.c, int8_matmul.c): loads
 * from and stores to fp32 or bf16 memory (rounding as bf16.h's float_to_bf16), a horizontal
 * sum, and exp. */
#ifndef CPMCTL_SIMD_H
#define CPMCTL_SIMD_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpmctl's kernels need AVX2 and FMA"
#endif

/* elements i .. i+7 of fp32 (bf16 = 0) or bf16 (bf16 = 1) memory as fp32 */
static inline __m256 load8(const void *p, size_t i, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    const __m128i bits = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

static inline void store8(void *p, size_t i, __m256 v, const int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    /* round to nearest even, NaN kept a quiet NaN */
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i top = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    top = _mm256_blendv_epi8(top, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top),
                                            _mm256_extracti128_si256(top, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

static inline float sum8(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

/* exp(x): x = n ln 2 + r, |r| <= ln 2 / 2, exp(r) by its degree-6 polynomial (Cephes' expf
 * coefficients; within 2 ulp of expf), times 2^n through the exponent bits. x is clamped so
 * that 2^n stays a normal float: exp of anything above 88.3 is ~2.2e38 rather than inf, below
 * -87.3 ~1.2e-38 rather than 0 (callers that need an exact zero mask it). */
static inline __m256 exp8(__m256 x) {
    /* (the clamp's operands in this order return x where it is NaN: NaN stays NaN) */
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                                   _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e, _mm256_castsi256_ps(two_n));
}

#endif
