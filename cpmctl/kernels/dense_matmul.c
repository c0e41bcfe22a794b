/* y = x @ w.T + bias for fp32 or bf16 weights and activations, for x86 CPUs with AVX-512 F
 * (and AVX-512 BF16 for bf16) or AVX2 + FMA, and training's strided products (gemm_f32).
 * Built into cpmctl's kernel library (cpmctl/kernels/library.py); cpmctl/kernels/dense.py
 * explains why it exists and checks every argument before calling it. This file is only the
 * arithmetic.
 *
 * The weights come packed in panels of NR output channels (dense.pack): fp32
 * [N/NR][K][NR], bf16 [N/NR][K/2][NR][2] (two consecutive inputs side by side, the pairs that
 * VDPBF16PS multiplies), zero-padded to whole panels and an even K. A panel is one contiguous
 * run, read front to back once per MR rows of x (AVX2: twice, half its width each time).
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

#define NR 32  /* output channels per panel: NV vectors of VL fp32 */
#define MB 96  /* rows of x per block that every panel meets before the next (run_f32) */
#define PREFETCH 4096  /* bytes ahead in a bf16 panel (as int8_matmul.c: on an AVX-512 CPU the
                        * hardware prefetcher alone streamed a CPM-Small token ~5-15% slower) */

/* The vector back-end: vec holds VL fp32 lanes, lanes_mask selects the first few of them
 * (a panel's last, partial columns). MR rows of x per pass over a panel; up to WIDE rows a
 * pass covers its whole width, more rows half of it: the accumulators and the broadcast inputs
 * fit the 32 (AVX-512: 12 x 2) or 16 (AVX2: 6 x 2, or 3 x 4) vector registers. (AVX2 with
 * 3 x 4 ran at ~70% of MKL's speed on 1,024 rows; 6 x 2 at MKL's.) bf16 weights
 * and inputs are fp32 with the low half zero, so a product of two is exact in fp32: AVX2 adds
 * a pair's two products with two FMAs, the odd input first, as VDPBF16PS does. */
#if defined(__AVX512F__)
#define VARIANT "avx512"
#define VL 16
#define PREFETCHES_F32(mt) 1  /* see AHEAD */
#define MR 12
#define WIDE MR
typedef __m512 vec;
typedef __mmask16 lanes_mask;
static inline lanes_mask first_lanes(int count) {
    return count >= VL ? 0xffff : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float value) { return _mm512_set1_ps(value); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec acc) { return _mm512_fmadd_ps(a, b, acc); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_lanes(lanes_mask m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline void vstore_lanes(lanes_mask m, float *p, vec v) { _mm512_mask_storeu_ps(p, m, v); }
#if defined(__AVX512BF16__)
#define DENSE_BF16 1
typedef __m512i vpairs;  /* VL pairs of bf16 */
static inline vpairs load_pairs(const uint16_t *p) { return _mm512_loadu_si512(p); }
static inline vpairs set1_pair(int32_t pair) { return _mm512_set1_epi32(pair); }
static inline vec dot_pairs(vec acc, vpairs w, vpairs x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}
static inline vec bf16_lanes(lanes_mask m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline void store_bf16_lanes(lanes_mask m, uint16_t *p, vec v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define VARIANT "avx2"
#define VL 8
/* fp32 prefetches only in passes of more rows than WIDE, which read the panel again from
 * L2: on a Zen 3 CPU a token's fp32 matmuls (one pass from memory) stream ~10% faster on the
 * hardware prefetcher alone; 256 rows run ~20% slower without. bf16 keeps its prefetch. */
#define PREFETCHES_F32(mt) ((mt) > WIDE)
#define MR 6
#define WIDE 3
#define DENSE_BF16 1
typedef __m256 vec;
typedef __m256i lanes_mask;
static inline lanes_mask first_lanes(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float value) { return _mm256_set1_ps(value); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec acc) { return _mm256_fmadd_ps(a, b, acc); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_lanes(lanes_mask m, const float *p) { return _mm256_maskload_ps(p, m); }
static inline void vstore_lanes(lanes_mask m, float *p, vec v) { _mm256_maskstore_ps(p, m, v); }
typedef __m256i vpairs;
static inline vpairs load_pairs(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vpairs set1_pair(int32_t pair) { return _mm256_set1_epi32(pair); }
static inline vec dot_pairs(vec acc, vpairs w, vpairs x) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w, high)),
                          _mm256_castsi256_ps(_mm256_and_si256(x, high)), acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), acc);
}
static inline int lanes_of(lanes_mask m) {
    return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m)));
}
static inline vec bf16_lanes(lanes_mask m, const uint16_t *p) {
    uint16_t part[VL] = {0};
    memcpy(part, p, (size_t)lanes_of(m) * sizeof *part);
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)part)), 16));
}
static inline void store_bf16_lanes(lanes_mask m, uint16_t *p, vec v) {
    /* round to nearest even as float_to_bf16 (bf16.h) does, NaN kept a quiet NaN */
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i top = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    top = _mm256_blendv_epi8(top, _mm256_or_si256(_mm256_srli_epi32(bits, 16),
                                                  _mm256_set1_epi32(0x40)), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top),
                                            _mm256_extracti128_si256(top, 1));
    uint16_t part[VL];
    _mm_storeu_si128((__m128i *)part, packed);
    memcpy(p, part, (size_t)lanes_of(m) * sizeof *part);
}
#endif
#define NV (NR / VL)

