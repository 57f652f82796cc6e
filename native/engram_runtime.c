/* engram_runtime.c — the Engram term of a layer in C, and llama.cpp's eval callback.
 *
 * Implements the "Engram runtime" section of native/engram.h. `ek_engram_forward` computes
 * exactly what EngramLayer.forward (engram_local/model.py) computes, in float32 with double
 * accumulators for the norms; `ek_eval_callback` runs it inside llama.cpp's graph on the
 * residual stream entering each Engram layer.
 *
 * Style as engram.c: no globals, no allocation, every argument checked before any output is
 * written. No libm either (the C tests link without -lm): exp and rsqrt are computed here, to
 * double precision, then rounded to float.
 *
 * Speed: the projections k = W_K e and v = W_V e dominate (2 x E x D multiply-adds per token
 * per layer). Weights are stored transposed ([E, D]) so the inner loop is an axpy over D that
 * vectorises without reassociation (the build has no -ffast-math); on x86-64 with GCC the hot
 * loops are also compiled for AVX2 and picked at load time (target_clones). Zero entries of e
 * (untouched table rows) skip their weight row entirely.
 */
#include "engram.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__SANITIZE_ADDRESS__)
#define EK_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EK_VECTOR_CLONES
#endif

/* Tokens per block of the projection loops: the block's k and v accumulators
 * (2 x 8 x D floats) stay in L1/L2 while each weight row is applied to all of them. */
#define EK_TOKEN_BLOCK 8

/* ---------------------------------------------------------------- size arithmetic */

static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static int add_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || a > INT64_MAX - b) return 0;
    *out = a + b;
    return 1;
}

/* ---------------------------------------------------------------- scalar math (no libm) */

