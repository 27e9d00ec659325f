/* One AdamW step of a tensor whose two moments are bitsandbytes' 8-bit blockwise state, on the CPU.

   bitsandbytes' CPU path (and trainer/adamw8bit.py's torch version of it) makes separate passes over
   memory: dequantize both moments, update them, find each block's largest magnitude, scale, bin,
   look the bin's code up, copy back. Here each block of 256 elements is done in one pass while it is
   in L1: moments dequantized (`code[q] * absmax`, as bitsandbytes' kernel), the AdamW update
   (torch's fused AdamW: decoupled weight decay, bias corrections, eps added after the square root),
   then each moment quantized with bitsandbytes' rule: scaled by the inverse of its block's largest
   magnitude into [-1, 1], bin trunc(((x + 1) / 2) * 65535 + 0.5), the bin's nearest code from the
   lookup table trainer/adamw8bit.py builds. Built with -ffp-contract=off (trainer/small_heads.py),
   so every product and sum is rounded on its own, as in those separate torch operations: the same
   bytes come out. */
#include <stdint.h>

#define BLOCK 256
#define BINS 65536

static inline float quantize_scale(const float *x, long len) {
    float top = 0.f;
    for (long i = 0; i < len; i++) {
        float a = x[i] < 0.f ? -x[i] : x[i];
        top = a > top ? a : top;
    }
    return top;
}

static inline void quantize(const float *x, long len, float top, const uint8_t *lut, uint8_t *q) {
    float inverse = top == 0.f ? 0.f : 1.f / top;
    for (long i = 0; i < len; i++) {
        float y = x[i] * inverse;
        y = y < -1.f ? -1.f : (y > 1.f ? 1.f : y);
        y = ((y + 1.f) * 0.5f) * (float)(BINS - 1) + 0.5f;
        q[i] = top == 0.f ? 0 : lut[(int)y];
    }
}

/* p, g: n fp32 weights and gradients; q1, q2: n 8-bit codes of the two moments, absmax1, absmax2
   their scales (one per block of 256, the last block may be partial); code1, code2: the 256 values
   of each code; lut1, lut2: bin -> code index. decay = 1 - lr * weight_decay, step_size = lr / (1 -
   beta1^step), bc2_sqrt = sqrt(1 - beta2^step), 1 - beta computed in double by the caller (as torch
   does, then rounded to float). */
void adamw8bit_step(float *p, const float *g, uint8_t *q1, uint8_t *q2, float *absmax1, float *absmax2,
                    const float *code1, const float *code2, const uint8_t *lut1, const uint8_t *lut2, long n,
                    float beta2, float one_minus_beta1, float one_minus_beta2, float eps, float decay,
                    float step_size, float bc2_sqrt,
                    int threads) {
    long blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        long start = b * BLOCK, len = n - start < BLOCK ? n - start : BLOCK;
        float m[BLOCK], v[BLOCK];
        float s1 = absmax1[b], s2 = absmax2[b];
        float *pb = p + start;
        const float *gb = g + start;
        uint8_t *c1 = q1 + start, *c2 = q2 + start;
        for (long i = 0; i < len; i++) {
            float gi = gb[i];
            float mi = code1[c1[i]] * s1, vi = code2[c2[i]] * s2;
            mi = mi + one_minus_beta1 * (gi - mi);                /* torch's lerp toward the gradient */
            vi = vi * beta2 + one_minus_beta2 * gi * gi;
            float denom = __builtin_sqrtf(vi) / bc2_sqrt + eps;
            pb[i] = pb[i] * decay - step_size * (mi / denom);
            m[i] = mi;
            v[i] = vi;
        }
        float t1 = quantize_scale(m, len), t2 = quantize_scale(v, len);
        quantize(m, len, t1, lut1, c1);
        quantize(v, len, t2, lut2, c2);
        absmax1[b] = t1;
        absmax2[b] = t2;
    }
}