#if !defined(VARIANT)
int cpmctl_dense_layout(void) { return 0; }  /* 0: no dense kernel on this CPU */
const char *cpmctl_dense_variant(void) { return "none"; }
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
#if defined(DENSE_BF16)
    return NR | 1 << 16;  /* bit 16: bf16 too */
#else
    return NR;
#endif
}
const char *cpmctl_dense_variant(void) { return VARIANT; }

/* Which of a panel's NR columns exist: lanes_mask per vector for `width` columns. */
static inline __attribute__((always_inline)) void panel_masks(int width, lanes_mask *masks) {
    for (int j = 0; j < NV; j++) masks[j] = first_lanes(width - j * VL);
}

/* fp32: C = A @ B (+ bias) for any strides, the general form training's backward needs too
 * (cpmctl/models/dense.py): A [m][k] with element (i, c) at a[i * a_row + c * a_col]; B [k][n]
 * read in panels of NR columns, panel p's row c at b + p * b_panel + c * b_row (a packed
 * weight: b_panel = NR * k, b_row = NR; a plain row-major [k][n] matrix: b_panel = NR,
 * b_row = n); C [m][n] with row stride c_row, written, or added to (accumulate). The loads of
 * a panel's last, partial columns are masked, so a plain B is never read past its end. */
#define AHEAD 32  /* panel rows prefetched ahead (fp32): 4 KiB of a packed panel */

typedef struct {
    const float *a, *b, *bias;
    float *c;
    long a_row, a_col, b_panel, b_row, c_row;
    int m, k, n;
    int accumulate;  /* 1: C += A @ B (C's values are the sums' starting points) */
} gemm_f32;

/* Panel p's outputs in vectors j0 .. j0+nv-1 (of NV) for rows m0 .. m0+mt-1 of C (mt <= MR,
 * mt x nv accumulators); unit: A's columns are adjacent (a_col == 1, a constant so that the
 * loads need no multiply); full: the panel's NR columns all exist (a constant: plain loads,
 * which an FMA can take as its operand). */
