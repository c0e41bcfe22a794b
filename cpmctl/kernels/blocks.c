/* A model's blocks for the new tokens of a generation step in one call, in place on x, with the
 * matmuls on cpmctl's dense or int8 kernels (dense_matmul.c, int8_matmul.c) and the attention
 * on attend.c. A GPT's block (cpmctl_gpt_layers):
 *
 *     h = layer_norm(x); x = x + proj(attend(qkv(h), cache)); h = layer_norm(x);
 *     x = x + down(gelu(up(h)))
 *
 * an encoder-decoder's decoder block (cpmctl_decoder_layers: T5's, as CPM-2's):
 *
 *     h = rms_norm(x); x = x + o(attend([q(h), k(h), v(h)], cache, scale 1, relative bias))
 *     h = rms_norm(x); x = x + cross_o(attend_cross(cross_q(h), the encoder's keys and values))
 *     h = rms_norm(x); x = x + wo(gelu(wi_0(h)) * wi_1(h))
 *
 * Built into cpmctl's kernel library (cpmctl/kernels/library.py); cpmctl/kernels/blocks.py
 * explains why it exists and checks every argument before calling it. This file is only the
 * arithmetic.
 *
 * Activations, norms' weights and the KV caches are fp32 (bf16 = 0) or bf16 (bf16 = 1); each
 * operation computes in fp32 and rounds its output to that dtype once, as PyTorch's CPU
 * operators do: a residual sum, a norm's output, GELU's output, the gate's product. Every
 * operation computes each row on its own, so a row's numbers do not depend on the batch.
 *
 * GELU is PyTorch's tanh form, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
 * computed as the equal x / (1 + exp(-2u)) with simd.h's exp.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

/* The kernels this file calls (their own files document their arguments). */
int cpmctl_int8_matmul(const uint16_t *x, int m_rows, int k, const int8_t *packed,
                       const float *scale, const float *bias, uint16_t *y, int n, int kp,
                       int threads);
int cpmctl_dense_matmul(const void *x, int m_rows, int k, const void *packed, const void *bias,
                        void *y, int n, int bf16, int threads);
int cpmctl_attend(const void *qkv, int act_bf16, int batch, int n_new, int heads, int d_head,
                  void *keys, void *values, int cache_bf16, int max_len, int length,
                  const int64_t *mask, int mask_stride, void *out, int cross, float scale,
                  const float *bias, int bias_keys, int threads);

/* One linear layer: y [rows][n] = x [rows][k] @ W.T + bias. DENSE: `weights` packed for
 * dense_matmul.c in the activations' dtype, bias (or NULL) in that dtype too; INT8: packed for
 * int8_matmul.c (kp: k rounded up to its slices), fp32 scales and bias, bf16 activations. */
enum { DENSE = 0, INT8 = 1 };
typedef struct {
    int kind, n, k, kp;
    const void *weights;
    const float *scales;
    const void *bias;
} cpmctl_linear;

typedef struct {
    const void *ln_1_weight, *ln_1_bias, *ln_2_weight, *ln_2_bias;  /* [d] each */
    cpmctl_linear qkv, proj, up, down;
} cpmctl_gpt_layer;

/* ---- the elementwise operations, each over one row of `width` */

