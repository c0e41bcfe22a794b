/* New tokens' attention for every (row, head, token). Self-attention: append the tokens' keys
 * and values to the KV cache, then attend each query over the cached prefix and the new tokens
 * up to its own (causal); a decoding step has one new token per row, a prefill the whole
 * prompt. Cross-attention (cross = 1): the queries alone attend over every one of `length`
 * cached keys (an encoder's output). Built into cpmctl's kernel library
 * (cpmctl/kernels/library.py); cpmctl/kernels/attention.py explains why it exists and checks
 * every argument before calling it. This file is only the arithmetic.
 *
 * qkv: [batch][n_new][3][heads][d_head] (the fused QKV projection's output, q then k then v),
 * or with cross [batch][n_new][heads][d_head] (the queries), fp32 or bf16. keys, values:
 * [batch][heads][max_len][d_head], fp32 or bf16. Token s goes to position length + s and its
 * query attends positions 0 .. length + s (cross: 0 .. length - 1) where mask (int64, row
 * stride mask_stride; NULL: every position) is nonzero. out: [batch][n_new][heads][d_head]
 * (merged heads, the output projection's input) in qkv's dtype.
 *
 * A score is the dot product times `scale` (PyTorch's default 1/sqrt(d_head); T5's 1), plus
 * bias[h][s][j] when a bias is given (fp32 [heads][n_new][bias_keys], the same for every row:
 * T5's relative position bias). The scores and the softmax are fp32, each query on its own,
 * the visible keys in order: a row's outputs do not depend on the other rows, nor on how much
 * padding precedes it (masked keys are skipped, not added as zeros). A query with no visible
 * key gets zeros, one with a NaN score NaNs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

/* Copy token s of row b, head h from qkv into the cache (in the cache's dtype). Inlined with
 * constant dtype flags, like attend_query, so that each combination is a branch-free loop. */
static inline __attribute__((always_inline)) void append_token(
        const void *qkv, const int act_bf16, void *keys, void *values, const int cache_bf16,
        int b, int s, int h, int n_new, int heads, int d_head, int max_len, int length) {
    const size_t width = (size_t)heads * d_head;
    const size_t k_at = ((size_t)b * n_new + s) * 3 * width + width + (size_t)h * d_head;
    const size_t new_at = (((size_t)b * heads + h) * max_len + length + s) * d_head;
    for (int d = 0; d < d_head; d++) {
        store1(keys, new_at + d, load1(qkv, k_at + d, act_bf16), cache_bf16);
        store1(values, new_at + d, load1(qkv, k_at + width + d, act_bf16), cache_bf16);
    }
}

/* What one query reads besides its tensors: the layout (cross), the score's scale and bias. */
typedef struct {
    int cross;
    float scale;
    const float *bias;
    int bias_keys;
} scoring;

/* The query of token s of row b, head h, over positions 0 .. length + s (cross: all `length`).
 * Each visible key's score, then its softmax weight (masked keys: 0, and skipped below), then
 * the weighted values, each key in order: every visible key gets the same numbers wherever it
 * sits in the cache (exp in vectors of 8 positions, the last ones through a padded copy). */
