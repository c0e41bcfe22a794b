/* y = x @ w.T + bias for fp32 or bf16 weights and activations, for x86 CPUs with AVX-512 F
 * (and AVX-512 BF16 for bf16). Built into the same library as int8_matmul.c
 * (cpmctl/infer/int8_kernel.py); cpmctl/infer/packed.py explains why it exists and checks every
 * argument before calling it. This file is only the arithmetic.
 *
 * The weights come packed in panels of NR output channels (packed.pack): fp32
 * [N/NR][K][NR], bf16 [N/NR][K/2][NR][2] (two consecutive inputs side by side, the pairs that
 * VDPBF16PS multiplies), zero-padded to whole panels and an even K. A panel is one contiguous
 * run, read front to back once per MR rows of x.
 *
 * Each output is one fp32 accumulator that adds its inputs' products in order k = 0, 1, ...
 * (pairs of them in bf16), whatever the number of rows, the rows' grouping or the thread: a
 * row's result does not depend on the batch it is computed in, to the bit.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define NR 32  /* output channels per panel: two vectors of 16 fp32 */
#define MR 12  /* rows of x per pass over a panel: 2 x MR accumulators */
#define PREFETCH 4096  /* bytes ahead in the panel (as int8_matmul.c: the hardware prefetcher
                        * alone streams a CPM-Small token's matmuls ~5-15% slower here) */

#if !defined(__AVX512F__)
int cpmctl_dense_layout(void) { return 0; }  /* 0: no dense kernel on this CPU */
int cpmctl_dense_matmul(const void *x, int m_rows, int k, const void *packed, const void *bias,
                        void *y, int n, int bf16, int threads) {
    return -1;
}
#else
int cpmctl_dense_layout(void) {
#if defined(__AVX512BF16__)
    return NR | 1 << 16;  /* bit 16: bf16 too */
#else
    return NR;
#endif
}

/* The panel's NR outputs for rows m .. m+mt-1 (mt <= MR), x row stride ldx elements. */
static inline __attribute__((always_inline)) void panel_f32(
        const float *panel, const float *x, int ldx, int mt, int k, const float *bias,
        int n0, int n, float *y) {
    __m512 acc[MR][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int c = 0; c < k; c++) {
        const char *ahead = (const char *)(panel + (size_t)c * NR) + PREFETCH;
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        const __m512 w0 = _mm512_loadu_ps(panel + (size_t)c * NR);
        const __m512 w1 = _mm512_loadu_ps(panel + (size_t)c * NR + 16);
        for (int i = 0; i < mt; i++) {
            const __m512 xv = _mm512_set1_ps(x[(size_t)i * ldx + c]);
            acc[i][0] = _mm512_fmadd_ps(w0, xv, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(w1, xv, acc[i][1]);
        }
    }
    const int width = n - n0 < NR ? n - n0 : NR;
    const __mmask16 lo = width >= 16 ? 0xffff : (__mmask16)((1u << width) - 1);
    const __mmask16 hi = width <= 16 ? 0 : width >= 32 ? 0xffff
                                         : (__mmask16)((1u << (width - 16)) - 1);
    __m512 b0 = _mm512_setzero_ps(), b1 = b0;
    if (bias) {
        b0 = _mm512_maskz_loadu_ps(lo, bias + n0);
        b1 = _mm512_maskz_loadu_ps(hi, bias + n0 + 16);
    }
    for (int i = 0; i < mt; i++) {
        _mm512_mask_storeu_ps(y + (size_t)i * n + n0, lo, _mm512_add_ps(acc[i][0], b0));
        _mm512_mask_storeu_ps(y + (size_t)i * n + n0 + 16, hi, _mm512_add_ps(acc[i][1], b1));
    }
}

#if defined(__AVX512BF16__)
/* As panel_f32 with bf16 weights, x and y: kp = K rounded up to even; x's odd tail, if any, is
 * read as zero. */
static inline __attribute__((always_inline)) void panel_bf16(
        const uint16_t *panel, const uint16_t *x, int ldx, int mt, int k, const uint16_t *bias,
        int n0, int n, uint16_t *y) {
    __m512 acc[MR][2];
    for (int i = 0; i < mt; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int pairs = k / 2;
    for (int c = 0; c < pairs; c++) {
        const char *ahead = (const char *)(panel + (size_t)c * 2 * NR) + PREFETCH;
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + (size_t)c * 2 * NR);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + (size_t)c * 2 * NR + NR);
        for (int i = 0; i < mt; i++) {
            int32_t pair;
            memcpy(&pair, x + (size_t)i * ldx + 2 * c, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xv);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xv);
        }
    }
    if (k & 1) {  /* the last input alone, its pair's second half zero */
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + (size_t)pairs * 2 * NR);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + (size_t)pairs * 2 * NR + NR);
        for (int i = 0; i < mt; i++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[(size_t)i * ldx + k - 1]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xv);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xv);
        }
    }
    const int width = n - n0 < NR ? n - n0 : NR;
    const __mmask16 lo = width >= 16 ? 0xffff : (__mmask16)((1u << width) - 1);
    const __mmask16 hi = width <= 16 ? 0 : width >= 32 ? 0xffff
                                         : (__mmask16)((1u << (width - 16)) - 1);
    __m512 b0 = _mm512_setzero_ps(), b1 = b0;
    if (bias) {
        b0 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lo, bias + n0)), 16));
        b1 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(hi, bias + n0 + 16)), 16));
    }
    for (int i = 0; i < mt; i++) {
        _mm256_mask_storeu_epi16(y + (size_t)i * n + n0, lo,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][0], b0)));
        _mm256_mask_storeu_epi16(y + (size_t)i * n + n0 + 16, hi,
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][1], b1)));
    }
}
#endif

