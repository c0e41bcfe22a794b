/* y = x @ w.T + bias for fp32 or bf16 weights and activations, for x86 CPUs with AVX-512 F
 * (and AVX-512 BF16 for bf16), and training's strided products (gemm_f32). Built into
 * cpmctl's kernel library (cpmctl/kernels/library.py); cpmctl/kernels/dense.py explains why it
 * exists and checks every argument before calling it. This file is only the arithmetic.
 *
 * The weights come packed in panels of NR output channels (dense.pack): fp32
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
#define MB 96  /* rows of x per block that every panel meets before the next (run_f32) */
#define PREFETCH 4096  /* bytes ahead in the panel (as int8_matmul.c: the hardware prefetcher
                        * alone streams a CPM-Small token's matmuls ~5-15% slower here) */

#if !defined(__AVX512F__)
int cpmctl_dense_layout(void) { return 0; }  /* 0: no dense kernel on this CPU */
int cpmctl_dense_matmul(const void *x, int m_rows, int k, const void *packed, const void *bias,
                        void *y, int n, int bf16, int threads) {
    return -1;
}
int cpmctl_dense_gemm_f32(const float *a, int m, int k, long a_row, long a_col, const float *b,
                          long b_panel, long b_row, int n, const float *bias, float *c,
                          long c_row, int accumulate, int threads) {
    return -1;
}
int cpmctl_dense_pack(const void *w, int n, int k, void *packed, int bf16, int threads) {
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

/* fp32: C = A @ B (+ bias) for any strides, the general form training's backward needs too
 * (cpmctl/models/dense.py): A [m][k] with element (i, c) at a[i * a_row + c * a_col]; B [k][n]
 * read in panels of NR columns, panel p's row c at b + p * b_panel + c * b_row (a packed
 * weight: b_panel = NR * k, b_row = NR; a plain row-major [k][n] matrix: b_panel = NR,
 * b_row = n); C [m][n] with row stride c_row, written, or added to (accumulate). The loads of
 * a panel's last, partial columns are masked, so a plain B is never read past its end. */
typedef struct {
    const float *a, *b, *bias;
    float *c;
    long a_row, a_col, b_panel, b_row, c_row;
    int m, k, n;
    int accumulate;  /* 1: C += A @ B (C's values are the sums' starting points) */
} gemm_f32;

#define AHEAD 32  /* panel rows prefetched ahead: 4 KiB of a packed panel */

/* Panel p's NR outputs for rows m0 .. m0+mt-1 of C (mt <= MR); unit: A's columns are
 * adjacent (a_col == 1, a constant so that the loads need no multiply). */
static inline __attribute__((always_inline)) void panel_f32(const gemm_f32 *g, int p, int m0,
                                                            const int mt, const int unit) {
    const float *panel = g->b + p * g->b_panel;
    const int n0 = p * NR, width = g->n - n0 < NR ? g->n - n0 : NR;
    const __mmask16 lo = width >= 16 ? 0xffff : (__mmask16)((1u << width) - 1);
    const __mmask16 hi = width <= 16 ? 0 : width >= 32 ? 0xffff
                                         : (__mmask16)((1u << (width - 16)) - 1);
    const float *a = g->a + m0 * g->a_row;
    const long a_col = unit ? 1 : g->a_col;
    float *out = g->c + m0 * g->c_row + n0;
    __m512 acc[MR][2];
    for (int i = 0; i < mt; i++) {
        acc[i][0] = g->accumulate ? _mm512_maskz_loadu_ps(lo, out + i * g->c_row)
                                  : _mm512_setzero_ps();
        acc[i][1] = g->accumulate ? _mm512_maskz_loadu_ps(hi, out + i * g->c_row + 16)
                                  : _mm512_setzero_ps();
    }
    for (int c = 0; c < g->k; c++) {
        const float *row = panel + c * g->b_row;
        _mm_prefetch((const char *)(row + AHEAD * g->b_row), _MM_HINT_T0);
        _mm_prefetch((const char *)(row + AHEAD * g->b_row) + 64, _MM_HINT_T0);
        const __m512 w0 = _mm512_maskz_loadu_ps(lo, row);
        const __m512 w1 = _mm512_maskz_loadu_ps(hi, row + 16);
        for (int i = 0; i < mt; i++) {
            const __m512 xv = _mm512_set1_ps(a[i * g->a_row + c * a_col]);
            acc[i][0] = _mm512_fmadd_ps(w0, xv, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(w1, xv, acc[i][1]);
        }
    }
    __m512 b0 = _mm512_setzero_ps(), b1 = b0;
    if (g->bias) {
        b0 = _mm512_maskz_loadu_ps(lo, g->bias + n0);
        b1 = _mm512_maskz_loadu_ps(hi, g->bias + n0 + 16);
    }
    for (int i = 0; i < mt; i++) {
        _mm512_mask_storeu_ps(out + i * g->c_row, lo, _mm512_add_ps(acc[i][0], b0));
        _mm512_mask_storeu_ps(out + i * g->c_row + 16, hi, _mm512_add_ps(acc[i][1], b1));
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

/* Rows first .. end-1 of C in panel p. */
static inline __attribute__((always_inline)) void rows_f32_strided(
        const gemm_f32 *g, int p, int first, int end, const int unit) {
    int m = first;
    for (; m + MR <= end; m += MR) panel_f32(g, p, m, MR, unit);
    const int rest = end - m;
#define CALL_F32(mt) panel_f32(g, p, m, mt, unit)
    TAIL_CASES(CALL_F32)
}

static void rows_f32(const gemm_f32 *g, int p, int first, int end) {
    if (g->a_col == 1) rows_f32_strided(g, p, first, end, 1);
    else rows_f32_strided(g, p, first, end, 0);
}

/* Every (MB rows, panel) pair, a thread's pairs consecutive: it multiplies one block of A (in
 * its L2 cache) by every panel before the next block, so A is read from memory once and B once
 * per block. */
static void run_f32(const gemm_f32 *g, int threads) {
    const int panels = (g->n + NR - 1) / NR, blocks = (g->m + MB - 1) / MB;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++)
        for (int p = 0; p < panels; p++)
            rows_f32(g, p, b * MB, (b + 1) * MB < g->m ? (b + 1) * MB : g->m);
}

int cpmctl_dense_gemm_f32(const float *a, int m, int k, long a_row, long a_col, const float *b,
                          long b_panel, long b_row, int n, const float *bias, float *c,
                          long c_row, int accumulate, int threads) {
    const gemm_f32 g = {a, b, bias, c, a_row, a_col, b_panel, b_row, c_row, m, k, n,
                        accumulate};
    run_f32(&g, threads);
    return 0;
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

/* w [n][k] row-major (fp32, or bf16 when bf16 is 1) -> the panels above, zero-padded: each
 * thread writes whole panels, reading its 32 rows side by side. */
int cpmctl_dense_pack(const void *w, int n, int k, void *packed, int bf16, int threads) {
    const int panels = (n + NR - 1) / NR;
    if (!bf16) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int p = 0; p < panels; p++) {
            float *out = (float *)packed + (size_t)p * NR * k;
            const float *rows = (const float *)w + (size_t)p * NR * k;
            const int height = n - p * NR < NR ? n - p * NR : NR;
            for (int c = 0; c < k; c++) {
                for (int j = 0; j < height; j++) out[(size_t)c * NR + j] = rows[(size_t)j * k + c];
                for (int j = height; j < NR; j++) out[(size_t)c * NR + j] = 0.0f;
            }
        }
        return 0;
    }
    const int kp = (k + 1) / 2 * 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int p = 0; p < panels; p++) {
        uint16_t *out = (uint16_t *)packed + (size_t)p * NR * kp;
        const uint16_t *rows = (const uint16_t *)w + (size_t)p * NR * k;
        const int height = n - p * NR < NR ? n - p * NR : NR;
        for (int c = 0; c < kp; c += 2) {
            uint16_t *pairs = out + (size_t)c * NR;
            for (int j = 0; j < height; j++) {
                pairs[2 * j] = rows[(size_t)j * k + c];
                pairs[2 * j + 1] = c + 1 < k ? rows[(size_t)j * k + c + 1] : 0;
            }
            for (int j = height; j < NR; j++) pairs[2 * j] = pairs[2 * j + 1] = 0;
        }
    }
    return 0;
}

/* x: [m_rows][k]; packed: panels as above; bias: [n] or NULL; y: [m_rows][n]; all fp32, or all
 * bf16 when bf16 is 1. Returns 0, or -1 when this build has no kernel for that dtype. */
int cpmctl_dense_matmul(const void *x, int m_rows, int k, const void *packed, const void *bias,
                        void *y, int n, int bf16, int threads) {
    if (!bf16) {
        const gemm_f32 g = {x, packed, bias, y, k, 1, (long)NR * k, NR, n, m_rows, k, n, 0};
        run_f32(&g, threads);
        return 0;
    }
#if defined(__AVX512BF16__)
    const int panels = (n + NR - 1) / NR, blocks = (m_rows + MB - 1) / MB;
    const size_t kp = (size_t)(k + 1) / 2 * 2;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++)
        for (int p = 0; p < panels; p++) {  /* as run_f32 */
            const int first = b * MB, rows = m_rows - first < MB ? m_rows - first : MB;
            rows_bf16((const uint16_t *)packed + (size_t)p * NR * kp,
                      (const uint16_t *)x + (size_t)first * k, rows, k, bias, p * NR, n,
                      (uint16_t *)y + (size_t)first * n);
        }
    return 0;
#else
    return -1;
#endif
}
#endif