static inline __attribute__((always_inline)) void attend_query(
        const void *qkv, const int act_bf16, const void *keys, const void *values,
        const int cache_bf16, int b, int s, int h, int n_new, int heads, int d_head,
        int max_len, int length, const int64_t *mask, int mask_stride, void *out, float *q,
        float *scores, const scoring *how) {
    const size_t width = (size_t)heads * d_head;
    const size_t token = (size_t)b * n_new + s;
    const size_t q_at = token * (how->cross ? 1 : 3) * width + (size_t)h * d_head;
    const size_t cache_at = ((size_t)b * heads + h) * max_len * d_head;
    const int last = how->cross ? length - 1 : length + s;
    const int whole = d_head / 16 * 16, eights = d_head / 8 * 8;
    for (int d = 0; d < d_head; d++) q[d] = load1(qkv, q_at + d, act_bf16);
    const float scale = how->scale;
    const float *bias = how->bias ? how->bias + ((size_t)h * n_new + s) * how->bias_keys : NULL;
    const int64_t *visible = mask ? mask + (size_t)b * mask_stride : NULL;
    float largest = -INFINITY;
    int unordered = 0;
    for (int j = 0; j <= last; j++) {
        if (visible && !visible[j]) {
            scores[j] = -INFINITY;
            continue;
        }
        const size_t k_at = cache_at + (size_t)j * d_head;
        __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  /* two FMA chains */
        int d = 0;
        for (; d < whole; d += 16) {
            even = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(keys, k_at + d, cache_bf16),
                                   even);
            odd = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8),
                                  load8(keys, k_at + d + 8, cache_bf16), odd);
        }
        if (d < eights) {
            even = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(keys, k_at + d, cache_bf16),
                                   even);
            d += 8;
        }
        float dot = sum8(_mm256_add_ps(even, odd));
        for (; d < d_head; d++) dot += q[d] * load1(keys, k_at + d, cache_bf16);
        scores[j] = dot * scale + (bias ? bias[j] : 0.0f);
        largest = fmaxf(largest, scores[j]);  /* (fmaxf passes over a NaN: caught below) */
        unordered |= isnan(scores[j]);
    }
    const size_t out_at = token * width + (size_t)h * d_head;
    if (unordered) {  /* a NaN score makes every weight NaN, as in PyTorch's softmax */
        for (int d = 0; d < d_head; d++) store1(out, out_at + d, NAN, act_bf16);
        return;
    }
    float *acc = q;  /* the query is no longer needed: accumulate the output in its place */
    for (int d = 0; d < d_head; d++) acc[d] = 0.0f;
    float total = 0.0f;
    if (largest > -INFINITY) {
        const __m256 top = _mm256_set1_ps(largest), none = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j <= last; j += 8) {
            float rest[8];
            const int count = last + 1 - j < 8 ? last + 1 - j : 8;
            float *at = count == 8 ? scores + j : rest;
            for (int i = 0; count < 8 && i < 8; i++) rest[i] = i < count ? scores[j + i] : 0.0f;
            const __m256 v = _mm256_loadu_ps(at);
            _mm256_storeu_ps(at, _mm256_and_ps(exp8(_mm256_sub_ps(v, top)),
                                               _mm256_cmp_ps(v, none, _CMP_NEQ_OQ)));
            for (int i = 0; count < 8 && i < count; i++) scores[j + i] = rest[i];
        }
        for (int j = 0; j <= last; j++) {
            const float p = scores[j];
            if (p == 0.0f) continue;  /* masked (a visible key's weight is at least ~1e-38) */
            const size_t v_at = cache_at + (size_t)j * d_head;
            const __m256 weight = _mm256_set1_ps(p);
            total += p;
            int d = 0;
            for (; d < eights; d += 8)
                _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(
                    weight, load8(values, v_at + d, cache_bf16), _mm256_loadu_ps(acc + d)));
            for (; d < d_head; d++) acc[d] += p * load1(values, v_at + d, cache_bf16);
        }
    }
    const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    for (int d = 0; d < d_head; d++) store1(out, out_at + d, acc[d] * inverse, act_bf16);
}

/* The four (activation, cache) dtype combinations, each its own specialised loop. */
#define BY_DTYPE(call, ...)                                                        \
    do {                                                                            \
        if (act_bf16 && cache_bf16) call(qkv, 1, keys, values, 1, __VA_ARGS__);     \
        else if (act_bf16) call(qkv, 1, keys, values, 0, __VA_ARGS__);              \
        else if (cache_bf16) call(qkv, 0, keys, values, 1, __VA_ARGS__);            \
        else call(qkv, 0, keys, values, 0, __VA_ARGS__);                            \
    } while (0)

/* scale <= 0: 1/sqrt(d_head). Returns 0, or -1 when out of memory for the per-thread scratch. */
int cpmctl_attend(const void *qkv, int act_bf16, int batch, int n_new, int heads, int d_head,
                  void *keys, void *values, int cache_bf16, int max_len, int length,
                  const int64_t *mask, int mask_stride, void *out, int cross, float scale,
                  const float *bias, int bias_keys, int threads) {
    const int pairs = cross ? 0 : batch * heads, queries = batch * n_new * heads;
    const int keys_seen = cross ? length : length + n_new;
    const scoring how = {cross, scale > 0.0f ? scale : 1.0f / sqrtf((float)d_head), bias,
                         bias_keys};
    int failed = 0;
    /* below ~64k multiply-adds a second thread costs more to wake than it saves */
    #pragma omp parallel num_threads(threads) \
        if ((long)queries * keys_seen * d_head >= 65536)
    {
        #pragma omp for schedule(static)
        for (int pair = 0; pair < pairs; pair++)
            for (int s = 0; s < n_new; s++)
                BY_DTYPE(append_token, pair / heads, s, pair % heads, n_new, heads, d_head,
                         max_len, length);
        /* (the loop's implicit barrier: every key is in the cache before a query reads it) */
        float *q = malloc((size_t)d_head * sizeof(float));
        float *scores = malloc((size_t)keys_seen * sizeof(float));
        if (!q || !scores) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int query = 0; query < queries; query++) {
            if (!q || !scores) continue;
            const int h = query % heads, s = (query / heads) % n_new;
            const int b = query / heads / n_new;
            BY_DTYPE(attend_query, b, s, h, n_new, heads, d_head, max_len, length, mask,
                     mask_stride, out, q, scores, &how);
        }
        free(q);
        free(scores);
    }
    return failed ? -1 : 0;
}
