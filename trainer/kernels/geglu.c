/* GEGLU's element-wise part on the CPU, forward and backward, fp32, one pass each.

   diffusers' GEGLU projects x to [h | g] (2 x inner channels) and returns h * gelu(g). In torch that
   is a chunk, a gelu and a multiply forward, and backward two multiplies, gelu's backward and a cat
   of the two halves' gradients: five passes over activations of (tokens x inner) floats, the UNet's
   largest (mid model, 4,096 tokens: ~60 ms a layer forward and backward, a sixth of it the matmuls).
   Here the forward reads proj once and writes out; the backward reads proj and dout once and writes
   d_proj = [dout * gelu(g) | dout * h * gelu'(g)] in place (no cat).

   gelu(g) = g * Phi(g), Phi(g) = erfc(-g / sqrt 2) / 2, gelu'(g) = Phi(g) + g * phi(g), phi the normal
   density. erfc as Numerical Recipes' Chebyshev fit (relative error under 1.2e-7 everywhere, and no
   cancellation for large negative g, where 1 + erf would lose the digits): t = 1 / (1 + z / 2),
   erfc(z) = t exp(-z^2 + P(t)) for z >= 0, 2 - erfc(-z) below. The exponential is Cephes'
   single-precision polynomial, as in small_heads.c. Layout: proj, d_proj [rows][2 * inner],
   out, dout [rows][inner], contiguous. */
#include <string.h>

#if defined(__AVX512F__)
#define W 16
#elif defined(__AVX__)
#define W 8
#else
#define W 4
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int vi __attribute__((vector_size(W * sizeof(int))));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
/* Cephes' single-precision exp polynomial (about 1 ulp) on r = x - n ln2, |r| <= ln2 / 2 */
static inline vf exp_poly(vf x, vf n) {
    x = x - n * 0.693359375f - n * -2.12194440e-4f;
    vf y = splat(1.9875691500E-4f);
    y = y * x + 1.3981999507E-3f;
    y = y * x + 8.3334519073E-3f;
    y = y * x + 4.1665795894E-2f;
    y = y * x + 1.6666665459E-1f;
    y = y * x + 5.0000001201E-1f;
    return y * x * x + x + 1.f;
}

/* exp(x) for x <= ~0, clamped below at -87.3 (~1e-38): Cephes' polynomial times 2^n */
static inline vf vexp(vf x) {
    x = vsel(x < -87.3f, splat(-87.3f), x);
    vf t = x * 1.44269504088896341f + 0.5f;  /* n = floor(t): truncation, one less where it overshot */
    vi ti = __builtin_convertvector(t, vi);
    vf n = __builtin_convertvector(ti + (vi)(__builtin_convertvector(ti, vf) > t), vf);  /* true is -1 */
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return exp_poly(x, n) * (vf)e;
}

/* Phi(g), the normal distribution function, and phi(g), its density */
static inline void normal(vf g, vf *cdf, vf *pdf) {
    vf x = g * -0.70710678118654752f;              /* erfc's argument */
    vf z = vsel(x < 0.f, -x, x);
    vf t = 1.f / (1.f + 0.5f * z);
    vf p = splat(0.17087277f);
    p = p * t + -0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t + -1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t + -0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t + -1.26551223f;
    vf e = t * vexp(p - z * z);                    /* erfc(|x|) */
    *cdf = 0.5f * vsel(x < 0.f, 2.f - e, e);
    *pdf = vexp(g * g * -0.5f) * 0.39894228040143268f;
}

static void forward_rows(const float *proj, float *out, long r0, long r1, long inner) {
    for (long r = r0; r < r1; r++) {
        const float *h = proj + r * 2 * inner, *g = h + inner;
        float *o = out + r * inner;
        for (long i = 0; i < inner; i += W) {
            vf hv, gv, cdf, pdf;
            if (i + W <= inner) { hv = load(h + i); gv = load(g + i); }
            else { for (int k = 0; k < W; k++) { hv[k] = i + k < inner ? h[i + k] : 0.f; gv[k] = i + k < inner ? g[i + k] : 0.f; } }
            normal(gv, &cdf, &pdf);
            vf y = hv * (gv * cdf);
            if (i + W <= inner) store(o + i, y);
            else for (int k = 0; i + k < inner; k++) o[i + k] = y[k];
        }
    }
}

static void backward_rows(const float *proj, const float *dout, float *dproj, long r0, long r1, long inner) {
    for (long r = r0; r < r1; r++) {
        const float *h = proj + r * 2 * inner, *g = h + inner, *d = dout + r * inner;
        float *dh = dproj + r * 2 * inner, *dg = dh + inner;
        for (long i = 0; i < inner; i += W) {
            vf hv, gv, dv, cdf, pdf;
            if (i + W <= inner) { hv = load(h + i); gv = load(g + i); dv = load(d + i); }
            else {
                for (int k = 0; k < W; k++) {
                    int in = i + k < inner;
                    hv[k] = in ? h[i + k] : 0.f; gv[k] = in ? g[i + k] : 0.f; dv[k] = in ? d[i + k] : 0.f;
                }
            }
            normal(gv, &cdf, &pdf);
            vf a = dv * (gv * cdf), b = dv * hv * (cdf + gv * pdf);
            if (i + W <= inner) { store(dh + i, a); store(dg + i, b); }
            else for (int k = 0; i + k < inner; k++) { dh[i + k] = a[k]; dg[i + k] = b[k]; }
        }
    }
}

/* rows split evenly over `threads` OpenMP threads (one where the build has no OpenMP) */
void geglu_forward(const float *proj, float *out, long rows, long inner, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++)
        forward_rows(proj, out, rows * t / threads, rows * (t + 1) / threads, inner);
}

void geglu_backward(const float *proj, const float *dout, float *dproj, long rows, long inner, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++)
        backward_rows(proj, dout, dproj, rows * t / threads, rows * (t + 1) / threads, inner);
}

/* the SIMD width this build uses (the tests build the narrower ones too) */
int geglu_lanes(void) { return W; }