static inline __attribute__((always_inline)) void panel_f32(const gemm_f32 *g, int p, int m0,
                                                            const int mt, const int j0,
                                                            const int nv, const int unit,
                                                            const int full) {
    const float *panel = g->b + p * g->b_panel + j0 * VL;
    const int n0 = p * NR + j0 * VL;
    lanes_mask masks[NV];
    panel_masks(g->n - p * NR, masks);
    const int ahead = PREFETCHES_F32(mt) ? AHEAD : 0;
    const float *a = g->a + m0 * g->a_row;
    const long a_col = unit ? 1 : g->a_col;
    float *out = g->c + m0 * g->c_row + n0;
    vec acc[MR][NV];
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < nv; j++)
            acc[i][j] = g->accumulate ? vload_lanes(masks[j0 + j], out + i * g->c_row + j * VL)
                                      : vzero();
    for (int c = 0; c < g->k; c++) {
        const float *row = panel + c * g->b_row;
        for (int line = 0; ahead && line < nv * VL; line += 16)  /* 16 fp32: a cache line */
            _mm_prefetch((const char *)(row + ahead * g->b_row + line), _MM_HINT_T0);
        vec w[NV];
        for (int j = 0; j < nv; j++)
            w[j] = full ? vload(row + j * VL) : vload_lanes(masks[j0 + j], row + j * VL);
        for (int i = 0; i < mt; i++) {
            const vec xv = vset1(a[i * g->a_row + c * a_col]);
            for (int j = 0; j < nv; j++) acc[i][j] = vfma(w[j], xv, acc[i][j]);
        }
    }
    for (int j = 0; j < nv; j++) {
        const vec b = g->bias ? vload_lanes(masks[j0 + j], g->bias + n0 + j * VL) : vzero();
        for (int i = 0; i < mt; i++)
            vstore_lanes(masks[j0 + j], out + i * g->c_row + j * VL, vadd(acc[i][j], b));
    }
}

/* mt rows of panel p: in one pass over its whole width up to WIDE rows, else in two passes of
 * half its width each (MR x NV / 2 accumulators: AVX2's 16 registers do not hold more). */
static inline __attribute__((always_inline)) void rows_pass_f32(
        const gemm_f32 *g, int p, int m0, const int mt, const int unit, const int full) {
    if (mt <= WIDE) {
        panel_f32(g, p, m0, mt, 0, NV, unit, full);
    } else {
        panel_f32(g, p, m0, mt, 0, NV / 2, unit, full);
        panel_f32(g, p, m0, mt, NV / 2, NV / 2, unit, full);
    }
}

#if defined(DENSE_BF16)
/* Inputs 2c and 2c+1 of mt rows into their accumulators for vectors j0 .. j0+nv-1 of the
 * panel; last_alone: input 2c is x's last, its pair's second half zero (as the packed weights'
 * padding). */
static inline __attribute__((always_inline)) void pairs_step(
        vec acc[MR][NV], const uint16_t *panel, const uint16_t *x, int ldx, const int mt,
        const int j0, const int nv, int c, const int last_alone) {
    const uint16_t *row = panel + (size_t)c * 2 * NR + 2 * j0 * VL;
    for (int line = 0; line < 2 * nv * VL; line += 32)  /* 32 bf16: a cache line */
        _mm_prefetch((const char *)(row + line) + PREFETCH, _MM_HINT_T0);
    vpairs w[NV];
    for (int j = 0; j < nv; j++) w[j] = load_pairs(row + 2 * j * VL);
    for (int i = 0; i < mt; i++) {
        int32_t pair = x[(size_t)i * ldx + 2 * c];
        if (!last_alone) memcpy(&pair, x + (size_t)i * ldx + 2 * c, sizeof pair);
        const vpairs xv = set1_pair(pair);
        for (int j = 0; j < nv; j++) acc[i][j] = dot_pairs(acc[i][j], w[j], xv);
    }
}

