/* Scaled dot-product attention for heads of few channels on the CPU: forward and backward, fp32.

   torch's CPU flash kernel spends its time on small matrix products when a head has 8 channels
   (the toy and mid models; trainer/speed.py). Here the keys run along SIMD lanes instead: a
   score is `channels` multiply-adds on a vector of keys, its exponential a polynomial on the
   same vector, so nothing is a matrix product of 8-wide operands. Queries go QB at a time so each
   key vector loaded serves QB of them. Built at first use by trainer/small_heads.py with the
   machine's compiler (-O3 -march=native); gcc's vector extensions pick the SIMD width.

   Layout (contiguous): q, o, go, gq [b][n][h d] and k, v, gk, gv [b][m][h d], as the UNet's
   projections give and take them (head `hi` of a row is its channels hi d .. hi d + d - 1), so no
   copy is made on either side of a call; lse [b h][n] the log-sum-exp of each query's scaled scores
   in base 2 (log2 of the sum of 2^(s log2 e)), saved for the backward pass. Inside, each head's keys
   and values are copied into the thread's scratch channel-major, keys along the last axis (kt, vt,
   and their gradients gkt, gvt: [d][mp], mp = m rounded up to a multiple of W, keys from m on zero
   and excluded from the softmax). */
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
#define QB 8
/* the backward pass takes keys KB at a time, so their K, V and gradient rows stay in cache while
   every query passes; each block costs a reduction of dQ per query. Measured at 4,096 tokens: 512
   keys on an AVX2 machine (15% faster than whole rows), 1,024 on an AVX-512 one (5% faster than 512
   or whole rows; 128 is 20% slower) */