/* out = (x - mean) / sqrt(var + eps) * weight + bias, the population variance of the row. */
static void layer_norm_row(const void *x, void *out, const void *weight, const void *bias,
                           int width, float eps, const int bf16) {
    const int whole = width / 8 * 8;
    __m256 sums = _mm256_setzero_ps();
    float sum = 0.0f;
    for (int i = 0; i < whole; i += 8) sums = _mm256_add_ps(sums, load8(x, i, bf16));
    for (int i = whole; i < width; i++) sum += load1(x, i, bf16);
    const float mean = (sum8(sums) + sum) / width;
    const __m256 means = _mm256_set1_ps(mean);
    __m256 squares = _mm256_setzero_ps();
    float square = 0.0f;
    for (int i = 0; i < whole; i += 8) {
        const __m256 centred = _mm256_sub_ps(load8(x, i, bf16), means);
        squares = _mm256_fmadd_ps(centred, centred, squares);
    }
    for (int i = whole; i < width; i++) {
        const float centred = load1(x, i, bf16) - mean;
        square += centred * centred;
    }
    const float rstd = 1.0f / sqrtf((sum8(squares) + square) / width + eps);
    const __m256 rstds = _mm256_set1_ps(rstd);
    for (int i = 0; i < whole; i += 8) {
        const __m256 normal = _mm256_mul_ps(_mm256_sub_ps(load8(x, i, bf16), means), rstds);
        store8(out, i, _mm256_fmadd_ps(normal, load8(weight, i, bf16), load8(bias, i, bf16)),
               bf16);
    }
    for (int i = whole; i < width; i++)
        store1(out, i, (load1(x, i, bf16) - mean) * rstd * load1(weight, i, bf16) +
                       load1(bias, i, bf16), bf16);
}

/* x += y, elementwise over `count`. */
static void add_into(void *x, const void *y, size_t count, const int bf16) {
    const size_t whole = count / 8 * 8;
    for (size_t i = 0; i < whole; i += 8)
        store8(x, i, _mm256_add_ps(load8(x, i, bf16), load8(y, i, bf16)), bf16);
    for (size_t i = whole; i < count; i++)
        store1(x, i, load1(x, i, bf16) + load1(y, i, bf16), bf16);
}

#define GELU_BETA 0.7978845608028654f  /* sqrt(2 / pi) */
#define GELU_KAPPA 0.044715f

/* x = gelu(x), tanh form, elementwise over `count`. */
static void gelu_in_place(void *x, size_t count, const int bf16) {
    const size_t whole = count / 8 * 8;
    const __m256 minus_two_beta = _mm256_set1_ps(-2.0f * GELU_BETA);
    const __m256 kappa = _mm256_set1_ps(GELU_KAPPA), one = _mm256_set1_ps(1.0f);
    for (size_t i = 0; i < whole; i += 8) {
        const __m256 v = load8(x, i, bf16);
        const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(kappa, v), _mm256_mul_ps(v, v), v);
        const __m256 e = exp8(_mm256_mul_ps(minus_two_beta, inner));
        store8(x, i, _mm256_div_ps(v, _mm256_add_ps(one, e)), bf16);
    }
    for (size_t i = whole; i < count; i++) {
        const float v = load1(x, i, bf16);
        const float inner = v + GELU_KAPPA * v * v * v;
        store1(x, i, v / (1.0f + expf(-2.0f * GELU_BETA * inner)), bf16);
    }
}

/* ---- the step */

/* 0, -1 when out of memory, -2 when the dense kernel has no code for the dtype */
static int linear(const cpmctl_linear *layer, const void *x, int rows, void *y, int bf16,
                  int threads) {
    if (layer->kind == INT8)
        return cpmctl_int8_matmul(x, rows, layer->k, layer->weights, layer->scales,
                                  layer->bias, y, layer->n, layer->kp, threads);
    return cpmctl_dense_matmul(x, rows, layer->k, layer->weights, layer->bias, y, layer->n,
                               bf16, threads) ? -2 : 0;
}

/* x[i] *= y[i] over `count` (the gated FFN's product). */
static void multiply_into(void *x, const void *y, size_t count, const int bf16) {
    const size_t whole = count / 8 * 8;
    for (size_t i = 0; i < whole; i += 8)
        store8(x, i, _mm256_mul_ps(load8(x, i, bf16), load8(y, i, bf16)), bf16);
    for (size_t i = whole; i < count; i++)
        store1(x, i, load1(x, i, bf16) * load1(y, i, bf16), bf16);
}

