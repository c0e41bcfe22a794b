/* bf16 <-> fp32 for cpmctl's C kernels (int8_matmul.c, attend.c, blocks.c): a bf16 is the top
 * half of an fp32; rounding to it is to nearest, ties to even, NaN kept a (quiet) NaN. */
#ifndef CPMCTL_BF16_H
#define CPMCTL_BF16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t float_to_bf16(float value) {  /* round to nearest even */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);  /* NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* element i of fp32 (bf16 = 0) or bf16 (bf16 = 1) memory, as fp32 */
static inline float load1(const void *p, size_t i, const int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, size_t i, float value, const int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(value);
    else ((float *)p)[i] = value;
}

#endif