/* One panel against every row of x, MR at a time; the tail through the same code with a
 * constant row count (each count its own unrolled loop). */
#define TAIL_CASES(CALL) \
    switch (rest) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
    case 7: CALL(7); break; case 8: CALL(8); break; case 9: CALL(9); break; \
    case 10: CALL(10); break; case 11: CALL(11); break; default: break; }

static void rows_f32(const float *panel, const float *x, int m_rows, int k, const float *bias,
                     int n0, int n, float *y) {
    int m = 0;
    for (; m + MR <= m_rows; m += MR)
        panel_f32(panel, x + (size_t)m * k, k, MR, k, bias, n0, n, y + (size_t)m * n);
    const int rest = m_rows - m;
#define CALL_F32(mt) panel_f32(panel, x + (size_t)m * k, k, mt, k, bias, n0, n, y + (size_t)m * n)
    TAIL_CASES(CALL_F32)
}

#if defined(__AVX512BF16__)
static void rows_bf16(const uint16_t *panel, const uint16_t *x, int m_rows, int k,
                      const uint16_t *bias, int n0, int n, uint16_t *y) {
    int m = 0;
    for (; m + MR <= m_rows; m += MR)
        panel_bf16(panel, x + (size_t)m * k, k, MR, k, bias, n0, n, y + (size_t)m * n);
    const int rest = m_rows - m;
#define CALL_BF16(mt) panel_bf16(panel, x + (size_t)m * k, k, mt, k, bias, n0, n, y + (size_t)m * n)
    TAIL_CASES(CALL_BF16)
}
#endif

/* x: [m_rows][k]; packed: panels as above; bias: [n] or NULL; y: [m_rows][n]; all fp32, or all
 * bf16 when bf16 is 1. Returns 0, or -1 when this build has no kernel for that dtype. */
int cpmctl_dense_matmul(const void *x, int m_rows, int k, const void *packed, const void *bias,
                        void *y, int n, int bf16, int threads) {
    const int panels = (n + NR - 1) / NR;
    if (!bf16) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int p = 0; p < panels; p++)
            rows_f32((const float *)packed + (size_t)p * NR * k, x, m_rows, k, bias, p * NR, n,
                     y);
        return 0;
    }
#if defined(__AVX512BF16__)
    const size_t kp = (size_t)(k + 1) / 2 * 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int p = 0; p < panels; p++)
        rows_bf16((const uint16_t *)packed + (size_t)p * NR * kp, x, m_rows, k, bias, p * NR, n,
                  y);
    return 0;
#else
    return -1;
#endif
}
#endif