/* out = x / sqrt(mean(x^2) + eps) * weight (T5's norm: no centring, no bias). */
static void rms_norm_row(const void *x, void *out, const void *weight, int width, float eps,
                         const int bf16) {
    const int whole = width / 8 * 8;
    __m256 squares = _mm256_setzero_ps();
    float square = 0.0f;
    for (int i = 0; i < whole; i += 8) {
        const __m256 v = load8(x, i, bf16);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    for (int i = whole; i < width; i++) square += load1(x, i, bf16) * load1(x, i, bf16);
    const float rstd = 1.0f / sqrtf((sum8(squares) + square) / width + eps);
    const __m256 rstds = _mm256_set1_ps(rstd);
    for (int i = 0; i < whole; i += 8)
        store8(out, i, _mm256_mul_ps(load8(weight, i, bf16),
                                     _mm256_mul_ps(load8(x, i, bf16), rstds)), bf16);
    for (int i = whole; i < width; i++)
        store1(out, i, load1(weight, i, bf16) * (load1(x, i, bf16) * rstd), bf16);
}

/* Each of `rows` rows of x normalized into out: a layer norm (GPT's), or with bias NULL an RMS
 * norm (T5's, which has no bias). */
static void norm_rows(const void *x, void *out, const void *weight, const void *bias,
                      size_t rows, int d, float eps, const int bf16) {
    const size_t size = bf16 ? 2 : 4;
    for (size_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * d * size;
        char *into = (char *)out + r * d * size;
        if (bias) layer_norm_row(row, into, weight, bias, d, eps, bf16);
        else rms_norm_row(row, into, weight, d, eps, bf16);
    }
}

/* x: [batch][n_new][d] (updated in place); keys, values: [n_layers][batch][heads][max_len]
 * [d_head], the new tokens written at positions length ..; mask (int64, row stride
 * mask_stride) or NULL as attend.c takes it; qkv: scratch [batch][n_new][3][heads][d_head].
 * Returns 0, -1 when out of memory, -2 when a matmul has no kernel for the dtype. */
int cpmctl_gpt_layers(void *x, int bf16, int batch, int n_new, int d, int heads, int d_head,
                      int ffn, const cpmctl_gpt_layer *layers, int n_layers, float eps,
                      void *keys, void *values, int max_len, int length, const int64_t *mask,
                      int mask_stride, void *qkv, int threads) {
    const size_t rows = (size_t)batch * n_new, inner = (size_t)heads * d_head;
    const size_t size = bf16 ? 2 : 4, per_layer = (size_t)batch * inner * max_len * size;
    char *h = malloc(rows * d * size), *attended = malloc(rows * inner * size);
    char *hidden = malloc(rows * ffn * size), *out = malloc(rows * d * size);
    int status = h && attended && hidden && out ? 0 : -1;
    for (int l = 0; l < n_layers && status == 0; l++) {
        const cpmctl_gpt_layer *layer = layers + l;
        norm_rows(x, h, layer->ln_1_weight, layer->ln_1_bias, rows, d, eps, bf16);
        status = linear(&layer->qkv, h, rows, qkv, bf16, threads);
        if (status == 0)
            status = cpmctl_attend(qkv, bf16, batch, n_new, heads, d_head,
                                   (char *)keys + l * per_layer, (char *)values + l * per_layer,
                                   bf16, max_len, length, mask, mask_stride, attended, 0, 0.0f,
                                   NULL, 0, threads);
        if (status == 0) status = linear(&layer->proj, attended, rows, out, bf16, threads);
        if (status != 0) break;
        add_into(x, out, rows * d, bf16);
        norm_rows(x, h, layer->ln_2_weight, layer->ln_2_bias, rows, d, eps, bf16);
        status = linear(&layer->up, h, rows, hidden, bf16, threads);
        if (status != 0) break;
        gelu_in_place(hidden, rows * ffn, bf16);
        status = linear(&layer->down, hidden, rows, out, bf16, threads);
        if (status == 0) add_into(x, out, rows * d, bf16);
    }
    free(h);
    free(attended);
    free(hidden);
    free(out);
    return status;
}

typedef struct {
    const void *norms[3];  /* ln_1, ln_2, ln_3: [d] each */
    cpmctl_linear q, k, v, o, cross_q, cross_o, wi_0, wi_1, wo;
} cpmctl_decoder_layer;

/* x: [batch][n_new][d] (updated in place); keys, values: the self-attention cache as in
 * cpmctl_gpt_layers; cross: 2 x n_layers pointers, each layer's encoder keys then values,
 * [batch][heads][source][d_head] each; bias: fp32 [heads][n_new][bias_keys] (T5's relative position
 * bias, the same for every layer); source_mask (int64, row stride source_stride) or NULL: the
 * encoder positions to attend; qkv: scratch [batch][n_new][3][heads][d_head]. Returns as
 * cpmctl_gpt_layers. */
int cpmctl_decoder_layers(void *x, int bf16, int batch, int n_new, int d, int heads,
                          int d_head, int ffn, const cpmctl_decoder_layer *layers,
                          int n_layers, float eps, void *keys, void *values, int max_len,
                          int length, const float *bias, int bias_keys, void *const *cross,
                          int source, const int64_t *source_mask, int source_stride,
                          void *qkv, int threads) {
    const size_t rows = (size_t)batch * n_new, inner = (size_t)heads * d_head;
    const size_t size = bf16 ? 2 : 4, per_layer = (size_t)batch * inner * max_len * size;
    char *h = malloc(rows * d * size), *part = malloc(rows * inner * size);
    char *gate = malloc(rows * ffn * size), *hidden = malloc(rows * ffn * size);
    char *out = malloc(rows * d * size);
    int status = h && part && gate && hidden && out ? 0 : -1;
    for (int l = 0; l < n_layers && status == 0; l++) {
        const cpmctl_decoder_layer *layer = layers + l;
        const cpmctl_linear *projections[3] = {&layer->q, &layer->k, &layer->v};
        norm_rows(x, h, layer->norms[0], NULL, rows, d, eps, bf16);
        for (int p = 0; p < 3 && status == 0; p++) {  /* into qkv's row layout */
            status = linear(projections[p], h, rows, part, bf16, threads);
            for (size_t r = 0; status == 0 && r < rows; r++)
                memcpy((char *)qkv + (r * 3 + p) * inner * size, part + r * inner * size,
                       inner * size);
        }
        if (status == 0)
            status = cpmctl_attend(qkv, bf16, batch, n_new, heads, d_head,
                                   (char *)keys + l * per_layer, (char *)values + l * per_layer,
                                   bf16, max_len, length, NULL, 0, part, 0, 1.0f, bias,
                                   bias_keys, threads);
        if (status == 0) status = linear(&layer->o, part, rows, out, bf16, threads);
        if (status != 0) break;
        add_into(x, out, rows * d, bf16);
        norm_rows(x, h, layer->norms[1], NULL, rows, d, eps, bf16);
        status = linear(&layer->cross_q, h, rows, qkv, bf16, threads);
        if (status == 0)
            status = cpmctl_attend(qkv, bf16, batch, n_new, heads, d_head, cross[2 * l],
                                   cross[2 * l + 1], bf16, source, source, source_mask,
                                   source_stride, part, 1, 1.0f, NULL, 0, threads);
        if (status == 0) status = linear(&layer->cross_o, part, rows, out, bf16, threads);
        if (status != 0) break;
        add_into(x, out, rows * d, bf16);
        norm_rows(x, h, layer->norms[2], NULL, rows, d, eps, bf16);
        status = linear(&layer->wi_0, h, rows, gate, bf16, threads);
        if (status == 0) status = linear(&layer->wi_1, h, rows, hidden, bf16, threads);
        if (status != 0) break;
        gelu_in_place(gate, rows * ffn, bf16);
        multiply_into(gate, hidden, rows * ffn, bf16);
        status = linear(&layer->wo, gate, rows, out, bf16, threads);
        if (status == 0) add_into(x, out, rows * d, bf16);
    }
    free(h);
    free(part);
    free(gate);
    free(hidden);
    free(out);
    return status;
}