/* As panel_f32 with bf16 weights, x and y; an odd K's last input is paired with a zero. */
static inline __attribute__((always_inline)) void panel_bf16(
        const uint16_t *panel, const uint16_t *x, int ldx, const int mt, const int j0,
        const int nv, int k, const uint16_t *bias, int n0, int n, uint16_t *y) {
    vec acc[MR][NV];
    for (int i = 0; i < mt; i++)
        for (int j = 0; j < nv; j++) acc[i][j] = vzero();
    for (int c = 0; c < k / 2; c++) pairs_step(acc, panel, x, ldx, mt, j0, nv, c, 0);
    if (k & 1) pairs_step(acc, panel, x, ldx, mt, j0, nv, k / 2, 1);
    lanes_mask masks[NV];
    panel_masks(n - n0, masks);
    for (int j = 0; j < nv; j++) {
        const int at = n0 + (j0 + j) * VL;
        const vec b = bias ? bf16_lanes(masks[j0 + j], bias + at) : vzero();
        for (int i = 0; i < mt; i++)
            store_bf16_lanes(masks[j0 + j], y + (size_t)i * n + at, vadd(acc[i][j], b));
    }
}

/* As rows_pass_f32. */
static inline __attribute__((always_inline)) void rows_pass_bf16(
        const uint16_t *panel, const uint16_t *x, int ldx, const int mt, int k,
        const uint16_t *bias, int n0, int n, uint16_t *y) {
    if (mt <= WIDE) {
        panel_bf16(panel, x, ldx, mt, 0, NV, k, bias, n0, n, y);
    } else {
        panel_bf16(panel, x, ldx, mt, 0, NV / 2, k, bias, n0, n, y);
        panel_bf16(panel, x, ldx, mt, NV / 2, NV / 2, k, bias, n0, n, y);
    }
}
#endif

/* One panel against every row of x, MR at a time; the tail through the same code with a
 * constant row count (each count its own unrolled loop). */
#if MR == 12
#define TAIL_CASES(CALL) \
    switch (rest) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
    case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
    case 7: CALL(7); break; case 8: CALL(8); break; case 9: CALL(9); break; \
    case 10: CALL(10); break; case 11: CALL(11); break; default: break; }
#elif MR == 6
#define TAIL_CASES(CALL) \
    switch (rest) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
    case 4: CALL(4); break; case 5: CALL(5); break; default: break; }
#else
#error "TAIL_CASES needs a case for each row count below MR"
#endif

/* Rows first .. end-1 of C in panel p. */
static inline __attribute__((always_inline)) void rows_f32_strided(
        const gemm_f32 *g, int p, int first, int end, const int unit, const int full) {
    int m = first;
    for (; m + MR <= end; m += MR) rows_pass_f32(g, p, m, MR, unit, full);
    const int rest = end - m;
#define CALL_F32(mt) rows_pass_f32(g, p, m, mt, unit, full)
    TAIL_CASES(CALL_F32)
}

static void rows_f32(const gemm_f32 *g, int p, int first, int end) {
    const int full = g->n - p * NR >= NR;
    if (g->a_col == 1 && full) rows_f32_strided(g, p, first, end, 1, 1);
    else if (g->a_col == 1) rows_f32_strided(g, p, first, end, 1, 0);
    else if (full) rows_f32_strided(g, p, first, end, 0, 1);
    else rows_f32_strided(g, p, first, end, 0, 0);
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

#if defined(DENSE_BF16)
static void rows_bf16(const uint16_t *panel, const uint16_t *x, int m_rows, int k,
                      const uint16_t *bias, int n0, int n, uint16_t *y) {
    int m = 0;
    for (; m + MR <= m_rows; m += MR)
        rows_pass_bf16(panel, x + (size_t)m * k, k, MR, k, bias, n0, n, y + (size_t)m * n);
    const int rest = m_rows - m;
#define CALL_BF16(mt) \
    rows_pass_bf16(panel, x + (size_t)m * k, k, mt, k, bias, n0, n, y + (size_t)m * n)
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
#if defined(DENSE_BF16)
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