#define KB (64 * W)
#define DMAX 16  /* the most channels a head may have here (trainer/small_heads.py: MAX_CHANNELS) */
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int vi __attribute__((vector_size(W * sizeof(int))));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* horizontal sum and max as a tree (log2(W) dependent steps, not W - 1): lane i with lane i + W/2,
   then i + W/4, ..., in registers on x86 (gcc's AVX-512 reductions add in this order); elsewhere
   through memory, which costs the toy model's short rows (77 keys: 5 vectors a query) 40% of the
   forward pass. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
static inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }
#elif defined(__AVX2__)
#include <immintrin.h>
static inline float hsum(vf v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
static inline float hmax(vf v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
#else
static inline float hsum(vf v) {
    float a[W];
    memcpy(a, &v, sizeof v);
    for (int w = W / 2; w > 0; w /= 2) for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}
static inline float hmax(vf v) {
    float a[W];
    memcpy(a, &v, sizeof v);
    for (int w = W / 2; w > 0; w /= 2) for (int i = 0; i < w; i++) a[i] = a[i + w] > a[i] ? a[i + w] : a[i];
    return a[0];
}
#endif

/* 2^x for x <= 0 (a score minus its row's max or log-sum-exp, both in base 2: the scores carry the
   factor log2(e), folded into the query), x clamped below at -126 (~1.2e-38). Cephes' exp2f
   polynomial (about 1 ulp) on f = x - n, n the rounded x, |f| <= 1/2: six multiply-adds, against
   the eight and a multiply of e^x's range reduction and polynomial. On x86 the clamp, the rounding
   and 2^n are single instructions (AVX-512's scalef does 2^n); elsewhere gcc's vector extensions. */
static inline vf exp2_poly(vf f) {
    vf y = splat(1.535336188319500E-4f);
    y = y * f + 1.339887440266574E-3f;
    y = y * f + 9.618437357674640E-3f;
    y = y * f + 5.550332471162809E-2f;
    y = y * f + 2.402264791363012E-1f;
    y = y * f + 6.931472028550421E-1f;
    return y * f + 1.f;
}
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
static inline vf vexp2(vf x) {
    x = vmax(x, splat(-126.f));
    vf n = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_scalef_ps((__m512)exp2_poly(x - n), (__m512)n);
}
#else
#if defined(__AVX2__)
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
static inline vf vround(vf x) { return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#else
static inline vf vsel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
static inline vf vround(vf x) {  /* floor(x + 0.5): truncation, one less where it overshot */
    x = x + 0.5f;
    vi t = __builtin_convertvector(x, vi);
    vf tf = __builtin_convertvector(t, vf);
    return __builtin_convertvector(t + (vi)(tf > x), vf);
}
#endif
static inline vf vexp2(vf x) {
    x = vmax(x, splat(-126.f));
    vf n = vround(x);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return exp2_poly(x - n) * (vf)e;
}
#endif
#define LOG2E 1.44269504088896341f

/* Denormal floats flushed to zero while a thread runs the kernel, its MXCSR restored after. Padded
   keys and far-off scores give probabilities near 1e-38, whose products are denormal: x86 takes a
   microcode assist for each (measured: 77 keys padded to 80, backward 3.4x slower than without). */
#if defined(__SSE__)
#include <xmmintrin.h>
static inline unsigned flush_denormals(void) { unsigned old = _mm_getcsr(); _mm_setcsr(old | 0x8040); return old; }
static inline void restore_denormals(unsigned old) { _mm_setcsr(old); }
#else
static inline unsigned flush_denormals(void) { return 0; }
static inline void restore_denormals(unsigned old) { (void)old; }
#endif

static inline vf tail_mask(long j, long m) {
    vf r;
    for (int i = 0; i < W; i++) r[i] = j + i < m ? 0.f : -1e30f;
    return r;
}

static inline __attribute__((always_inline)) void forward_head(
    const float *q, const float *kt, const float *vt, float *o, float *lse, float *s,
    long n, long m, long mp, int d, long ld, float scale) {  /* ld: floats from one row of q, o to the next */
    for (long i0 = 0; i0 < n; i0 += QB) {
        int nq = n - i0 < QB ? (int)(n - i0) : QB;
        float qs[QB][DMAX];  /* scale * log2(e): the scores come out in base 2 */
        for (int r = 0; r < QB; r++)
            for (int c = 0; c < d; c++) qs[r][c] = r < nq ? q[(i0 + r) * ld + c] * (scale * LOG2E) : 0.f;
        vf mx[QB];
        for (int r = 0; r < QB; r++) mx[r] = splat(-1e30f);
        for (long j = 0; j < mp; j += W) {
            vf acc[QB] = {0};
            for (int c = 0; c < d; c++) {
                vf k = load(kt + c * mp + j);
                for (int r = 0; r < QB; r++) acc[r] += qs[r][c] * k;
            }
            if (j + W > m) for (int r = 0; r < QB; r++) acc[r] += tail_mask(j, m);
            for (int r = 0; r < QB; r++) { store(s + r * mp + j, acc[r]); mx[r] = vmax(mx[r], acc[r]); }
        }
        /* two queries a pass: twice the independent exponentials in flight, each value vector loaded once */
        for (int r = 0; r < nq; r += 2) {
            int two = r + 1 < nq;
            float top[2] = {hmax(mx[r]), two ? hmax(mx[r + 1]) : 0.f};
            const float *s0 = s + r * mp, *s1 = s + (r + two) * mp;   /* one query left: done twice */
            vf sum[2] = {{0}, {0}}, oacc[2][DMAX];
            for (int c = 0; c < d; c++) oacc[0][c] = oacc[1][c] = (vf){0};
            for (long j = 0; j < mp; j += W) {
                vf p0 = vexp2(load(s0 + j) - top[0]), p1 = vexp2(load(s1 + j) - top[two]);
                sum[0] += p0;
                sum[1] += p1;
                for (int c = 0; c < d; c++) {
                    vf v = load(vt + c * mp + j);
                    oacc[0][c] += p0 * v;
                    oacc[1][c] += p1 * v;
                }
            }
            for (int t = 0; t <= two; t++) {
                float l = hsum(sum[t]);
                for (int c = 0; c < d; c++) o[(i0 + r + t) * ld + c] = hsum(oacc[t][c]) / l;
                lse[i0 + r + t] = top[t] + __builtin_log2f(l);  /* base 2, as the scores */
            }
        }
    }
}

static inline __attribute__((always_inline)) void backward_head(
    const float *q, const float *kt, const float *vt, const float *o, const float *go, const float *lse,
    float *gq, float *gkt, float *gvt, float *dsbuf, long n, long m, long mp, int d, long ld, float scale) {
    memset(gkt, 0, sizeof(float) * d * mp);
    memset(gvt, 0, sizeof(float) * d * mp);
    for (long i = 0; i < n; i++) memset(gq + i * ld, 0, sizeof(float) * d);
    for (long k0 = 0; k0 < mp; k0 += KB) {  /* KB is a multiple of W: blocks start on a vector */
      long k1 = k0 + KB < mp ? k0 + KB : mp;
      for (long i0 = 0; i0 < n; i0 += QB) {
        int nq = n - i0 < QB ? (int)(n - i0) : QB;
        /* qs: the forward's base-2 scaling, so that P is its P to the bit; qn: dK's, natural */
        float qs[QB][DMAX], qn[QB][DMAX], gs[QB][DMAX], dd[QB], l[QB];
        for (int r = 0; r < QB; r++) {
            float acc = 0.f;
            for (int c = 0; c < d; c++) {
                qs[r][c] = r < nq ? q[(i0 + r) * ld + c] * (scale * LOG2E) : 0.f;
                qn[r][c] = r < nq ? q[(i0 + r) * ld + c] * scale : 0.f;
                gs[r][c] = r < nq ? go[(i0 + r) * ld + c] : 0.f;
                acc += r < nq ? gs[r][c] * o[(i0 + r) * ld + c] : 0.f;
            }
            dd[r] = acc;
            l[r] = r < nq ? lse[i0 + r] : 1e30f;   /* rows past n: p = 0 */
        }
        for (long j = k0; j < k1; j += W) {
            /* dacc starts at -D: it comes out as dP - D. The scores are summed as the forward pass
               summed them (from zero), so that P is the forward's P to the last bit: starting them at
               -lse too made dQ, a sum that cancels, 4x less exact (fp64 test, 4,096 keys, 1 channel) */
            vf sacc[QB] = {0}, dacc[QB];
            for (int r = 0; r < QB; r++) dacc[r] = splat(-dd[r]);
            for (int c = 0; c < d; c++) {
                vf k = load(kt + c * mp + j), v = load(vt + c * mp + j);
                for (int r = 0; r < QB; r++) { sacc[r] += qs[r][c] * k; dacc[r] += gs[r][c] * v; }
            }
            if (j + W > m) for (int r = 0; r < QB; r++) sacc[r] += tail_mask(j, m);
            vf p[QB], ds[QB];
#pragma GCC unroll 8  /* p and dS stay in registers (10% faster: gcc did not unroll this body) */
            for (int r = 0; r < QB; r++) {
                p[r] = vexp2(sacc[r] - l[r]);
                ds[r] = p[r] * dacc[r];
                store(dsbuf + r * KB + (j - k0), ds[r]);
            }
            for (int c = 0; c < d; c++) {
                vf gk = load(gkt + c * mp + j), gv = load(gvt + c * mp + j);
                for (int r = 0; r < QB; r++) {
                    gk += ds[r] * qn[r][c];
                    gv += p[r] * gs[r][c];
                }
                store(gkt + c * mp + j, gk);
                store(gvt + c * mp + j, gv);
            }
        }
        for (int r = 0; r < nq; r++) {
            vf gqacc[DMAX];
            for (int c = 0; c < d; c++) gqacc[c] = (vf){0};
            const float *dr = dsbuf + r * KB - k0;
            for (long j = k0; j < k1; j += W) {
                vf x = load(dr + j);
                for (int c = 0; c < d; c++) gqacc[c] += x * load(kt + c * mp + j);
            }
            for (int c = 0; c < d; c++) gq[(i0 + r) * ld + c] += hsum(gqacc[c]) * scale;
        }
      }
    }
}

/* the SIMD width: kt and vt have a multiple of it as keys */
int sha_lanes(void) { return W; }
/* floats of scratch each thread needs for m keys of d channels (the caller allocates threads x
   this): a block of score rows, then kt, vt, gkt and gvt, each over m rounded up to a multiple of W */
long sha_scratch(long m, int d) {
    long mp = (m + W - 1) / W * W;
    return QB * (mp > KB ? mp : KB) + 4 * d * mp;
}

/* one head's keys (or values) from their rows into t [d][mp], zeros from key m on */
static void keys_last(const float *k, float *t, long m, long mp, int d, long ld) {
    for (int c = 0; c < d; c++) memset(t + c * mp + m, 0, sizeof(float) * (mp - m));
    for (long j = 0; j < m; j++)
        for (int c = 0; c < d; c++) t[c * mp + j] = k[j * ld + c];
}
/* and back: t's first m keys into rows */
static void keys_to_rows(const float *t, float *k, long m, long mp, int d, long ld) {
    for (long j = 0; j < m; j++)
        for (int c = 0; c < d; c++) k[j * ld + c] = t[c * mp + j];
}

void sha_forward(const float *q, const float *k, const float *v, float *o, float *lse,
                 long b, long h, long n, long m, int d, float scale, int threads, float *scratch) {
    long mp = (m + W - 1) / W * W, ld = h * d;
#pragma omp parallel num_threads(threads)
    {
        float *s = scratch + omp_get_thread_num() * sha_scratch(m, d);
        float *kt = s + QB * (mp > KB ? mp : KB), *vt = kt + d * mp;
        unsigned csr = flush_denormals();
#pragma omp for schedule(static)
        for (long bh = 0; bh < b * h; bh++) {
            long bi = bh / h, hi = bh % h;
            const float *qh = q + bi * n * ld + hi * d;
            float *oh = o + bi * n * ld + hi * d, *lh = lse + bh * n;
            keys_last(k + bi * m * ld + hi * d, kt, m, mp, d, ld);
            keys_last(v + bi * m * ld + hi * d, vt, m, mp, d, ld);
            switch (d) {
            case 8: forward_head(qh, kt, vt, oh, lh, s, n, m, mp, 8, ld, scale); break;
            default: forward_head(qh, kt, vt, oh, lh, s, n, m, mp, d, ld, scale);
            }
        }
        restore_denormals(csr);
    }
}

void sha_backward(const float *q, const float *k, const float *v, const float *o, const float *go,
                  const float *lse, float *gq, float *gk, float *gv,
                  long b, long h, long n, long m, int d, float scale, int threads, float *scratch) {
    long mp = (m + W - 1) / W * W, ld = h * d;
#pragma omp parallel num_threads(threads)
    {
        float *dsbuf = scratch + omp_get_thread_num() * sha_scratch(m, d);  /* a key block of dS per query */
        float *kt = dsbuf + QB * (mp > KB ? mp : KB), *vt = kt + d * mp, *gkt = vt + d * mp, *gvt = gkt + d * mp;
        unsigned csr = flush_denormals();
#pragma omp for schedule(static)
        for (long bh = 0; bh < b * h; bh++) {
            long bi = bh / h, hi = bh % h, qrow = bi * n * ld + hi * d, krow = bi * m * ld + hi * d;
            keys_last(k + krow, kt, m, mp, d, ld);
            keys_last(v + krow, vt, m, mp, d, ld);
            switch (d) {  /* 8 channels compiled on its own: its loops unrolled, accumulators in registers */
            case 8: backward_head(q + qrow, kt, vt, o + qrow, go + qrow, lse + bh * n, gq + qrow, gkt, gvt, dsbuf,
                                  n, m, mp, 8, ld, scale); break;
            default: backward_head(q + qrow, kt, vt, o + qrow, go + qrow, lse + bh * n, gq + qrow, gkt, gvt, dsbuf,
                                   n, m, mp, d, ld, scale);
            }
            keys_to_rows(gkt, gk + krow, m, mp, d, ld);
            keys_to_rows(gvt, gv + krow, m, mp, d, ld);
        }
        restore_denormals(csr);
    }
}