static double bits_to_double(uint64_t u) {
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static uint64_t double_bits(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

/* 2^n for n in [-1022, 1023]. */
static double pow2i(int n) {
    return bits_to_double((uint64_t)(n + 1023) << 52);
}

/* exp(x) to ~1 ulp of double: x = n ln2 + r, |r| <= ln2/2, Taylor to degree 13. */
static double ek_exp(double x) {
    if (x != x) return x;                          /* NaN */
    if (x > 709.0) return bits_to_double(0x7ff0000000000000ull); /* +inf */
    if (x < -708.0) return 0.0;                    /* below the normal range: 0 is what we need */
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const double q = x * 1.44269504088896338700e+00;
    const int n = (int)(q < 0 ? q - 0.5 : q + 0.5);
    const double r = (x - (double)n * ln2_hi) - (double)n * ln2_lo;
    double p = 1.0 / 6227020800.0;                 /* 1/13! */
    static const double inv_fact[13] = {
        1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
        1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = p * r + inv_fact[i];
    return p * pow2i(n);
}

/* 1/sqrt(s) for s >= 0 to ~1 ulp of double (0 -> +inf, inf -> 0, NaN -> NaN). */
static double ek_rsqrt(double s) {
    if (s != s) return s;
    if (s <= 0.0) return s == 0.0 ? bits_to_double(0x7ff0000000000000ull) : bits_to_double(0x7ff8000000000000ull);
    if (s > 1.7976931348623157e308) return 0.0;    /* +inf */
    double scale = 1.0;
    if (s < 0x1p-900) { s *= 0x1p1000; scale = 0x1p500; }      /* keep the bit trick in range */
    else if (s > 0x1p900) { s *= 0x1p-1000; scale = 0x1p-500; }
    double y = bits_to_double(0x5fe6eb50c7b537a9ull - (double_bits(s) >> 1));
    for (int i = 0; i < 6; i++) y = y * (1.5 - 0.5 * s * y * y);
    return y * scale;
}

static float sigmoid_f(float x) {
    return (float)(1.0 / (1.0 + ek_exp(-(double)x)));
}

/* RMSNorm's scale: 1/sqrt(mean(x^2) + eps), as torch computes it in float32 (mean and sum in
 * float32 there; double here, then rounded). */
static float rms_scale(const float *x, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float mean = (float)(ss / (double)n);
    return (float)ek_rsqrt((double)(mean + eps));
}

/* ---------------------------------------------------------------- hot loops */

/* k[t] = sum_j e[t, j] W_K^T[j], v likewise, for T tokens: axpy form (vectorises without
 * reassociation), tokens in blocks so each weight row is read once per block. */
EK_VECTOR_CLONES
static void project(const float *restrict e, int64_t T, int64_t E, int64_t D,
                    const float *restrict wk, const float *restrict wv,
                    float *restrict k, float *restrict v) {
    memset(k, 0, (size_t)(T * D) * sizeof(float));
    memset(v, 0, (size_t)(T * D) * sizeof(float));
    for (int64_t t0 = 0; t0 < T; t0 += EK_TOKEN_BLOCK) {
        const int64_t t1 = t0 + EK_TOKEN_BLOCK < T ? t0 + EK_TOKEN_BLOCK : T;
        for (int64_t j = 0; j < E; j++) {
            const float *restrict wkj = wk + j * D;
            const float *restrict wvj = wv + j * D;
            for (int64_t t = t0; t < t1; t++) {
                const float s = e[t * E + j];
                if (s == 0.0f) continue;           /* untouched row: contributes exactly 0 */
                float *restrict kt = k + t * D;
                float *restrict vt = v + t * D;
                for (int64_t d = 0; d < D; d++) {
                    kt[d] += s * wkj[d];
                    vt[d] += s * wvj[d];
                }
            }
        }
    }
}

/* y[t] = sum_i conv_t[i] * x(p_t - (kernel-1-i) dilation), rows before 0 zero. */
EK_VECTOR_CLONES
static void conv_rows(const float *restrict xs, int64_t xs_start, int64_t T, int64_t D,
                      const float *restrict conv_t, int64_t kernel, int64_t dilation,
                      float *restrict y) {
    for (int64_t t = 0; t < T; t++) {
        float *restrict yt = y + t * D;
        memset(yt, 0, (size_t)D * sizeof(float));
        for (int64_t i = 0; i < kernel; i++) {
            const int64_t row = xs_start + t - (kernel - 1 - i) * dilation;
            if (row < 0) continue;
            const float *restrict xr = xs + row * D;
            const float *restrict w = conv_t + i * D;
            for (int64_t d = 0; d < D; d++) yt[d] += w[d] * xr[d];
        }
    }
}

/* ---------------------------------------------------------------- the Engram term */

static int32_t layer_check(const ek_engram_layer *L) {
    if (!L) return EK_ERR_NULL;
    const ek_hash_layer *hsh = &L->hash;
    if (hsh->max_ngram < 2 || hsh->n_head < 1) return EK_ERR_ARG;
    if (L->hidden < 1 || L->kernel < 1 || L->dilation < 1 || L->n_ovs < 0) return EK_ERR_ARG;
    if (!(L->eps >= 0.0f) || L->eps > 1.0f) return EK_ERR_ARG;
    int64_t cols, mem, wsize;
    if (!mul_ok((int64_t)(hsh->max_ngram - 1), (int64_t)hsh->n_head, &cols) ||
        !mul_ok(cols, L->table.dim, &mem) || mem != L->mem_dim || mem < 1)
        return EK_ERR_ARG;
    if (!mul_ok(L->mem_dim, L->hidden, &wsize) || !mul_ok((int64_t)L->kernel, L->hidden, &wsize))
        return EK_ERR_ARG;
    if (!L->w_k_t || !L->w_v_t || !L->norm_q || !L->norm_k || !L->norm_v || !L->conv_t)
        return EK_ERR_NULL;
    if (L->n_ovs > 0 && !L->ovs) return EK_ERR_NULL;
    return EK_OK;
}

/* Scratch of a forward of T tokens (layer already checked): 0 on overflow. */
static int forward_scratch(const ek_engram_layer *L, int64_t T, int64_t *n_i64, int64_t *n_f32) {
    const int64_t N1 = L->hash.max_ngram - 1;
    int64_t cols, a, b, c;
    if (!mul_ok(N1, L->hash.n_head, &cols)) return 0;
    /* rows + keys [T, cols], mixes [T, N-1] */
    if (!mul_ok(T, cols, &a) || !mul_ok(a, 2, &a) || !mul_ok(T, N1, &b) || !add_ok(a, b, n_i64))
        return 0;
    /* e [T, E], k [T, D], v [T, D] */
    if (!mul_ok(T, L->mem_dim, &a) || !mul_ok(T, L->hidden, &b) || !mul_ok(b, 2, &b) ||
        !add_ok(a, b, &c))
        return 0;
    *n_f32 = c;
    return 1;
}

int32_t ek_engram_scratch(const ek_engram_layer *layer, int64_t n_tokens,
                          int64_t *n_i64, int64_t *n_f32) {
    int32_t st = layer_check(layer);
    if (st != EK_OK) return st;
    if (!n_i64 || !n_f32) return EK_ERR_NULL;
    if (n_tokens < 0) return EK_ERR_ARG;
    return forward_scratch(layer, n_tokens, n_i64, n_f32) ? EK_OK : EK_ERR_CAPACITY;
}

/* Gate, gated value and its norm for n tokens: v [n, D] becomes a v, x rows go to x [n, D]. */
static void gate_rows(const ek_engram_layer *L, const float *h, const float *k, float *v,
                      float *x, int64_t n) {
    const int64_t D = L->hidden;
    const double inv_sqrt_d = ek_rsqrt((double)D);
    for (int64_t t = 0; t < n; t++) {
        const float *ht = h + t * D, *kt = k + t * D;
        float *vt = v + t * D, *xt = x + t * D;
        const float rh = rms_scale(ht, D, L->eps), rk = rms_scale(kt, D, L->eps);
        double dot = 0.0;
        for (int64_t d = 0; d < D; d++) {
            const float q = (ht[d] * rh) * L->norm_q[d];
            const float kk = (kt[d] * rk) * L->norm_k[d];
            dot += (double)(q * kk);
        }
        float g = (float)(dot * inv_sqrt_d);
        /* signed square root: sign(g) * sqrt(max(|g|, 1e-6)); sign(0) = 0 */
        const float ag = g < 0 ? -g : g;
        const double m = ag > 1e-6f ? (double)ag : (double)1e-6f;
        const float root = (float)(m * ek_rsqrt(m));
        g = g > 0 ? root : (g < 0 ? -root : 0.0f);
        const float a = sigmoid_f(g);
        for (int64_t d = 0; d < D; d++) vt[d] = a * vt[d];
        const float rv = rms_scale(vt, D, L->eps);
        for (int64_t d = 0; d < D; d++) xt[d] = (vt[d] * rv) * L->norm_v[d];
    }
}

/* The forward of checked segments tiling T batch rows (scratch sized for T). Each segment's
 * hash, rows and conv history are its own; the projections run once over all T rows. */
static int32_t forward_run(const ek_engram_layer *L, const float *h, int64_t T,
                           const ek_segment *segs, int32_t n_segs, float *y,
                           int64_t *scratch_i64, float *scratch_f32, int64_t *n_hits) {
    const int64_t D = L->hidden, E = L->mem_dim, N1 = L->hash.max_ngram - 1;
    const int64_t K = L->hash.n_head, cols = N1 * K;
    int64_t *rows = scratch_i64, *keys = rows + T * cols, *mix = keys + T * cols;
    float *e = scratch_f32, *k = e + T * E, *v = k + T * D;
    int64_t hits = 0, t0 = 0;

    /* 1-2. Per segment: N-gram rows (only the last N-1 history ids matter), each look-up's
     * exact key (the mix of its order, shared by the order's K heads), and the memory e from
     * the segment's override stack over the table. */
    for (int32_t s = 0; s < n_segs; s++) {
        const ek_segment *sg = &segs[s];
        const int64_t n = sg->n, w0 = sg->ids_start > N1 ? sg->ids_start - N1 : 0;
        int64_t *rs = rows + t0 * cols, *ks = keys + t0 * cols, *ms = mix + t0 * N1, seg_hits = 0;
        int32_t st = ek_hash(&L->hash, sg->ids + w0, sg->ids_start + n - w0, sg->ids_start - w0,
                             rs, n * cols, ms, n * N1);
        if (st != EK_OK) return st;
        for (int64_t t = 0; t < n; t++)
            for (int64_t o = 0; o < N1; o++)
                for (int64_t j = 0; j < K; j++) ks[t * cols + o * K + j] = ms[t * N1 + o];
        st = ek_gather(&L->table, sg->stack.ovs, sg->stack.n_ovs, rs, ks, n * cols,
                       e + t0 * E, n * E, &seg_hits);
        if (st != EK_OK) return st;
        hits += seg_hits;
        t0 += n;
    }

    /* 3. k, v [T, D]: each weight row read once per block of tokens, whatever their sequence. */
    project(e, T, E, D, L->w_k_t, L->w_v_t, k, v);

    /* 4-5. Per segment: gate, x into the sequence's history, causal conv over that history. */
    t0 = 0;
    for (int32_t s = 0; s < n_segs; s++) {
        const ek_segment *sg = &segs[s];
        gate_rows(L, h + t0 * D, k + t0 * D, v + t0 * D, sg->xs + sg->xs_start * D, sg->n);
        conv_rows(sg->xs, sg->xs_start, sg->n, D, L->conv_t, L->kernel, L->dilation, y + t0 * D);
        t0 += sg->n;
    }
    /* y = SiLU(conv) + a v */
    for (int64_t i = 0; i < T * D; i++) {
        const float c = y[i];
        y[i] = (float)((double)c / (1.0 + ek_exp(-(double)c))) + v[i];
    }
    if (n_hits) *n_hits = hits;
    return EK_OK;
}

/* The checks both forwards share: sizes of y and the scratch for T rows. *done is set when
 * there is nothing to compute (T = 0: *n_hits = 0). */
static int32_t forward_sizes(const ek_engram_layer *L, int64_t T, int64_t y_cap,
                             int64_t cap_i64, int64_t cap_f32, int64_t *n_hits, int *done) {
    int64_t need_i64, need_f32, y_need;
    *done = 0;
    if (!forward_scratch(L, T, &need_i64, &need_f32)) return EK_ERR_CAPACITY;
    if (!mul_ok(T, L->hidden, &y_need) || y_cap < y_need) return EK_ERR_CAPACITY;
    if (cap_i64 < need_i64 || cap_f32 < need_f32) return EK_ERR_CAPACITY;
    if (T == 0) {
        if (n_hits) *n_hits = 0;
        *done = 1;
    }
    return EK_OK;
}

/* One segment's ranges: its ids and xs rows exist. */
static int32_t segment_ranges(int64_t n, int64_t n_ids, int64_t ids_start, int64_t xs_rows,
                              int64_t xs_start) {
    int64_t end;
    if (!add_ok(ids_start, n, &end) || n_ids < end) return EK_ERR_SIZE;
    if (!add_ok(xs_start, n, &end) || xs_rows < end) return EK_ERR_SIZE;
    return EK_OK;
}

int32_t ek_engram_forward(const ek_engram_layer *L, const float *h, int64_t T,
                          const int64_t *ids, int64_t n_ids, int64_t ids_start,
                          float *xs, int64_t xs_rows, int64_t xs_start,
                          float *y, int64_t y_cap,
                          int64_t *scratch_i64, int64_t cap_i64,
                          float *scratch_f32, int64_t cap_f32, int64_t *n_hits) {
    int32_t st = layer_check(L);
    if (st != EK_OK) return st;
    if (T < 0 || n_ids < 0 || ids_start < 0 || xs_rows < 0 || xs_start < 0 || y_cap < 0 ||
        cap_i64 < 0 || cap_f32 < 0)
        return EK_ERR_ARG;
    int64_t need_i64, need_f32;
    if (!forward_scratch(L, T, &need_i64, &need_f32)) return EK_ERR_CAPACITY;
    st = segment_ranges(T, n_ids, ids_start, xs_rows, xs_start);
    if (st != EK_OK) return st;
    int done;
    st = forward_sizes(L, T, y_cap, cap_i64, cap_f32, n_hits, &done);
    if (st != EK_OK || done) return st;
    if (!h || !ids || !xs || !y || !scratch_i64 || !scratch_f32) return EK_ERR_NULL;
    const ek_segment seg = {T, ids, n_ids, ids_start, xs, xs_rows, xs_start, {L->ovs, L->n_ovs}};
    return forward_run(L, h, T, &seg, 1, y, scratch_i64, scratch_f32, n_hits);
}

int32_t ek_engram_forward_batch(const ek_engram_layer *L, const float *h, int64_t T,
                                const ek_segment *segs, int32_t n_segs,
                                float *y, int64_t y_cap,
                                int64_t *scratch_i64, int64_t cap_i64,
                                float *scratch_f32, int64_t cap_f32, int64_t *n_hits) {
    int32_t st = layer_check(L);
    if (st != EK_OK) return st;
    if (T < 0 || n_segs < 0 || y_cap < 0 || cap_i64 < 0 || cap_f32 < 0) return EK_ERR_ARG;
    if (n_segs > 0 && !segs) return EK_ERR_NULL;
    int64_t total = 0;
    for (int32_t s = 0; s < n_segs; s++) {
        const ek_segment *sg = &segs[s];
        if (sg->n < 1 || sg->n_ids < 0 || sg->ids_start < 0 || sg->xs_rows < 0 ||
            sg->xs_start < 0 || sg->stack.n_ovs < 0 || !add_ok(total, sg->n, &total))
            return EK_ERR_ARG;
        st = segment_ranges(sg->n, sg->n_ids, sg->ids_start, sg->xs_rows, sg->xs_start);
        if (st != EK_OK) return st;
        if (!sg->ids || !sg->xs || (sg->stack.n_ovs > 0 && !sg->stack.ovs)) return EK_ERR_NULL;
    }
    if (total != T) return EK_ERR_ARG;
    int done;
    st = forward_sizes(L, T, y_cap, cap_i64, cap_f32, n_hits, &done);
    if (st != EK_OK || done) return st;
    if (!h || !y || !scratch_i64 || !scratch_f32) return EK_ERR_NULL;
    return forward_run(L, h, T, segs, n_segs, y, scratch_i64, scratch_f32, n_hits);
}

/* ---------------------------------------------------------------- runtime state */

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int32_t fail(ek_runtime *rt, int32_t status, const char *fmt, ...) {
    if (rt->status == EK_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(rt->error, sizeof rt->error, fmt, ap);
        va_end(ap);
        rt->status = status;
    }
    return status;
}

int32_t ek_runtime_scratch(const ek_runtime *rt, int64_t *n_i64, int64_t *n_f32) {
    if (!rt || !n_i64 || !n_f32) return EK_ERR_NULL;
    if (rt->n_layers < 1 || rt->max_tokens < 1) return EK_ERR_ARG;
    if (!rt->layers) return EK_ERR_NULL;
    int64_t best_i = 0, best_f = 0;
    for (int32_t i = 0; i < rt->n_layers; i++) {
        int64_t a, b, hb;
        int32_t st = layer_check(&rt->layers[i]);
        if (st != EK_OK) return st;
        if (!forward_scratch(&rt->layers[i], rt->max_tokens, &a, &b)) return EK_ERR_CAPACITY;
        /* plus the tensor copy h and the term y, [max_tokens, D] each */
        if (!mul_ok(rt->max_tokens, rt->layers[i].hidden, &hb) || !mul_ok(hb, 2, &hb) ||
            !add_ok(b, hb, &b))
            return EK_ERR_CAPACITY;
        if (a > best_i) best_i = a;
        if (b > best_f) best_f = b;
    }
    *n_i64 = best_i;
    *n_f32 = best_f;
    return EK_OK;
}

static void drop_batch(ek_runtime *rt) {
    for (int32_t i = 0; i < rt->n_batch_seqs; i++) rt->seqs[rt->batch_seqs[i]].n_pending = 0;
    rt->n_batch_seqs = 0;
    rt->n_pending = 0;
    if (rt->fired)
        for (int32_t i = 0; i < rt->n_layers; i++) rt->fired[i] = 0;
}

void ek_runtime_reset(ek_runtime *rt) {
    if (!rt) return;
    rt->n_pending = 0;
    rt->n_batch_seqs = 0;
    rt->status = EK_OK;
    rt->error[0] = '\0';
    if (rt->seqs && rt->n_seqs > 0)
        for (int32_t s = 0; s < rt->n_seqs; s++) {
            rt->seqs[s].n_past = 0;
            rt->seqs[s].n_pending = 0;
            rt->seqs[s].batch_row = 0;
        }
    if (rt->fired)
        for (int32_t i = 0; i < rt->n_layers; i++) rt->fired[i] = 0;
}

/* One sequence's stacks (NULL: the layers' own): every set valid for its layer's table. */
static int32_t stacks_check(const ek_runtime *rt, const ek_stack *stacks) {
    if (!stacks) return EK_OK;
    for (int32_t i = 0; i < rt->n_layers; i++) {
        const ek_stack *sk = &stacks[i];
        if (sk->n_ovs < 0) return EK_ERR_ARG;
        if (sk->n_ovs > 0 && !sk->ovs) return EK_ERR_NULL;
        for (int32_t j = 0; j < sk->n_ovs; j++) {
            const int32_t st = ek_override_check(&sk->ovs[j], rt->layers[i].table.n_rows,
                                                 rt->layers[i].table.dim);
            if (st != EK_OK) return st;
        }
    }
    return EK_OK;
}

int32_t ek_runtime_init(ek_runtime *rt) {
    if (!rt) return EK_ERR_NULL;
    rt->status = EK_OK;
    rt->error[0] = '\0';
    int64_t need_i, need_f, xs_need;
    int32_t st = ek_runtime_scratch(rt, &need_i, &need_f);
    if (st != EK_OK) return fail(rt, st, "invalid Engram layer configuration or batch size");
    const int64_t D = rt->layers[0].hidden;
    for (int32_t i = 0; i < rt->n_layers; i++) {
        if (rt->layers[i].hidden != D)
            return fail(rt, EK_ERR_ARG, "Engram layers of different widths (%lld, %lld)",
                        (long long)D, (long long)rt->layers[i].hidden);
    }
    if (!rt->inject || !rt->canonical_map || !rt->fired)
        return fail(rt, EK_ERR_NULL, "runtime buffer missing");
    if (!rt->ggml.get_name || !rt->ggml.nelements || !rt->ggml.nbytes || !rt->ggml.tensor_get ||
        !rt->ggml.tensor_set || !rt->ggml.is_contiguous)
        return fail(rt, EK_ERR_NULL, "ggml entry point missing");
    for (int32_t i = 0; i < rt->n_layers; i++) {
        if (rt->inject[i] < 0) return fail(rt, EK_ERR_ARG, "negative Engram layer index");
        for (int32_t j = 0; j < i; j++)
            if (rt->inject[j] == rt->inject[i])
                return fail(rt, EK_ERR_ARG, "two Engrams at layer %d", (int)rt->inject[i]);
    }
    if (rt->map_len < 1 || rt->n_ctx < 1) return fail(rt, EK_ERR_ARG, "empty canonical map or context");
    if (!mul_ok(rt->n_ctx, D, &xs_need) || !mul_ok(xs_need, rt->n_layers, &xs_need))
        return fail(rt, EK_ERR_CAPACITY, "context too large");
    if (rt->n_seqs < 1) return fail(rt, EK_ERR_ARG, "no sequences (n_seqs %d)", (int)rt->n_seqs);
    if (!rt->seqs || !rt->batch_seqs || !rt->segs) return fail(rt, EK_ERR_NULL, "sequence buffer missing");
    for (int32_t s = 0; s < rt->n_seqs; s++) {
        if (!rt->seqs[s].ids || !rt->seqs[s].xs)
            return fail(rt, EK_ERR_NULL, "sequence %d: buffer missing", (int)s);
        st = stacks_check(rt, rt->seqs[s].stacks);
        if (st != EK_OK) return fail(rt, st, "sequence %d: invalid override stack", (int)s);
    }
    if (!rt->scratch_i64 || !rt->scratch_f32) return fail(rt, EK_ERR_NULL, "scratch buffer missing");
    if (rt->cap_i64 < need_i || rt->cap_f32 < need_f)
        return fail(rt, EK_ERR_CAPACITY, "scratch too small: need %lld int64 and %lld float",
                    (long long)need_i, (long long)need_f);
    rt->n_calls = 0;
    rt->n_hits = 0;
    ek_runtime_reset(rt);
    return EK_OK;
}

int32_t ek_runtime_truncate(ek_runtime *rt, int32_t seq, int64_t n) {
    if (!rt) return EK_ERR_NULL;
    if (rt->status != EK_OK) return rt->status;
    if (seq < 0 || seq >= rt->n_seqs) return EK_ERR_RANGE;
    if (n < 0 || n > rt->seqs[seq].n_past) return EK_ERR_RANGE;
    drop_batch(rt);
    rt->seqs[seq].n_past = n;
    return EK_OK;
}

int32_t ek_runtime_set_stacks(ek_runtime *rt, int32_t seq, const ek_stack *stacks) {
    if (!rt) return EK_ERR_NULL;
    if (rt->status != EK_OK) return rt->status;
    if (seq < 0 || seq >= rt->n_seqs) return EK_ERR_RANGE;
    if (rt->n_pending > 0) return EK_ERR_ARG;
    const int32_t st = stacks_check(rt, stacks);
    if (st != EK_OK) return st;
    rt->seqs[seq].stacks = stacks;
    return EK_OK;
}

int32_t ek_runtime_begin(ek_runtime *rt, const int32_t *tokens, const int32_t *seq_ids, int64_t n) {
    if (!rt) return EK_ERR_NULL;
    if (rt->status != EK_OK) return rt->status;
    if (n < 1 || n > rt->max_tokens)
        return fail(rt, EK_ERR_ARG, "batch of %lld tokens (must be 1..%lld)", (long long)n,
                    (long long)rt->max_tokens);
    if (!tokens) return fail(rt, EK_ERR_NULL, "no tokens");
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || (int64_t)tokens[i] >= rt->map_len)
            return fail(rt, EK_ERR_RANGE, "token id %d outside the canonical map [0, %lld)",
                        (int)tokens[i], (long long)rt->map_len);
    /* The runs of sequences: each sequence one run, its tokens fitting its context. */
    drop_batch(rt);
    for (int64_t i = 0; i < n; i++) {
        const int32_t s = seq_ids ? seq_ids[i] : 0;
        if (s < 0 || s >= rt->n_seqs) {
            drop_batch(rt);
            return fail(rt, EK_ERR_RANGE, "batch row %lld: sequence %d outside [0, %d)", (long long)i,
                        (int)s, (int)rt->n_seqs);
        }
        ek_seq *sq = &rt->seqs[s];
        if (i == 0 || s != rt->batch_seqs[rt->n_batch_seqs - 1]) {
            if (sq->n_pending > 0) {
                drop_batch(rt);
                return fail(rt, EK_ERR_ARG, "batch row %lld: sequence %d has two runs of tokens in one "
                            "batch", (long long)i, (int)s);
            }
            sq->batch_row = i;
            rt->batch_seqs[rt->n_batch_seqs++] = s;
        }
        sq->n_pending++;
    }
    for (int32_t b = 0; b < rt->n_batch_seqs; b++) {
        const ek_seq *sq = &rt->seqs[rt->batch_seqs[b]];
        if (sq->n_pending > rt->n_ctx - sq->n_past) {
            const int32_t s = rt->batch_seqs[b];
            const long long past = (long long)sq->n_past, add = (long long)sq->n_pending;
            drop_batch(rt);
            return fail(rt, EK_ERR_CAPACITY, "context full: sequence %d: %lld + %lld tokens exceed %lld",
                        (int)s, past, add, (long long)rt->n_ctx);
        }
    }
    for (int32_t b = 0; b < rt->n_batch_seqs; b++) {
        ek_seq *sq = &rt->seqs[rt->batch_seqs[b]];
        for (int64_t i = 0; i < sq->n_pending; i++)
            sq->ids[sq->n_past + i] = rt->canonical_map[tokens[sq->batch_row + i]];
    }
    rt->n_pending = n;
    return EK_OK;
}

static const char *node_hint(const ek_runtime *rt, int32_t layer, char *buf, size_t cap) {
    if (rt->inject[layer] == 0) snprintf(buf, cap, "embd");
    else snprintf(buf, cap, "l_out-%d", (int)(rt->inject[layer] - 1));
    return buf;
}

int32_t ek_runtime_commit(ek_runtime *rt) {
    if (!rt) return EK_ERR_NULL;
    if (rt->status != EK_OK) return rt->status;
    if (rt->n_pending < 1) return fail(rt, EK_ERR_ARG, "commit without a batch");
    if (rt->enabled) {
        for (int32_t i = 0; i < rt->n_layers; i++) {
            if (rt->fired[i] != 1) {
                char node[32];
                return fail(rt, EK_ERR_ARG,
                            "the Engram at layer %d ran %d times for one batch: llama.cpp's graph "
                            "has no node %s (the pinned llama-cpp-python changed?)",
                            (int)rt->inject[i], (int)rt->fired[i], node_hint(rt, i, node, sizeof node));
            }
        }
    }
    for (int32_t b = 0; b < rt->n_batch_seqs; b++) {
        ek_seq *sq = &rt->seqs[rt->batch_seqs[b]];
        sq->n_past += sq->n_pending;
    }
    drop_batch(rt);
    return EK_OK;
}

void ek_runtime_abort(ek_runtime *rt) {
    if (rt && rt->seqs) drop_batch(rt);
}

/* ---------------------------------------------------------------- the eval callback */

/* Decoder layer whose input `name` is: l_out-N -> N + 1, embd -> 0; -1 for other nodes. */
static int32_t node_layer(const char *name) {
    if (!name) return -1;
    if (name[0] == 'l' && name[1] == '_' && name[2] == 'o' && name[3] == 'u' && name[4] == 't' &&
        name[5] == '-') {
        int32_t n = 0;
        const char *p = name + 6;
        if (*p < '0' || *p > '9') return -1;
        for (; *p >= '0' && *p <= '9'; p++) {
            n = n * 10 + (int32_t)(*p - '0');
            if (n > 1000000) return -1;
        }
        return *p == '\0' ? n + 1 : -1;
    }
    if (name[0] == 'e' && strcmp(name, "embd") == 0) return 0;
    return -1;
}

static int32_t runtime_layer(const ek_runtime *rt, const char *name) {
    const int32_t L = node_layer(name);
    if (L < 0) return -1;
    for (int32_t i = 0; i < rt->n_layers; i++)
        if (rt->inject[i] == L) return i;
    return -1;
}

bool ek_eval_callback(void *tensor, bool ask, void *user_data) {
    ek_runtime *rt = (ek_runtime *)user_data;
    if (!rt || !tensor) return false;
    if (ask) {
        if (rt->status != EK_OK || !rt->enabled) return false;
        return runtime_layer(rt, rt->ggml.get_name(tensor)) >= 0;
    }
    if (rt->status != EK_OK) return false;
    const int32_t li = runtime_layer(rt, rt->ggml.get_name(tensor));
    if (li < 0) return true;                 /* not ours: nothing to do */
    const ek_engram_layer *L = &rt->layers[li];
    const int64_t T = rt->n_pending, D = L->hidden;
    char node[32];
    node_hint(rt, li, node, sizeof node);
    if (T < 1) {
        fail(rt, EK_ERR_ARG, "%s evaluated outside a batch (llama_decode without ek_runtime_begin)", node);
        return false;
    }
    if (rt->fired[li] != 0) {
        fail(rt, EK_ERR_ARG, "%s evaluated twice for one batch: the batch was split into several "
                             "ubatches (n_ubatch must be >= the tokens per llama_decode)", node);
        return false;
    }
    const int64_t ne = rt->ggml.nelements(tensor);
    const size_t nb = rt->ggml.nbytes(tensor);
    if (ne != T * D || nb != (size_t)ne * sizeof(float) || !rt->ggml.is_contiguous(tensor)) {
        fail(rt, EK_ERR_SIZE, "%s holds %lld values in %zu bytes%s; expected %lld x %lld contiguous "
                              "float32 (n_embd x batch tokens)", node, (long long)ne, nb,
             rt->ggml.is_contiguous(tensor) ? "" : ", not contiguous", (long long)D, (long long)T);
        return false;
    }
    int64_t fi, ff;
    forward_scratch(L, T, &fi, &ff);          /* fits: checked for max_tokens at init */
    float *hbuf = rt->scratch_f32 + ff, *ybuf = hbuf + T * D;
    rt->ggml.tensor_get(tensor, hbuf, 0, nb);
    /* One segment per sequence of the batch: its ids, its x history in this layer, its stack. */
    for (int32_t b = 0; b < rt->n_batch_seqs; b++) {
        const ek_seq *sq = &rt->seqs[rt->batch_seqs[b]];
        const ek_stack own = {L->ovs, L->n_ovs};
        const ek_segment seg = {sq->n_pending, sq->ids, rt->n_ctx, sq->n_past,
                                sq->xs + (int64_t)li * rt->n_ctx * D, rt->n_ctx, sq->n_past,
                                sq->stacks ? sq->stacks[li] : own};
        rt->segs[b] = seg;
    }
    int64_t hits = 0;
    const int32_t st = ek_engram_forward_batch(L, hbuf, T, rt->segs, rt->n_batch_seqs, ybuf, T * D,
                                               rt->scratch_i64, rt->cap_i64, rt->scratch_f32, ff, &hits);
    if (st != EK_OK) {
        fail(rt, st, "Engram forward at %s failed (ek_status %d)", node, (int)st);
        return false;
    }
    for (int64_t i = 0; i < T * D; i++) hbuf[i] += ybuf[i];
    rt->ggml.tensor_set(tensor, hbuf, 0, nb);
    rt->fired[li]++;
    rt->n_calls++;
    rt->n_hits += hits;
    return true;
}
