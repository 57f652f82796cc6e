/* test_runtime.c — C-level tests of the Engram runtime (native/engram_runtime.c).
 *
 *   1. ek_engram_forward on a tiny random layer (N = 3, K = 2, d_head = 4, D = 8, a 4-tap conv
 *      of dilation 3, one override set with keyed and key -1 entries on bigram and trigram rows) against a plain-loop
 *      double-precision reference written here (hash, gather, W_K/W_V, RMSNorm, signed-sqrt
 *      gate, causal dilated depthwise conv, SiLU, residual); chunked calls, and an indexed
 *      override set, give bit-identical results.
 *   2. The ek_runtime state machine through ek_eval_callback: decoding in one batch, token by
 *      token and in mixed chunks gives bit-identical outputs (matching the reference); abort
 *      leaves the committed state as before begin; truncate(n) then re-decoding reproduces
 *      the first outputs; reset, context full, enabled = 0.
 *   3. Every kind of bad argument returns its documented status code and writes nothing.
 *   4. ek_eval_callback needs no llama.cpp: it reaches tensors only through the function
 *      pointers in ek_runtime.ggml, so a fake tensor struct and fake entry points stand in for
 *      ggml here (graph node names as llama.cpp gives them: "embd", "l_out-N", ...). Its
 *      argument checking (NULL tensor / user data, foreign nodes, bad names, wrong tensor size,
 *      non-contiguous tensor, outside a batch, twice per batch) is tested in full.
 *   5. Several sequences: ek_engram_forward_batch equals ek_engram_forward of each segment alone
 *      (each with its own override stack) bit for bit, and checks every segment; a runtime of 3
 *      sequences (3 users: the layers' own override sets, none, a two-set stack) decodes them
 *      in random interleaved batches with roll-backs, and every user's outputs equal its outputs
 *      decoded alone bit for bit; begin's run/range/context checks, truncate and
 *      ek_runtime_set_stacks (refusals change nothing), init's stack checks.
 *
 * Buffers whose size is part of the contract are malloc'd at exactly that size, so
 * AddressSanitizer reports any read or write past them. Exits nonzero if any check fails.
 * Built and run by ctest, under AddressSanitizer + UBSan with -DENGRAM_SANITIZE=ON
 * (also run by tests/test_c_sanitizers.py).
 */
#include "engram.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

CHECK_STATE;

/* A status check that prints both codes on failure. */
#define CHECK_ST(expr, want)                                                                 \
    do {                                                                                     \
        const int32_t got_ = (expr);                                                         \
        n_checks++;                                                                          \
        if (got_ != (int32_t)(want)) {                                                       \
            n_failed++;                                                                      \
            fprintf(stderr, "%s:%d: %s returned %d, want %d\n", __FILE__, __LINE__, #expr,   \
                    (int)got_, (int)(want));                                                 \
        }                                                                                    \
    } while (0)

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ---------------------------------------------------------------- deterministic randomness */

static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rng_state = 12345;

static double rng_unit(void) { /* [0, 1) */
    return (double)(mix64(rng_state++) >> 11) * 0x1p-53;
}

static float rng_float(double lo, double hi) {
    return (float)(lo + (hi - lo) * rng_unit());
}

static int64_t rng_int(int64_t n) { /* [0, n) */
    return (int64_t)(mix64(rng_state++) % (uint64_t)n);
}

/* ---------------------------------------------------------------- the tiny configuration */

enum {
    N_GRAM = 3,                        /* max_ngram N */
    N_HEAD = 2,                        /* heads per order K */
    D_HEAD = 4,                        /* table row width */
    COLS = (N_GRAM - 1) * N_HEAD,      /* look-ups per position */
    MEM = COLS * D_HEAD,               /* E */
    HID = 8,                           /* D */
    MAX_KERNEL = 4,
    VOCAB = 23,                        /* canonical vocabulary */
    PAD = 5,
    SEQ = 20,                          /* test sequence length (> EK_TOKEN_BLOCK = 8) */
    N_CTX = 24,                        /* runtime context */
    MAX_TOK = 8,                       /* runtime batch limit */
    MAP_LEN = 40,                      /* raw vocabulary */
    N_LAYERS = 2,
    N_SEQS = 3,                        /* runtime sequences */
    N_OV = 5                           /* override entries of layer A */
};

#define EPS 1e-5f
#define GATE_EPS 1e-6f
#define NO_KEY 99991 /* a key no look-up of the test carries (mixes stay < 2^11) */

/* One Engram layer: its parameters in torch layout (for the reference) and transposed (for the
 * kernel), and the ek_engram_layer view of them. Lives in static storage (the view points into
 * it). */
typedef struct {
    int64_t mult[N_GRAM], primes[COLS], offsets[COLS], n_rows;
    float *table;                       /* [n_rows, D_HEAD], malloc'd exactly */
    float wk[HID][MEM], wv[HID][MEM];   /* torch Linear weights [D, E] */
    float wk_t[MEM * HID], wv_t[MEM * HID];
    float nq[HID], nk[HID], nv[HID];
    float conv[HID][MAX_KERNEL];        /* torch Conv1d weight [D, 1, kernel] */
    float conv_t[MAX_KERNEL * HID];
    int32_t kernel, dilation;
    int has_ov;
    int64_t ov_rows[N_OV], ov_keys[N_OV];
    float ov_values[N_OV * D_HEAD];
    ek_override ov;
    ek_engram_layer L;
} model_layer;

static model_layer layer_a, layer_b;

static void model_init(model_layer *m, const int64_t mult[N_GRAM], const int64_t primes[COLS],
                       int32_t kernel) {
    memset(m, 0, sizeof *m);
    int64_t off = 0;
    for (int i = 0; i < N_GRAM; i++) m->mult[i] = mult[i];
    for (int c = 0; c < COLS; c++) {
        m->primes[c] = primes[c];
        m->offsets[c] = off;
        off += primes[c];
    }
    m->n_rows = off;
    m->table = xmalloc((size_t)(m->n_rows * D_HEAD) * sizeof(float));
    for (int64_t r = 0; r < m->n_rows; r++)
        for (int i = 0; i < D_HEAD; i++)  /* every 4th row zero: the projection skips it */
            m->table[r * D_HEAD + i] = r % 4 == 3 ? 0.0f : rng_float(-1.0, 1.0);
    for (int d = 0; d < HID; d++)
        for (int j = 0; j < MEM; j++) {
            m->wk[d][j] = rng_float(-0.5, 0.5);
            m->wv[d][j] = rng_float(-0.5, 0.5);
            m->wk_t[j * HID + d] = m->wk[d][j];
            m->wv_t[j * HID + d] = m->wv[d][j];
        }
    for (int d = 0; d < HID; d++) {
        m->nq[d] = rng_float(0.5, 1.5);
        m->nk[d] = rng_float(0.5, 1.5);
        m->nv[d] = rng_float(0.5, 1.5);
    }
    m->kernel = kernel;
    m->dilation = N_GRAM;
    for (int d = 0; d < HID; d++)
        for (int i = 0; i < kernel; i++) {
            m->conv[d][i] = rng_float(-0.8, 0.8);
            m->conv_t[i * HID + d] = m->conv[d][i];
        }

    ek_engram_layer *L = &m->L;
    L->hash.max_ngram = N_GRAM;
    L->hash.n_head = N_HEAD;
    L->hash.vocab = VOCAB;
    L->hash.pad_id = PAD;
    L->hash.multipliers = m->mult;
    L->hash.primes = m->primes;
    L->hash.offsets = m->offsets;
    L->table.data = (const uint8_t *)m->table;
    L->table.nbytes = m->n_rows * D_HEAD * (int64_t)sizeof(float);
    L->table.qtype = EK_F32;
    L->table.n_rows = m->n_rows;
    L->table.dim = D_HEAD;
    L->ovs = NULL;
    L->n_ovs = 0;
    L->hidden = HID;
    L->mem_dim = MEM;
    L->w_k_t = m->wk_t;
    L->w_v_t = m->wv_t;
    L->norm_q = m->nq;
    L->norm_k = m->nk;
    L->norm_v = m->nv;
    L->conv_t = m->conv_t;
    L->kernel = kernel;
    L->dilation = N_GRAM;
    L->eps = EPS;
}

/* The mix of order n (2..N) at position t, computed afresh (not rolling), pad before 0. */
static int64_t ref_mix(const model_layer *m, const int64_t *ids, int64_t t, int order) {
    uint64_t mix = 0;
    for (int k = 0; k < order; k++) {
        const int64_t tok = t - k >= 0 ? ids[t - k] : PAD;
        mix ^= (uint64_t)tok * (uint64_t)m->mult[k];
    }
    return (int64_t)mix; /* small and positive here */
}

static int64_t ref_row(const model_layer *m, int64_t mix, int col) {
    return mix % m->primes[col] + m->offsets[col];
}

/* Layer A's override set, built from the addressing of `ids` so that it fires (rows of
 * column c lie in [offsets[c], offsets[c] + primes[c]), so r1 < r3 < r2):
 *   (r1, mix of position 4's bigram)  -> where that bigram recurs (column 0),
 *   (r1, NO_KEY)                      -> never: its row is looked up, but no key matches,
 *   (r3, -1)                          -> every look-up of r3 (position 9's bigram, column 1),
 *   (r2, -1), (r2, mix of position 7's trigram) -> column 3: the keyed entry wins at position
 *                                        7's trigram, the key -1 entry serves other look-ups. */
static void model_add_overrides(model_layer *m, const int64_t *ids) {
    const int64_t mix1 = ref_mix(m, ids, 4, 2), mix2 = ref_mix(m, ids, 7, 3);
    const int64_t r1 = ref_row(m, mix1, 0), r2 = ref_row(m, mix2, 3);
    const int64_t r3 = ref_row(m, ref_mix(m, ids, 9, 2), 1);
    const int64_t rows[N_OV] = {r1, r1, r3, r2, r2}, keys[N_OV] = {mix1, NO_KEY, -1, -1, mix2};
    for (int i = 0; i < N_OV; i++) {
        m->ov_rows[i] = rows[i];
        m->ov_keys[i] = keys[i];
    }
    for (int i = 0; i < N_OV * D_HEAD; i++) m->ov_values[i] = rng_float(-3.0, 3.0);
    memset(&m->ov, 0, sizeof m->ov);
    m->ov.rows = m->ov_rows;
    m->ov.keys = m->ov_keys;
    m->ov.values = (const uint8_t *)m->ov_values;
    m->ov.nbytes = (int64_t)sizeof m->ov_values;
    m->ov.qtype = EK_F32;
    m->ov.n = N_OV;
    m->has_ov = 1;
    m->L.ovs = &m->ov;
    m->L.n_ovs = 1;
    CHECK_ST(ek_override_check(&m->ov, m->n_rows, D_HEAD), EK_OK); /* sorted as required */
}

/* The row a look-up reads, by the documented precedence (one set). */
static const float *ref_lookup(const model_layer *m, int64_t row, int64_t key, int64_t *hits) {
    if (m->has_ov) {
        for (int i = 0; i < N_OV; i++)
            if (m->ov_rows[i] == row && m->ov_keys[i] == key) {
                ++*hits;
                return m->ov_values + i * D_HEAD;
            }
        for (int i = 0; i < N_OV; i++)
            if (m->ov_rows[i] == row && m->ov_keys[i] == -1) {
                ++*hits;
                return m->ov_values + i * D_HEAD;
            }
    }
    return m->table + row * D_HEAD;
}

static double ref_rms_scale(const double *x, int n) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    return 1.0 / sqrt(ss / n + (double)EPS);
}

/* EngramLayer.forward of the n positions 0..n-1 (conv history zero), in double:
 * y [n, HID], x [n, HID] (the normalised gated value), *hits look-ups served by an override. */
static void ref_forward(const model_layer *m, const int64_t *ids, int64_t n, const float *h,
                        double *y, double *x, int64_t *hits) {
    double *av = xmalloc((size_t)(n * HID) * sizeof(double));
    *hits = 0;
    for (int64_t t = 0; t < n; t++) {
        double e[MEM], k[HID], v[HID], hq[HID];
        for (int order = 2; order <= N_GRAM; order++) {
            const int64_t mix = ref_mix(m, ids, t, order);
            for (int j = 0; j < N_HEAD; j++) {
                const int col = (order - 2) * N_HEAD + j;
                const float *row = ref_lookup(m, ref_row(m, mix, col), mix, hits);
                for (int i = 0; i < D_HEAD; i++) e[col * D_HEAD + i] = row[i];
            }
        }
        for (int d = 0; d < HID; d++) {
            k[d] = v[d] = 0.0;
            for (int j = 0; j < MEM; j++) {
                k[d] += (double)m->wk[d][j] * e[j];
                v[d] += (double)m->wv[d][j] * e[j];
            }
            hq[d] = h[t * HID + d];
        }
        const double rq = ref_rms_scale(hq, HID), rk = ref_rms_scale(k, HID);
        double g = 0.0;
        for (int d = 0; d < HID; d++) g += (hq[d] * rq * m->nq[d]) * (k[d] * rk * m->nk[d]);
        g /= sqrt((double)HID);
        const double root = sqrt(fmax(fabs(g), (double)GATE_EPS));
        g = g > 0 ? root : (g < 0 ? -root : 0.0);
        const double a = 1.0 / (1.0 + exp(-g));
        double *avt = av + t * HID;
        for (int d = 0; d < HID; d++) avt[d] = a * v[d];
        const double rv = ref_rms_scale(avt, HID);
        for (int d = 0; d < HID; d++) x[t * HID + d] = avt[d] * rv * m->nv[d];
    }
    for (int64_t t = 0; t < n; t++)
        for (int d = 0; d < HID; d++) {
            double c = 0.0;
            for (int i = 0; i < m->kernel; i++) {
                const int64_t p = t - (int64_t)(m->kernel - 1 - i) * m->dilation;
                if (p >= 0) c += (double)m->conv[d][i] * x[p * HID + d];
            }
            y[t * HID + d] = c / (1.0 + exp(-c)) + av[t * HID + d];
        }
    free(av);
}

static double max_err;

static int close_to(double got, double want) {
    const double err = fabs(got - want);
    if (err > max_err) max_err = err;
    return err <= 1e-5 * (1.0 + fabs(want));
}

/* ---------------------------------------------------------------- shared test data */

static int64_t seq_ids[SEQ];      /* canonical ids of test 1 */
static float seq_h[SEQ * HID];    /* hidden states of test 1 */

/* One ek_engram_forward over positions [start, start + T) of seq_ids/seq_h, with every buffer
 * malloc'd at exactly its documented size. xs_hist [start, HID] the conv history, xs_out
 * [start + T, HID] receives history + new rows, y_out [T, HID]. */
static int32_t forward_exact(const ek_engram_layer *L, int64_t start, int64_t T,
                             const float *xs_hist, float *xs_out, float *y_out, int64_t *hits) {
    int64_t ni = -1, nf = -1;
    int32_t st = ek_engram_scratch(L, T, &ni, &nf);
    if (st != EK_OK) return st;
    int64_t *ids = xmalloc((size_t)(start + T) * sizeof(int64_t));
    float *h = xmalloc((size_t)(T * HID) * sizeof(float));
    float *xs = xmalloc((size_t)((start + T) * HID) * sizeof(float));
    float *y = xmalloc((size_t)(T * HID) * sizeof(float));
    int64_t *si = xmalloc((size_t)ni * sizeof(int64_t));
    float *sf = xmalloc((size_t)nf * sizeof(float));
    memcpy(ids, seq_ids, (size_t)(start + T) * sizeof(int64_t));
    memcpy(h, seq_h + start * HID, (size_t)(T * HID) * sizeof(float));
    if (start > 0) memcpy(xs, xs_hist, (size_t)(start * HID) * sizeof(float));
    st = ek_engram_forward(L, h, T, ids, start + T, start, xs, start + T, start, y, T * HID,
                           si, ni, sf, nf, hits);
    memcpy(xs_out, xs, (size_t)((start + T) * HID) * sizeof(float));
    memcpy(y_out, y, (size_t)(T * HID) * sizeof(float));
    free(ids); free(h); free(xs); free(y); free(si); free(sf);
    return st;
}

/* ================================================================ 1. the layer forward */

static void test_forward_matches_reference(void) {
    static double y_ref[SEQ * HID], x_ref[SEQ * HID];
    static float y[SEQ * HID], xs[SEQ * HID], y2[SEQ * HID], xs2[SEQ * HID];
    const model_layer *layers[2] = {&layer_a, &layer_b};

    for (int which = 0; which < 2; which++) {
        const model_layer *m = layers[which];
        int64_t ref_hits = -1, hits = -1;
        ref_forward(m, seq_ids, SEQ, seq_h, y_ref, x_ref, &ref_hits);
        if (m->has_ov) CHECK(ref_hits >= 3); /* keyed entries and key -1 entries fire */
        else CHECK_EQ_I64(ref_hits, 0);

        max_err = 0.0;
        CHECK_ST(forward_exact(&m->L, 0, SEQ, NULL, xs, y, &hits), EK_OK);
        int ok_y = 1, ok_x = 1;
        for (int i = 0; i < SEQ * HID; i++) {
            ok_y &= close_to(y[i], y_ref[i]);
            ok_x &= close_to(xs[i], x_ref[i]);
        }
        CHECK(ok_y);
        CHECK(ok_x);
        CHECK_EQ_I64(hits, ref_hits);
        printf("forward layer %c vs reference: max |err| %.3g, %lld override hits\n", 'A' + which,
               max_err, (long long)hits);

        /* Chunked (the way the runtime decodes): same bits. Chunks cross EK_TOKEN_BLOCK and
         * start with fewer history positions than the conv and the hash reach. */
        const int64_t chunks[] = {1, 1, 5, 9, 1, 3};
        int64_t start = 0, total_hits = 0;
        for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
            int64_t h1 = -1;
            CHECK_ST(forward_exact(&m->L, start, chunks[c], xs2, xs2, y2 + start * HID, &h1), EK_OK);
            total_hits += h1;
            start += chunks[c];
        }
        CHECK_EQ_I64(start, SEQ);
        CHECK(memcmp(y2, y, sizeof y) == 0);
        CHECK(memcmp(xs2, xs, sizeof xs) == 0);
        CHECK_EQ_I64(total_hits, hits);
    }

    /* The same override set with a row index: same bits. n_hits may be NULL. */
    int64_t slots[16];
    ek_override indexed = layer_a.ov;
    CHECK_ST(ek_override_index(&indexed, slots, 16), EK_OK);
    indexed.index = slots;
    indexed.index_cap = 16;
    CHECK_ST(ek_override_check(&indexed, layer_a.n_rows, D_HEAD), EK_OK);
    ek_engram_layer L = layer_a.L;
    L.ovs = &indexed;
    CHECK_ST(forward_exact(&layer_a.L, 0, SEQ, NULL, xs, y, NULL), EK_OK);
    CHECK_ST(forward_exact(&L, 0, SEQ, NULL, xs2, y2, NULL), EK_OK);
    CHECK(memcmp(y2, y, sizeof y) == 0);
    CHECK(memcmp(xs2, xs, sizeof xs) == 0);

    /* A zero conv (the layer's initial state) gives y = SiLU(0) + a v = a v exactly. */
    static double av_ref[SEQ * HID];
    L = layer_b.L;
    const float zero_conv[MAX_KERNEL * HID] = {0};
    L.conv_t = zero_conv;
    model_layer *zb = xmalloc(sizeof *zb);
    *zb = layer_b;
    memset(zb->conv, 0, sizeof zb->conv);
    int64_t rh = 0;
    ref_forward(zb, seq_ids, SEQ, seq_h, av_ref, x_ref, &rh);
    free(zb);
    CHECK_ST(forward_exact(&L, 0, SEQ, NULL, xs, y, NULL), EK_OK);
    int ok = 1;
    for (int i = 0; i < SEQ * HID; i++) ok &= close_to(y[i], av_ref[i]);
    CHECK(ok);
}

/* Scratch sizes are exact requirements: one element less is refused. */
static void test_forward_scratch_contract(void) {
    const ek_engram_layer *L = &layer_a.L;
    int64_t ni = -1, nf = -1;
    CHECK_ST(ek_engram_scratch(L, 5, &ni, &nf), EK_OK);
    CHECK(ni > 0 && nf > 0);
    int64_t ni0 = -1, nf0 = -1;
    CHECK_ST(ek_engram_scratch(L, 0, &ni0, &nf0), EK_OK);
    CHECK_EQ_I64(ni0, 0);
    CHECK_EQ_I64(nf0, 0);

    int64_t *si = xmalloc((size_t)ni * sizeof(int64_t));
    float *sf = xmalloc((size_t)nf * sizeof(float));
    float xs[5 * HID] = {0}, y[5 * HID];
    CHECK_ST(ek_engram_forward(L, seq_h, 5, seq_ids, 5, 0, xs, 5, 0, y, 5 * HID, si, ni - 1, sf, nf,
                               NULL), EK_ERR_CAPACITY);
    CHECK_ST(ek_engram_forward(L, seq_h, 5, seq_ids, 5, 0, xs, 5, 0, y, 5 * HID, si, ni, sf, nf - 1,
                               NULL), EK_ERR_CAPACITY);
    CHECK_ST(ek_engram_forward(L, seq_h, 5, seq_ids, 5, 0, xs, 5, 0, y, 5 * HID, si, ni, sf, nf,
                               NULL), EK_OK);
    free(si);
    free(sf);
}

/* ================================================================ 3a. forward's bad arguments */

typedef struct {
    const ek_engram_layer *L;
    const float *h;
    int64_t T;
    const int64_t *ids;
    int64_t n_ids, ids_start;
    float *xs;
    int64_t xs_rows, xs_start;
    float *y;
    int64_t y_cap;
    int64_t *si;
    int64_t ci;
    float *sf;
    int64_t cf;
    int64_t *hits;
} fwd_args;

static int32_t fwd(fwd_args a) {
    return ek_engram_forward(a.L, a.h, a.T, a.ids, a.n_ids, a.ids_start, a.xs, a.xs_rows,
                             a.xs_start, a.y, a.y_cap, a.si, a.ci, a.sf, a.cf, a.hits);
}

#define FWD_EXPECT(field, value, want)      \
    do {                                    \
        fwd_args b_ = good;                 \
        b_.field = value;                   \
        CHECK_ST(fwd(b_), want);            \
    } while (0)

/* Applies `stmt` to a copy `bad` of the good layer, then expects `want` from forward (and,
 * for LAYER_EXPECT_BOTH, from ek_engram_scratch, which checks the same layer fields). */
#define LAYER_EXPECT(stmt, want)                                    \
    do {                                                            \
        ek_engram_layer bad = layer_a.L;                            \
        stmt;                                                       \
        fwd_args b_ = good;                                         \
        b_.L = &bad;                                                \
        CHECK_ST(fwd(b_), want);                                    \
    } while (0)

#define LAYER_EXPECT_BOTH(stmt, want)                               \
    do {                                                            \
        LAYER_EXPECT(stmt, want);                                   \
        ek_engram_layer bad = layer_a.L;                            \
        int64_t ni_, nf_;                                           \
        stmt;                                                       \
        CHECK_ST(ek_engram_scratch(&bad, 1, &ni_, &nf_), want);     \
    } while (0)

static void test_forward_errors(void) {
    enum { T = 6, HIST = 3 };
    int64_t ni, nf;
    CHECK_ST(ek_engram_scratch(&layer_a.L, T, &ni, &nf), EK_OK);
    int64_t *si = xmalloc((size_t)ni * sizeof(int64_t));
    float *sf = xmalloc((size_t)nf * sizeof(float));
    int64_t ids[HIST + T];
    memcpy(ids, seq_ids, sizeof ids);
    float xs[(HIST + T) * HID], y[T * HID];
    for (int i = 0; i < (HIST + T) * HID; i++) xs[i] = -7.0f;
    for (int i = 0; i < T * HID; i++) y[i] = -7.0f;
    int64_t hits = -9;
    const fwd_args good = {&layer_a.L, seq_h, T, ids, HIST + T, HIST, xs, HIST + T, HIST,
                           y, T * HID, si, ni, sf, nf, &hits};

    /* the layer */
    FWD_EXPECT(L, NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.hash.max_ngram = 1, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.hash.n_head = 0, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.hidden = 0, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.hidden = -8, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.kernel = 0, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.dilation = 0, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.n_ovs = -1, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.eps = -1e-6f, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.eps = 2.0f, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.eps = (float)NAN, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.mem_dim = MEM - 1, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.mem_dim = 0; bad.table.dim = 0, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.table.dim = -D_HEAD, EK_ERR_ARG);
    LAYER_EXPECT_BOTH(bad.hidden = INT64_MAX / 4, EK_ERR_ARG);        /* E x D overflows */
    LAYER_EXPECT_BOTH(bad.w_k_t = NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.w_v_t = NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.norm_q = NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.norm_k = NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.norm_v = NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.conv_t = NULL, EK_ERR_NULL);
    LAYER_EXPECT_BOTH(bad.ovs = NULL, EK_ERR_NULL);                     /* n_ovs = 1 */
    /* hash constants and tables are checked by ek_hash / ek_gather inside the forward */
    LAYER_EXPECT(bad.hash.vocab = 0, EK_ERR_ARG);
    LAYER_EXPECT(bad.hash.pad_id = VOCAB, EK_ERR_ARG);
    LAYER_EXPECT(bad.hash.pad_id = -1, EK_ERR_ARG);
    LAYER_EXPECT(bad.hash.multipliers = NULL, EK_ERR_NULL);
    LAYER_EXPECT(bad.hash.primes = NULL, EK_ERR_NULL);
    LAYER_EXPECT(bad.hash.offsets = NULL, EK_ERR_NULL);
    const int64_t zero_prime[COLS] = {5, 0, 11, 13};
    LAYER_EXPECT(bad.hash.primes = zero_prime, EK_ERR_ARG);
    LAYER_EXPECT(bad.table.qtype = 3, EK_ERR_QTYPE);                   /* Q4_1: unsupported */
    LAYER_EXPECT(bad.table.qtype = 99, EK_ERR_QTYPE);
    LAYER_EXPECT(bad.table.qtype = EK_Q8_0, EK_ERR_QTYPE);             /* d_head 4 < block 32 */
    LAYER_EXPECT(bad.table.n_rows = layer_a.n_rows - 14, EK_ERR_RANGE);/* rows past the table */
    LAYER_EXPECT(bad.table.n_rows = -1, EK_ERR_ARG);
    LAYER_EXPECT(bad.table.nbytes -= 1, EK_ERR_SIZE);
    LAYER_EXPECT(bad.table.data = NULL, EK_ERR_NULL);
    ek_override bad_ov = layer_a.ov;
    bad_ov.qtype = EK_BF16;
    LAYER_EXPECT(bad.ovs = &bad_ov, EK_ERR_QTYPE);
    bad_ov = layer_a.ov;
    bad_ov.nbytes -= 4;
    LAYER_EXPECT(bad.ovs = &bad_ov, EK_ERR_SIZE);

    /* ids: canonical ids outside [0, vocab) in the hashed window */
    int64_t bad_ids[HIST + T];
    memcpy(bad_ids, ids, sizeof ids);
    bad_ids[HIST + 2] = VOCAB;
    FWD_EXPECT(ids, bad_ids, EK_ERR_RANGE);
    bad_ids[HIST + 2] = -1;
    FWD_EXPECT(ids, bad_ids, EK_ERR_RANGE);
    memcpy(bad_ids, ids, sizeof ids);
    bad_ids[HIST - 1] = VOCAB + 100;            /* history the hash reads */
    FWD_EXPECT(ids, bad_ids, EK_ERR_RANGE);

    /* counts and capacities */
    FWD_EXPECT(T, -1, EK_ERR_ARG);
    FWD_EXPECT(n_ids, -1, EK_ERR_ARG);
    FWD_EXPECT(ids_start, -1, EK_ERR_ARG);
    FWD_EXPECT(xs_rows, -1, EK_ERR_ARG);
    FWD_EXPECT(xs_start, -1, EK_ERR_ARG);
    FWD_EXPECT(y_cap, -1, EK_ERR_ARG);
    FWD_EXPECT(ci, -1, EK_ERR_ARG);
    FWD_EXPECT(cf, -1, EK_ERR_ARG);
    FWD_EXPECT(n_ids, HIST + T - 1, EK_ERR_SIZE);
    FWD_EXPECT(ids_start, HIST + 1, EK_ERR_SIZE);
    FWD_EXPECT(ids_start, INT64_MAX, EK_ERR_SIZE);   /* ids_start + T overflows */
    FWD_EXPECT(xs_rows, HIST + T - 1, EK_ERR_SIZE);
    FWD_EXPECT(xs_start, HIST + 1, EK_ERR_SIZE);
    FWD_EXPECT(xs_start, INT64_MAX - 2, EK_ERR_SIZE);
    FWD_EXPECT(y_cap, T * HID - 1, EK_ERR_CAPACITY);
    FWD_EXPECT(ci, ni - 1, EK_ERR_CAPACITY);
    FWD_EXPECT(cf, nf - 1, EK_ERR_CAPACITY);
    FWD_EXPECT(T, INT64_MAX / 2, EK_ERR_CAPACITY);   /* scratch size overflows */

    /* NULL buffers */
    FWD_EXPECT(h, NULL, EK_ERR_NULL);
    FWD_EXPECT(ids, NULL, EK_ERR_NULL);
    FWD_EXPECT(xs, NULL, EK_ERR_NULL);
    FWD_EXPECT(y, NULL, EK_ERR_NULL);
    FWD_EXPECT(si, NULL, EK_ERR_NULL);
    FWD_EXPECT(sf, NULL, EK_ERR_NULL);

    /* no output written by any failed call */
    int untouched = hits == -9;
    for (int i = 0; i < (HIST + T) * HID; i++) untouched &= xs[i] == -7.0f;
    for (int i = 0; i < T * HID; i++) untouched &= y[i] == -7.0f;
    CHECK(untouched);

    /* T = 0: nothing to do, every buffer may be NULL; n_hits set to 0 */
    CHECK_ST(ek_engram_forward(&layer_a.L, NULL, 0, NULL, 0, 0, NULL, 0, 0, NULL, 0, NULL, 0,
                               NULL, 0, &hits), EK_OK);
    CHECK_EQ_I64(hits, 0);
    /* ... then the good call works and writes only rows [HIST, HIST + T) of xs */
    hits = -9;
    CHECK_ST(fwd(good), EK_OK);
    CHECK(hits >= 0);
    int hist_kept = 1;
    for (int i = 0; i < HIST * HID; i++) hist_kept &= xs[i] == -7.0f;
    CHECK(hist_kept);

    /* ek_engram_scratch's own arguments */
    int64_t a, b;
    CHECK_ST(ek_engram_scratch(NULL, 1, &a, &b), EK_ERR_NULL);
    CHECK_ST(ek_engram_scratch(&layer_a.L, 1, NULL, &b), EK_ERR_NULL);
    CHECK_ST(ek_engram_scratch(&layer_a.L, 1, &a, NULL), EK_ERR_NULL);
    CHECK_ST(ek_engram_scratch(&layer_a.L, -1, &a, &b), EK_ERR_ARG);
    CHECK_ST(ek_engram_scratch(&layer_a.L, INT64_MAX, &a, &b), EK_ERR_CAPACITY);
    CHECK_ST(ek_engram_scratch(&layer_a.L, INT64_MAX / 4, &a, &b), EK_ERR_CAPACITY);
    free(si);
    free(sf);
}

/* ================================================================ fake ggml */

typedef struct {
    const char *name;
    float *data;
    int64_t ne;
    size_t nbytes;
    bool contiguous;
} fake_tensor;

static int fake_gets, fake_sets, fake_oob;

static const char *fake_get_name(void *t) { return ((fake_tensor *)t)->name; }
static int64_t fake_nelements(void *t) { return ((fake_tensor *)t)->ne; }
static size_t fake_nbytes(void *t) { return ((fake_tensor *)t)->nbytes; }
static bool fake_is_contiguous(void *t) { return ((fake_tensor *)t)->contiguous; }

static void fake_tensor_get(void *t, void *data, size_t offset, size_t size) {
    fake_tensor *ft = t;
    fake_gets++;
    if (offset > ft->nbytes || size > ft->nbytes - offset) {
        fake_oob++;
        return;
    }
    memcpy(data, (const char *)ft->data + offset, size);
}

static void fake_tensor_set(void *t, const void *data, size_t offset, size_t size) {
    fake_tensor *ft = t;
    fake_sets++;
    if (offset > ft->nbytes || size > ft->nbytes - offset) {
        fake_oob++;
        return;
    }
    memcpy((char *)ft->data + offset, data, size);
}

static const ek_ggml_api fake_api = {fake_get_name, fake_nelements, fake_nbytes,
                                     fake_tensor_get, fake_tensor_set, fake_is_contiguous};

/* The graph of a 4-layer decoder as the callback sees it; Engram layers inject at decoder
 * layer 0 (node "embd") and 3 (node "l_out-2"). */
static const char *const graph_nodes[] = {"inp_embd", "embd", "attn_norm-0", "l_out-0",
                                          "ffn_out-1", "l_out-1", "l_out-2", "l_out-3",
                                          "result_norm", "result_output"};
enum { N_NODES = (int)(sizeof graph_nodes / sizeof graph_nodes[0]) };
static const int32_t inject_layers[N_LAYERS] = {0, 3};
static const int engram_node[N_LAYERS] = {1, 6}; /* graph_nodes index of each Engram layer */

static int layer_of_node(int node) {
    for (int l = 0; l < N_LAYERS; l++)
        if (engram_node[l] == node) return l;
    return -1;
}

/* The hidden state node `node` holds at position pos: fixed per (node, pos), so every way of
 * batching the same sequence sees the same inputs. */
static float hidden_value(int node, int64_t pos, int64_t d) {
    const uint64_t s = mix64(((uint64_t)node << 40) ^ ((uint64_t)pos << 20) ^ (uint64_t)d ^ 0xABCDu);
    return (float)((double)(s >> 11) * 0x1p-53 * 4.0 - 2.0);
}

/* ---------------------------------------------------------------- runtime fixture */

/* The runtime's canonical map: raw id -> canonical id (surjective onto [0, VOCAB)). */
static int64_t canonical_of(int32_t raw) {
    return ((int64_t)raw * 7 + 3) % VOCAB;
}

typedef struct {
    ek_engram_layer layers[N_LAYERS];
    int32_t inject[N_LAYERS];
    int64_t map[MAP_LEN];
    int64_t *ids;          /* [N_CTX] sequence 0's ids */
    float *xs;             /* [N_LAYERS, N_CTX, HID] sequence 0's x */
    ek_seq seqs[N_SEQS];
    int32_t batch_seqs[N_SEQS];
    ek_segment segs[N_SEQS];
    int64_t *ids_more;     /* [N_SEQS - 1, N_CTX] the other sequences' ids */
    float *xs_more;        /* [N_SEQS - 1, N_LAYERS, N_CTX, HID] */
    int32_t fired[N_LAYERS];
    int64_t *si;
    float *sf;
    ek_runtime rt;
} fixture;

static void fixture_init(fixture *f) {
    memset(f, 0, sizeof *f);
    f->layers[0] = layer_a.L;
    f->layers[1] = layer_b.L;
    for (int l = 0; l < N_LAYERS; l++) f->inject[l] = inject_layers[l];
    for (int r = 0; r < MAP_LEN; r++) f->map[r] = canonical_of(r);
    f->ids = xmalloc(N_CTX * sizeof(int64_t));
    f->xs = xmalloc((size_t)N_LAYERS * N_CTX * HID * sizeof(float));
    for (int i = 0; i < N_CTX; i++) f->ids[i] = -1;
    for (int i = 0; i < N_LAYERS * N_CTX * HID; i++) f->xs[i] = NAN; /* never read unwritten */
    f->ids_more = xmalloc((size_t)(N_SEQS - 1) * N_CTX * sizeof(int64_t));
    f->xs_more = xmalloc((size_t)(N_SEQS - 1) * N_LAYERS * N_CTX * HID * sizeof(float));
    for (int i = 0; i < (N_SEQS - 1) * N_CTX; i++) f->ids_more[i] = -1;
    for (int i = 0; i < (N_SEQS - 1) * N_LAYERS * N_CTX * HID; i++) f->xs_more[i] = NAN;
    f->seqs[0].ids = f->ids;
    f->seqs[0].xs = f->xs;
    for (int s = 1; s < N_SEQS; s++) {
        f->seqs[s].ids = f->ids_more + (int64_t)(s - 1) * N_CTX;
        f->seqs[s].xs = f->xs_more + (int64_t)(s - 1) * N_LAYERS * N_CTX * HID;
    }
    ek_runtime *rt = &f->rt;
    rt->ggml = fake_api;
    rt->layers = f->layers;
    rt->inject = f->inject;
    rt->n_layers = N_LAYERS;
    rt->canonical_map = f->map;
    rt->map_len = MAP_LEN;
    rt->n_ctx = N_CTX;
    rt->seqs = f->seqs;
    rt->n_seqs = N_SEQS;
    rt->batch_seqs = f->batch_seqs;
    rt->segs = f->segs;
    rt->fired = f->fired;
    rt->max_tokens = MAX_TOK;
    rt->enabled = 1;
    int64_t ni = -1, nf = -1;
    CHECK_ST(ek_runtime_scratch(rt, &ni, &nf), EK_OK);
    CHECK(ni > 0 && nf > 0);
    f->si = xmalloc((size_t)ni * sizeof(int64_t));
    f->sf = xmalloc((size_t)nf * sizeof(float));
    rt->scratch_i64 = f->si;
    rt->cap_i64 = ni;
    rt->scratch_f32 = f->sf;
    rt->cap_f32 = nf;
}

static void fixture_free(fixture *f) {
    free(f->ids);
    free(f->xs);
    free(f->ids_more);
    free(f->xs_more);
    free(f->si);
    free(f->sf);
}

typedef float seq_out[N_LAYERS][N_CTX][HID];

/* What llama_decode does with the callback for the pending batch: ask for every node, run the
 * callback on those asked for. out (may be NULL) receives the Engram nodes' tensors (h + y). */
static void run_graph(ek_runtime *rt, seq_out *out) {
    const int64_t n = rt->n_pending, p0 = rt->seqs[0].n_past;
    const int expect_ask = rt->enabled && rt->status == EK_OK;
    for (int node = 0; node < N_NODES; node++) {
        float *data = xmalloc((size_t)(n * HID) * sizeof(float));
        for (int64_t t = 0; t < n; t++)
            for (int64_t d = 0; d < HID; d++) data[t * HID + d] = hidden_value(node, p0 + t, d);
        fake_tensor ft = {graph_nodes[node], data, n * HID, (size_t)(n * HID) * sizeof(float), true};
        const int li = layer_of_node(node);
        const bool ask = ek_eval_callback(&ft, true, rt);
        CHECK(ask == (expect_ask && li >= 0));
        if (ask) {
            CHECK(ek_eval_callback(&ft, false, rt));
            if (out)
                for (int64_t t = 0; t < n; t++)
                    memcpy((*out)[li][p0 + t], data + t * HID, HID * sizeof(float));
        }
        free(data);
    }
}

static int32_t decode(ek_runtime *rt, const int32_t *tokens, int64_t n, seq_out *out) {
    const int32_t st = ek_runtime_begin(rt, tokens, NULL, n);
    if (st != EK_OK) return st;
    run_graph(rt, out);
    return ek_runtime_commit(rt);
}

/* Decode raw[from, to) in the given chunk sizes (cycled); every step must succeed. */
static void decode_chunks(ek_runtime *rt, const int32_t *raw, int64_t from, int64_t to,
                          const int64_t *chunks, int n_chunks, seq_out *out) {
    CHECK_EQ_I64(rt->seqs[0].n_past, from);
    for (int64_t p = from, c = 0; p < to; c++) {
        int64_t n = chunks[c % n_chunks];
        if (n > to - p) n = to - p;
        CHECK_ST(decode(rt, raw + p, n, out), EK_OK);
        p += n;
    }
    CHECK_EQ_I64(rt->seqs[0].n_past, to);
}

static int same_outputs(seq_out *a, seq_out *b, int64_t from, int64_t to) {
    for (int l = 0; l < N_LAYERS; l++)
        if (memcmp((*a)[l][from], (*b)[l][from], (size_t)((to - from) * HID) * sizeof(float)) != 0)
            return 0;
    return 1;
}

/* ================================================================ 2. runtime state */

static int32_t raw_tokens[SEQ];

static void test_runtime_sequence(void) {
    static fixture f;
    static seq_out out_a, out_b;
    fixture_init(&f);
    ek_runtime *rt = &f.rt;
    CHECK_ST(ek_runtime_init(rt), EK_OK);
    CHECK_EQ_I64(rt->seqs[0].n_past, 0);
    CHECK_EQ_I64(rt->n_calls, 0);
    CHECK(rt->error[0] == '\0');

    /* the reference: canonical ids and each Engram node's hidden states */
    static double y_ref[N_LAYERS][SEQ * HID], x_ref[N_LAYERS][SEQ * HID];
    int64_t canon[SEQ], ref_hits[N_LAYERS];
    static float h_ref[SEQ * HID];
    for (int p = 0; p < SEQ; p++) canon[p] = f.map[raw_tokens[p]];
    const model_layer *models[N_LAYERS] = {&layer_a, &layer_b};
    for (int l = 0; l < N_LAYERS; l++) {
        for (int p = 0; p < SEQ; p++)
            for (int d = 0; d < HID; d++) h_ref[p * HID + d] = hidden_value(engram_node[l], p, d);
        ref_forward(models[l], canon, SEQ, h_ref, y_ref[l], x_ref[l], &ref_hits[l]);
    }

    /* A: batches of the maximum size; against the reference */
    const int64_t full[] = {MAX_TOK};
    int64_t calls0 = rt->n_calls, hits0 = rt->n_hits;
    decode_chunks(rt, raw_tokens, 0, SEQ, full, 1, &out_a);
    CHECK_EQ_I64(rt->n_calls - calls0, N_LAYERS * 3);   /* 8 + 8 + 4 */
    CHECK_EQ_I64(rt->n_hits - hits0, ref_hits[0] + ref_hits[1]);
    CHECK(ref_hits[0] > 0);
    for (int p = 0; p < SEQ; p++) CHECK_EQ_I64(f.ids[p], canon[p]);
    max_err = 0.0;
    int ok_y = 1, ok_x = 1;
    for (int l = 0; l < N_LAYERS; l++)
        for (int p = 0; p < SEQ; p++)
            for (int d = 0; d < HID; d++) {
                ok_y &= close_to(out_a[l][p][d],
                                 (double)hidden_value(engram_node[l], p, d) + y_ref[l][p * HID + d]);
                ok_x &= close_to(f.xs[((int64_t)l * N_CTX + p) * HID + d], x_ref[l][p * HID + d]);
            }
    CHECK(ok_y);
    CHECK(ok_x);
    printf("runtime vs reference: max |err| %.3g\n", max_err);
    CHECK(fake_oob == 0);

    /* B: token by token, and C: mixed chunks: bit-identical to A */
    const int64_t one[] = {1}, mixed[] = {3, 5, 1, 8, 2};
    ek_runtime_reset(rt);
    CHECK_EQ_I64(rt->seqs[0].n_past, 0);
    calls0 = rt->n_calls;
    decode_chunks(rt, raw_tokens, 0, SEQ, one, 1, &out_b);
    CHECK_EQ_I64(rt->n_calls - calls0, N_LAYERS * SEQ);
    CHECK(same_outputs(&out_a, &out_b, 0, SEQ));
    ek_runtime_reset(rt);
    memset(out_b, 0, sizeof out_b);
    decode_chunks(rt, raw_tokens, 0, SEQ, mixed, 5, &out_b);
    CHECK(same_outputs(&out_a, &out_b, 0, SEQ));

    /* context full: 20 + 5 > 24 fails the state; reset clears it */
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 5), EK_ERR_CAPACITY);
    CHECK_ST(rt->status, EK_ERR_CAPACITY);
    CHECK(strstr(rt->error, "context full") != NULL);
    CHECK_EQ_I64(rt->seqs[0].n_past, SEQ);
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 1), EK_ERR_CAPACITY); /* stays failed */
    CHECK_ST(ek_runtime_truncate(rt, 0, 3), EK_ERR_CAPACITY);
    CHECK_ST(ek_runtime_commit(rt), EK_ERR_CAPACITY);
    ek_runtime_reset(rt);
    CHECK_ST(rt->status, EK_OK);
    CHECK(rt->error[0] == '\0');
    CHECK_EQ_I64(rt->seqs[0].n_past, 0);
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 4), EK_OK);           /* 4 fits an empty context */
    ek_runtime_abort(rt);

    /* abort: a decoded-but-abandoned batch leaves the committed state as before begin */
    ek_runtime_reset(rt);
    memset(out_b, 0, sizeof out_b);
    const int64_t split[] = {6, 4};
    decode_chunks(rt, raw_tokens, 0, 10, split, 2, &out_b);
    static int64_t ids_snap[N_CTX];
    static float xs_snap[N_LAYERS * N_CTX * HID];
    memcpy(ids_snap, f.ids, sizeof ids_snap);
    memcpy(xs_snap, f.xs, sizeof xs_snap);
    const int32_t garbage[5] = {39, 0, 17, 17, 2};
    CHECK_ST(ek_runtime_begin(rt, garbage, NULL, 5), EK_OK);
    run_graph(rt, NULL);                  /* writes ids and xs rows 10..14 */
    ek_runtime_abort(rt);
    CHECK_EQ_I64(rt->seqs[0].n_past, 10);
    CHECK_EQ_I64(rt->n_pending, 0);
    CHECK_ST(rt->status, EK_OK);
    CHECK(memcmp(f.ids, ids_snap, 10 * sizeof(int64_t)) == 0);
    int xs_kept = 1;
    for (int l = 0; l < N_LAYERS; l++)
        xs_kept &= memcmp(f.xs + (int64_t)l * N_CTX * HID, xs_snap + (int64_t)l * N_CTX * HID,
                          10 * HID * sizeof(float)) == 0;
    CHECK(xs_kept);
    CHECK_ST(ek_runtime_begin(rt, garbage, NULL, 3), EK_OK);  /* abort before any callback */
    ek_runtime_abort(rt);
    ek_runtime_abort(rt);                               /* nothing pending: no-op */
    CHECK_EQ_I64(rt->seqs[0].n_past, 10);
    decode_chunks(rt, raw_tokens, 10, SEQ, split, 2, &out_b);
    CHECK(same_outputs(&out_a, &out_b, 0, SEQ));
    /* commit with nothing pending (e.g. after an abort) is an error that fails the state */
    CHECK_ST(ek_runtime_commit(rt), EK_ERR_ARG);
    CHECK_ST(rt->status, EK_ERR_ARG);
    CHECK(strstr(rt->error, "without a batch") != NULL);
    CHECK_EQ_I64(rt->seqs[0].n_past, SEQ);
    ek_runtime_reset(rt);

    /* truncate: roll back, re-decode, same outputs; also after a detour through other tokens */
    decode_chunks(rt, raw_tokens, 0, SEQ, full, 1, NULL);
    CHECK_ST(ek_runtime_truncate(rt, 0, SEQ), EK_OK);      /* to n_past: no-op */
    CHECK_ST(ek_runtime_truncate(rt, 0, SEQ + 1), EK_ERR_RANGE);
    CHECK_ST(ek_runtime_truncate(rt, 0, -1), EK_ERR_RANGE);
    CHECK_ST(rt->status, EK_OK);                        /* a refused truncate fails nothing */
    CHECK_ST(ek_runtime_truncate(rt, 0, 7), EK_OK);
    CHECK_EQ_I64(rt->seqs[0].n_past, 7);
    CHECK_ST(ek_runtime_truncate(rt, 0, 8), EK_ERR_RANGE); /* beyond the new n_past */
    memset(out_b, 0, sizeof out_b);
    const int64_t five[] = {5};
    decode_chunks(rt, raw_tokens, 7, SEQ, five, 1, &out_b);
    CHECK(same_outputs(&out_a, &out_b, 7, SEQ));
    CHECK_ST(ek_runtime_truncate(rt, 0, 12), EK_OK);
    const int32_t detour[6] = {1, 2, 3, 4, 5, 6};
    CHECK_ST(decode(rt, detour, 6, NULL), EK_OK);
    CHECK_ST(decode(rt, detour, 2, NULL), EK_OK);
    CHECK_ST(ek_runtime_truncate(rt, 0, 12), EK_OK);
    memset(out_b, 0, sizeof out_b);
    decode_chunks(rt, raw_tokens, 12, SEQ, one, 1, &out_b);
    CHECK(same_outputs(&out_a, &out_b, 12, SEQ));
    /* truncate with a batch pending drops the batch */
    CHECK_ST(ek_runtime_truncate(rt, 0, 15), EK_OK);
    CHECK_ST(ek_runtime_begin(rt, raw_tokens + 15, NULL, 2), EK_OK);
    CHECK_ST(ek_runtime_truncate(rt, 0, 15), EK_OK);
    CHECK_EQ_I64(rt->n_pending, 0);
    /* truncate(0) is a fresh sequence */
    CHECK_ST(ek_runtime_truncate(rt, 0, 0), EK_OK);
    memset(out_b, 0, sizeof out_b);
    decode_chunks(rt, raw_tokens, 0, SEQ, mixed, 5, &out_b);
    CHECK(same_outputs(&out_a, &out_b, 0, SEQ));

    /* enabled = 0: the callback asks for nothing, commit needs no firing */
    ek_runtime_reset(rt);
    rt->enabled = 0;
    calls0 = rt->n_calls;
    CHECK_ST(decode(rt, raw_tokens, 3, NULL), EK_OK);
    CHECK_EQ_I64(rt->n_calls, calls0);
    CHECK_EQ_I64(rt->seqs[0].n_past, 3);
    rt->enabled = 1;

    CHECK(fake_oob == 0);
    fixture_free(&f);
}

/* ================================================================ 3b. runtime bad arguments */

/* A good runtime `r` (its fixture `fx`) with `stmt` applied: init must fail with `want`, and
 * record it in status and error. */
static fixture init_fx;
#define INIT_EXPECT(stmt, want)                                             \
    do {                                                                    \
        fixture *const fx = &init_fx;                                       \
        ek_runtime *const r = &init_fx.rt;                                  \
        fixture_init(fx);                                                   \
        (void)fx;                                                           \
        (void)r;                                                            \
        stmt;                                                               \
        CHECK_ST(ek_runtime_init(r), want);                                 \
        CHECK_ST(r->status, want);                                          \
        CHECK(r->error[0] != '\0');                                         \
        fixture_free(fx);                                                   \
    } while (0)

static void test_runtime_init_errors(void) {
    /* ek_runtime_scratch */
    static fixture f;
    fixture_init(&f);
    ek_runtime *rt = &f.rt;
    int64_t a, b;
    CHECK_ST(ek_runtime_scratch(NULL, &a, &b), EK_ERR_NULL);
    CHECK_ST(ek_runtime_scratch(rt, NULL, &b), EK_ERR_NULL);
    CHECK_ST(ek_runtime_scratch(rt, &a, NULL), EK_ERR_NULL);
    rt->n_layers = 0;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_ERR_ARG);
    rt->n_layers = -1;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_ERR_ARG);
    rt->n_layers = N_LAYERS;
    rt->max_tokens = 0;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_ERR_ARG);
    rt->max_tokens = INT64_MAX / 2;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_ERR_CAPACITY);
    rt->max_tokens = MAX_TOK;
    rt->layers = NULL;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_ERR_NULL);
    rt->layers = f.layers;
    f.layers[1].kernel = 0;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_ERR_ARG);
    f.layers[1] = layer_b.L;
    CHECK_ST(ek_runtime_scratch(rt, &a, &b), EK_OK);
    fixture_free(&f);

    /* ek_runtime_init: every failure is recorded in status and error */
    CHECK_ST(ek_runtime_init(NULL), EK_ERR_NULL);
    INIT_EXPECT(r->layers = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->n_layers = 0, EK_ERR_ARG);
    INIT_EXPECT(r->max_tokens = 0, EK_ERR_ARG);
    INIT_EXPECT(r->max_tokens = -5, EK_ERR_ARG);
    INIT_EXPECT(fx->layers[1].dilation = 0, EK_ERR_ARG);
    INIT_EXPECT(fx->layers[0].w_v_t = NULL, EK_ERR_NULL);
    INIT_EXPECT(fx->layers[1].hidden = HID / 2, EK_ERR_ARG);       /* different widths */
    INIT_EXPECT(r->inject = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->canonical_map = NULL, EK_ERR_NULL);
    INIT_EXPECT(fx->seqs[0].ids = NULL, EK_ERR_NULL);
    INIT_EXPECT(fx->seqs[N_SEQS - 1].xs = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->seqs = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->batch_seqs = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->segs = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->n_seqs = 0, EK_ERR_ARG);
    INIT_EXPECT(fx->seqs[0].xs = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->fired = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->ggml.get_name = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->ggml.nelements = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->ggml.nbytes = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->ggml.tensor_get = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->ggml.tensor_set = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->ggml.is_contiguous = NULL, EK_ERR_NULL);
    INIT_EXPECT(fx->inject[1] = -1, EK_ERR_ARG);                   /* out-of-range layer */
    INIT_EXPECT(fx->inject[1] = 0, EK_ERR_ARG);                    /* two Engrams at layer 0 */
    INIT_EXPECT(r->map_len = 0, EK_ERR_ARG);
    INIT_EXPECT(r->map_len = -1, EK_ERR_ARG);
    INIT_EXPECT(r->n_ctx = 0, EK_ERR_ARG);
    INIT_EXPECT(r->n_ctx = INT64_MAX / 4, EK_ERR_CAPACITY);        /* n_ctx x D x layers */
    INIT_EXPECT(r->cap_i64 -= 1, EK_ERR_CAPACITY);
    INIT_EXPECT(r->cap_f32 -= 1, EK_ERR_CAPACITY);
    INIT_EXPECT(r->scratch_i64 = NULL, EK_ERR_NULL);
    INIT_EXPECT(r->scratch_f32 = NULL, EK_ERR_NULL);

    /* an all-zero runtime is refused, not dereferenced */
    static ek_runtime zero;
    memset(&zero, 0, sizeof zero);
    CHECK_ST(ek_runtime_init(&zero), EK_ERR_ARG);
    CHECK(zero.error[0] != '\0');

    /* a successful init clears an earlier failure */
    fixture_init(&f);
    f.rt.n_ctx = 0;
    CHECK_ST(ek_runtime_init(&f.rt), EK_ERR_ARG);
    f.rt.n_ctx = N_CTX;
    CHECK_ST(ek_runtime_init(&f.rt), EK_OK);
    CHECK_ST(f.rt.status, EK_OK);
    CHECK(f.rt.error[0] == '\0');
    fixture_free(&f);
}

static void test_runtime_call_errors(void) {
    static fixture f;
    fixture_init(&f);
    ek_runtime *rt = &f.rt;
    CHECK_ST(ek_runtime_init(rt), EK_OK);

    /* NULL runtime: status, or nothing for the void functions */
    CHECK_ST(ek_runtime_begin(NULL, raw_tokens, NULL, 1), EK_ERR_NULL);
    CHECK_ST(ek_runtime_commit(NULL), EK_ERR_NULL);
    CHECK_ST(ek_runtime_truncate(NULL, 0, 0), EK_ERR_NULL);
    ek_runtime_abort(NULL);
    ek_runtime_reset(NULL);

    /* begin: each bad batch fails the state (first error kept) and writes no id */
    const int32_t bad_hi[3] = {1, MAP_LEN, 2}, bad_lo[2] = {3, -1};
    struct {
        const int32_t *tokens;
        int64_t n;
        int32_t want;
    } const bad_begins[] = {
        {raw_tokens, 0, EK_ERR_ARG}, {raw_tokens, -1, EK_ERR_ARG},
        {raw_tokens, MAX_TOK + 1, EK_ERR_ARG}, {raw_tokens, INT64_MIN, EK_ERR_ARG},
        {NULL, 2, EK_ERR_NULL}, {bad_hi, 3, EK_ERR_RANGE}, {bad_lo, 2, EK_ERR_RANGE},
    };
    for (size_t i = 0; i < sizeof bad_begins / sizeof bad_begins[0]; i++) {
        ek_runtime_reset(rt);
        CHECK_ST(ek_runtime_begin(rt, bad_begins[i].tokens, NULL, bad_begins[i].n), bad_begins[i].want);
        CHECK_ST(rt->status, bad_begins[i].want);
        CHECK(rt->error[0] != '\0');
        CHECK_EQ_I64(rt->n_pending, 0);
        CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 1), bad_begins[i].want); /* stays failed */
        CHECK_ST(ek_runtime_commit(rt), bad_begins[i].want);
        CHECK_ST(ek_runtime_truncate(rt, 0, 0), bad_begins[i].want);
    }
    int ids_untouched = 1;
    for (int i = 0; i < N_CTX; i++) ids_untouched &= f.ids[i] == -1;
    CHECK(ids_untouched);
    ek_runtime_reset(rt);

    /* commit: without a batch; with a layer that did not fire (names its graph node) */
    CHECK_ST(ek_runtime_commit(rt), EK_ERR_ARG);
    ek_runtime_reset(rt);
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 2), EK_OK);
    CHECK_ST(ek_runtime_commit(rt), EK_ERR_ARG);        /* no callback at all: "embd" first */
    CHECK(strstr(rt->error, "node embd") != NULL);
    CHECK_EQ_I64(rt->seqs[0].n_past, 0);
    ek_runtime_reset(rt);

    float data[2 * HID], keep[2 * HID];
    for (int i = 0; i < 2 * HID; i++) keep[i] = data[i] = (float)i * 0.25f - 1.0f;
    fake_tensor embd = {"embd", data, 2 * HID, sizeof data, true};
    fake_tensor l2 = {"l_out-2", data, 2 * HID, sizeof data, true};
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 2), EK_OK);
    CHECK(ek_eval_callback(&embd, false, rt));
    CHECK_ST(ek_runtime_commit(rt), EK_ERR_ARG);        /* layer 1 (l_out-2) never ran */
    CHECK(strstr(rt->error, "node l_out-2") != NULL);
    ek_runtime_reset(rt);
    memcpy(data, keep, sizeof data);

    /* ================ 4. ek_eval_callback's argument checking */
    const int gets0 = fake_gets, sets0 = fake_sets;
    CHECK(!ek_eval_callback(NULL, true, rt));
    CHECK(!ek_eval_callback(NULL, false, rt));
    CHECK(!ek_eval_callback(&embd, true, NULL));
    CHECK(!ek_eval_callback(&embd, false, NULL));

    /* node names: only the Engram layers' input nodes are asked for */
    const char *const not_ours[] = {"l_out-0", "l_out-1", "l_out-3", "l_out-", "l_out-2x",
                                    "l_out--2", "l_out-02x", "l_out-99999999999999999999",
                                    "l_out", "embd ", "embdx", "emb", "", "inp_embd",
                                    "result_output", "L_OUT-2", "l_out-2 "};
    for (size_t i = 0; i < sizeof not_ours / sizeof not_ours[0]; i++) {
        fake_tensor t = {not_ours[i], data, 2 * HID, sizeof data, true};
        CHECK(!ek_eval_callback(&t, true, rt));
        CHECK(ek_eval_callback(&t, false, rt));         /* not ours: nothing to do */
    }
    fake_tensor unnamed = {NULL, data, 2 * HID, sizeof data, true};
    CHECK(!ek_eval_callback(&unnamed, true, rt));
    CHECK(ek_eval_callback(&unnamed, false, rt));
    CHECK(ek_eval_callback(&embd, true, rt));
    CHECK(ek_eval_callback(&l2, true, rt));
    CHECK(memcmp(data, keep, sizeof data) == 0);
    CHECK(fake_gets == gets0 && fake_sets == sets0);
    CHECK_ST(rt->status, EK_OK);

    /* outside a batch: asked for, but running it fails */
    CHECK(!ek_eval_callback(&embd, false, rt));
    CHECK_ST(rt->status, EK_ERR_ARG);
    CHECK(strstr(rt->error, "outside a batch") != NULL);
    CHECK(!ek_eval_callback(&embd, true, rt));          /* failed: asks for nothing */
    CHECK(!ek_eval_callback(&l2, false, rt));
    fake_tensor other = {"l_out-0", data, 2 * HID, sizeof data, true};
    CHECK(!ek_eval_callback(&other, false, rt));        /* failed: refuses even foreign nodes */
    ek_runtime_reset(rt);

    /* tensor shape: must hold n_embd x batch contiguous float32 values */
    struct {
        int64_t ne;
        size_t nbytes;
        bool contiguous;
        const char *why;
    } const shapes[] = {
        {1 * HID, 1 * HID * sizeof(float), true, "holds 8 values"},   /* 1 token, batch of 2 */
        {3 * HID, 3 * HID * sizeof(float), true, "holds 24 values"},  /* too many */
        {2 * HID, 2 * HID * 2, true, "in 32 bytes"},                  /* F16 tensor */
        {2 * HID, 2 * HID * sizeof(float), false, "not contiguous"},
        {-2 * HID, 0, true, "holds -16 values"},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        ek_runtime_reset(rt);
        CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 2), EK_OK);
        fake_tensor t = {"embd", data, shapes[i].ne, shapes[i].nbytes, shapes[i].contiguous};
        CHECK(ek_eval_callback(&t, true, rt));
        CHECK(!ek_eval_callback(&t, false, rt));
        CHECK_ST(rt->status, EK_ERR_SIZE);
        CHECK(strstr(rt->error, shapes[i].why) != NULL);
        CHECK_ST(ek_runtime_commit(rt), EK_ERR_SIZE);
    }
    CHECK(memcmp(data, keep, sizeof data) == 0);
    CHECK(fake_gets == gets0 && fake_sets == sets0);

    /* twice in one batch (the batch was split into ubatches) */
    ek_runtime_reset(rt);
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 2), EK_OK);
    CHECK(ek_eval_callback(&embd, false, rt));
    CHECK(ek_eval_callback(&l2, false, rt));            /* layer 1 fires once too */
    memcpy(data, keep, sizeof data);
    CHECK(!ek_eval_callback(&embd, false, rt));
    CHECK_ST(rt->status, EK_ERR_ARG);
    CHECK(strstr(rt->error, "twice") != NULL);
    CHECK(memcmp(data, keep, sizeof data) == 0);        /* the second call wrote nothing */
    ek_runtime_reset(rt);

    /* the forward fails (a canonical id outside the hash's vocabulary) */
    f.map[0] = VOCAB;
    const int32_t tok0[1] = {0};
    CHECK_ST(ek_runtime_begin(rt, tok0, NULL, 1), EK_OK);
    fake_tensor one_tok = {"embd", data, HID, HID * sizeof(float), true};
    CHECK(!ek_eval_callback(&one_tok, false, rt));
    CHECK_ST(rt->status, EK_ERR_RANGE);
    CHECK(strstr(rt->error, "Engram forward at embd failed") != NULL);
    CHECK(memcmp(data, keep, HID * sizeof(float)) == 0);
    CHECK_ST(ek_runtime_commit(rt), EK_ERR_RANGE);
    f.map[0] = 3;
    ek_runtime_reset(rt);

    /* after all that, a clean batch works */
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, NULL, 2), EK_OK);
    CHECK(ek_eval_callback(&embd, false, rt));
    CHECK(ek_eval_callback(&l2, false, rt));
    CHECK_ST(ek_runtime_commit(rt), EK_OK);
    CHECK_EQ_I64(rt->seqs[0].n_past, 2);
    CHECK(fake_oob == 0);
    fixture_free(&f);
}

/* ================================================================ 5. several sequences */

/* Three users' override stacks per layer: the layers' own sets, none, and layer A's set twice
 * (a two-file stack). user_stack(u) is [N_LAYERS]. */
static ek_stack stack_own[N_LAYERS], stack_none[N_LAYERS], stack_both[N_LAYERS];
static ek_override twice[2];

static const ek_stack *user_stack(int u) {
    return u == 0 ? stack_own : (u == 1 ? stack_none : stack_both);
}

static void stacks_init(void) {
    for (int l = 0; l < N_LAYERS; l++) {
        const model_layer *m = l == 0 ? &layer_a : &layer_b;
        stack_own[l] = (ek_stack){m->L.ovs, m->L.n_ovs};
        stack_none[l] = (ek_stack){NULL, 0};
        stack_both[l] = l == 0 ? (ek_stack){twice, 2} : (ek_stack){NULL, 0};
    }
    twice[0] = twice[1] = layer_a.ov;
}

/* The hidden state of user u's position pos at a node (users differ, so a mix-up shows). */
static float user_hidden(int node, int u, int64_t pos, int64_t d) {
    return hidden_value(node, pos + 1000 * (int64_t)u, d);
}

/* The graph of the pending batch: row r of sequence s holds user_hidden(node, user_of[s], pos);
 * outs[user_of[s]] receives each Engram node's tensor (h + y) at pos. */
static void run_graph_users(ek_runtime *rt, const int *user_of, seq_out *outs) {
    const int64_t n = rt->n_pending;
    for (int node = 0; node < N_NODES; node++) {
        float *data = xmalloc((size_t)(n * HID) * sizeof(float));
        for (int32_t b = 0; b < rt->n_batch_seqs; b++) {
            const ek_seq *sq = &rt->seqs[rt->batch_seqs[b]];
            for (int64_t i = 0; i < sq->n_pending; i++)
                for (int64_t d = 0; d < HID; d++)
                    data[(sq->batch_row + i) * HID + d] =
                        user_hidden(node, user_of[rt->batch_seqs[b]], sq->n_past + i, d);
        }
        fake_tensor ft = {graph_nodes[node], data, n * HID, (size_t)(n * HID) * sizeof(float), true};
        const int li = layer_of_node(node);
        CHECK(ek_eval_callback(&ft, true, rt) == (li >= 0));
        if (li >= 0) {
            CHECK(ek_eval_callback(&ft, false, rt));
            for (int32_t b = 0; b < rt->n_batch_seqs; b++) {
                const ek_seq *sq = &rt->seqs[rt->batch_seqs[b]];
                for (int64_t i = 0; i < sq->n_pending; i++)
                    memcpy(outs[user_of[rt->batch_seqs[b]]][li][sq->n_past + i],
                           data + (sq->batch_row + i) * HID, HID * sizeof(float));
            }
        }
        free(data);
    }
}

static int32_t user_tokens[N_SEQS][SEQ];

static void test_forward_batch_equals_segments_alone(void) {
    /* three segments: user 0 from position 0 (no history), user 1 continuing at 5 (history),
     * user 2 at 2 with a longer batch; each against ek_engram_forward with its stack as the
     * layer's own override sets */
    enum { T = 13 };
    const int64_t lens[N_SEQS] = {4, 1, 8}, starts[N_SEQS] = {0, 5, 2};
    static int64_t ids[N_SEQS][SEQ];
    static float xs_b[N_SEQS][SEQ * HID], xs_1[N_SEQS][SEQ * HID], h[T * HID], y_b[T * HID], y_1[T * HID];
    for (int u = 0; u < N_SEQS; u++) {
        for (int p = 0; p < SEQ; p++) ids[u][p] = (seq_ids[p] + 5 * u) % VOCAB;
        for (int i = 0; i < SEQ * HID; i++) xs_b[u][i] = xs_1[u][i] = rng_float(-1.0, 1.0);
    }
    for (int i = 0; i < T * HID; i++) h[i] = rng_float(-2.0, 2.0);
    for (int l = 0; l < N_LAYERS; l++) {
        const model_layer *m = l == 0 ? &layer_a : &layer_b;
        ek_segment segs[N_SEQS];
        int64_t row = 0, hits_1 = 0;
        for (int u = 0; u < N_SEQS; u++) {
            segs[u] = (ek_segment){lens[u], ids[u], SEQ, starts[u], xs_b[u], SEQ, starts[u], user_stack(u)[l]};
            ek_engram_layer L1 = m->L;
            L1.ovs = user_stack(u)[l].ovs;
            L1.n_ovs = user_stack(u)[l].n_ovs;
            int64_t ni, nf, hh = 0;
            CHECK_ST(ek_engram_scratch(&L1, lens[u], &ni, &nf), EK_OK);
            int64_t *si = xmalloc((size_t)ni * sizeof(int64_t));
            float *sf = xmalloc((size_t)nf * sizeof(float));
            CHECK_ST(ek_engram_forward(&L1, h + row * HID, lens[u], ids[u], SEQ, starts[u], xs_1[u], SEQ,
                                       starts[u], y_1 + row * HID, lens[u] * HID, si, ni, sf, nf, &hh),
                     EK_OK);
            hits_1 += hh;
            free(si);
            free(sf);
            row += lens[u];
        }
        CHECK_EQ_I64(row, T);
        int64_t ni, nf, hits_b = -1;
        CHECK_ST(ek_engram_scratch(&m->L, T, &ni, &nf), EK_OK);
        int64_t *si = xmalloc((size_t)ni * sizeof(int64_t));
        float *sf = xmalloc((size_t)nf * sizeof(float));
        CHECK_ST(ek_engram_forward_batch(&m->L, h, T, segs, N_SEQS, y_b, T * HID, si, ni, sf, nf, &hits_b),
                 EK_OK);
        CHECK(memcmp(y_b, y_1, sizeof y_b) == 0);
        CHECK(memcmp(xs_b, xs_1, sizeof xs_b) == 0);
        CHECK_EQ_I64(hits_b, hits_1);
        if (l == 0) CHECK(hits_b > 0);

        /* bad arguments: status, nothing written */
        static float y_keep[T * HID];
        memcpy(y_keep, y_b, sizeof y_b);
        ek_segment bad[N_SEQS];
#define BATCH_EXPECT(stmt, want)                                                                 \
        do {                                                                                     \
            memcpy(bad, segs, sizeof bad);                                                       \
            int64_t T_ = T, ycap_ = T * HID, ni_ = ni, nf_ = nf;                                 \
            int32_t nseg_ = N_SEQS;                                                              \
            const ek_segment *sp_ = bad;                                                         \
            (void)T_; (void)ycap_; (void)ni_; (void)nf_; (void)nseg_; (void)sp_;                 \
            stmt;                                                                                \
            CHECK_ST(ek_engram_forward_batch(&m->L, h, T_, sp_, nseg_, y_b, ycap_, si, ni_, sf, nf_, \
                                             NULL), want);                                       \
        } while (0)
        BATCH_EXPECT(T_ = T + 1, EK_ERR_ARG);                  /* segments do not cover T */
        BATCH_EXPECT(T_ = -1, EK_ERR_ARG);
        BATCH_EXPECT(nseg_ = -1, EK_ERR_ARG);
        BATCH_EXPECT(nseg_ = 2, EK_ERR_ARG);                   /* 12 rows of 13 */
        BATCH_EXPECT(sp_ = NULL, EK_ERR_NULL);
        BATCH_EXPECT(bad[1].n = 0, EK_ERR_ARG);
        BATCH_EXPECT(bad[1].n = -1, EK_ERR_ARG);
        BATCH_EXPECT(bad[2].n_ids = starts[2] + lens[2] - 1, EK_ERR_SIZE);
        BATCH_EXPECT(bad[2].xs_rows = starts[2] + lens[2] - 1, EK_ERR_SIZE);
        BATCH_EXPECT(bad[0].ids_start = -1, EK_ERR_ARG);
        BATCH_EXPECT(bad[0].xs_start = -1, EK_ERR_ARG);
        BATCH_EXPECT(bad[0].ids_start = INT64_MAX, EK_ERR_SIZE);
        BATCH_EXPECT(bad[1].ids = NULL, EK_ERR_NULL);
        BATCH_EXPECT(bad[1].xs = NULL, EK_ERR_NULL);
        BATCH_EXPECT(bad[1].stack.n_ovs = -1, EK_ERR_ARG);
        BATCH_EXPECT(bad[1].stack = ((ek_stack){NULL, 1}), EK_ERR_NULL);
        BATCH_EXPECT(bad[1].n = INT64_MAX - 1, EK_ERR_ARG);    /* the sum overflows */
        BATCH_EXPECT(ycap_ = T * HID - 1, EK_ERR_CAPACITY);
        BATCH_EXPECT(ni_ = ni - 1, EK_ERR_CAPACITY);
        BATCH_EXPECT(nf_ = nf - 1, EK_ERR_CAPACITY);
        BATCH_EXPECT(ycap_ = -1, EK_ERR_ARG);
        CHECK(memcmp(y_keep, y_b, sizeof y_b) == 0);
        CHECK(memcmp(xs_b, xs_1, sizeof xs_b) == 0);
#undef BATCH_EXPECT
        CHECK_ST(ek_engram_forward_batch(NULL, h, T, segs, N_SEQS, y_b, T * HID, si, ni, sf, nf, NULL),
                 EK_ERR_NULL);
        CHECK_ST(ek_engram_forward_batch(&m->L, NULL, T, segs, N_SEQS, y_b, T * HID, si, ni, sf, nf, NULL),
                 EK_ERR_NULL);
        CHECK_ST(ek_engram_forward_batch(&m->L, h, T, segs, N_SEQS, NULL, T * HID, si, ni, sf, nf, NULL),
                 EK_ERR_NULL);
        hits_b = -1;
        CHECK_ST(ek_engram_forward_batch(&m->L, NULL, 0, NULL, 0, NULL, 0, NULL, 0, NULL, 0, &hits_b), EK_OK);
        CHECK_EQ_I64(hits_b, 0);
        free(si);
        free(sf);
    }
}

/* Decode users 0..2 alone (sequence 0 of a fresh runtime, their own stack) into ref[u]. */
static void decode_users_alone(seq_out *ref) {
    static fixture f;
    fixture_init(&f);
    ek_runtime *rt = &f.rt;
    CHECK_ST(ek_runtime_init(rt), EK_OK);
    const int32_t batch[] = {5, 1, 3, 8, 2, 1};
    for (int u = 0; u < N_SEQS; u++) {
        ek_runtime_reset(rt);
        CHECK_ST(ek_runtime_set_stacks(rt, 0, user_stack(u)), EK_OK);
        const int zero_user[N_SEQS] = {u, u, u};
        for (int64_t p = 0, c = 0; p < SEQ; c++) {
            int64_t n = batch[c % 6];
            if (n > SEQ - p) n = SEQ - p;
            CHECK_ST(ek_runtime_begin(rt, user_tokens[u] + p, NULL, n), EK_OK);
            run_graph_users(rt, zero_user, ref);
            CHECK_ST(ek_runtime_commit(rt), EK_OK);
            p += n;
        }
    }
    fixture_free(&f);
}

static void test_runtime_sequences(void) {
    static seq_out ref[N_SEQS], got[N_SEQS];
    decode_users_alone(ref);
    /* the users differ: their stacks and tokens change their outputs */
    CHECK(memcmp(ref[0], ref[1], sizeof ref[0]) != 0 && memcmp(ref[0], ref[2], sizeof ref[0]) != 0);

    static fixture f;
    fixture_init(&f);
    ek_runtime *rt = &f.rt;
    CHECK_ST(ek_runtime_init(rt), EK_OK);
    /* user u lives in sequence slot (u + 1) % 3 */
    int user_of[N_SEQS];
    for (int u = 0; u < N_SEQS; u++) {
        user_of[(u + 1) % N_SEQS] = u;
        CHECK_ST(ek_runtime_set_stacks(rt, (u + 1) % N_SEQS, user_stack(u)), EK_OK);
    }
    /* random schedules: each round, a random subset of users in random order, each with a random
     * chunk, the batch at most MAX_TOK; sometimes a user rolls back and re-decodes */
    for (int round = 0; round < 40; round++) {
        int64_t pos[N_SEQS] = {0, 0, 0};
        ek_runtime_reset(rt);
        for (int u = 0; u < N_SEQS; u++) rt->seqs[(u + 1) % N_SEQS].stacks = user_stack(u);
        memset(got, 0, sizeof got);
        while (pos[0] < SEQ || pos[1] < SEQ || pos[2] < SEQ) {
            int32_t toks[MAX_TOK], sids[MAX_TOK];
            int64_t n = 0;
            const int first = (int)rng_int(N_SEQS);
            for (int k = 0; k < N_SEQS; k++) {
                const int u = (first + k) % N_SEQS;
                if (pos[u] >= SEQ || rng_int(3) == 0 || n >= MAX_TOK) continue;
                int64_t c = 1 + rng_int(4);
                if (c > SEQ - pos[u]) c = SEQ - pos[u];
                if (c > MAX_TOK - n) c = MAX_TOK - n;
                for (int64_t i = 0; i < c; i++) {
                    toks[n + i] = user_tokens[u][pos[u] + i];
                    sids[n + i] = (u + 1) % N_SEQS;
                }
                n += c;
                pos[u] += c;
            }
            if (n == 0) continue;
            CHECK_ST(ek_runtime_begin(rt, toks, sids, n), EK_OK);
            run_graph_users(rt, user_of, got);
            CHECK_ST(ek_runtime_commit(rt), EK_OK);
            const int u = (int)rng_int(N_SEQS);
            if (rng_int(8) == 0 && pos[u] > 2) {        /* roll back and continue from there */
                pos[u] -= 1 + rng_int(2);
                CHECK_ST(ek_runtime_truncate(rt, (u + 1) % N_SEQS, pos[u]), EK_OK);
            }
        }
        for (int u = 0; u < N_SEQS; u++) {
            CHECK_EQ_I64(rt->seqs[(u + 1) % N_SEQS].n_past, SEQ);
            CHECK(same_outputs(&ref[u], &got[u], 0, SEQ));
        }
    }

    /* begin: a sequence in two runs, a sequence id out of range, one sequence's context full */
    const int32_t toks[4] = {1, 2, 3, 4};
    const int32_t two_runs[4] = {0, 1, 1, 0}, out_of_range[4] = {0, 0, 3, 0}, negative[4] = {-1, 0, 0, 0};
    struct {
        const int32_t *sids;
        int32_t want;
        const char *why;
    } const bad[] = {{two_runs, EK_ERR_ARG, "two runs"}, {out_of_range, EK_ERR_RANGE, "sequence 3"},
                     {negative, EK_ERR_RANGE, "sequence -1"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ek_runtime_reset(rt);
        CHECK_ST(ek_runtime_begin(rt, toks, bad[i].sids, 4), bad[i].want);
        CHECK(strstr(rt->error, bad[i].why) != NULL);
        CHECK_EQ_I64(rt->n_pending, 0);
        CHECK(rt->n_batch_seqs == 0);
        for (int s = 0; s < N_SEQS; s++) CHECK_EQ_I64(rt->seqs[s].n_pending, 0);
    }
    ek_runtime_reset(rt);
    const int32_t s2[MAX_TOK] = {2, 2, 2, 2, 2, 2, 2, 2}, s1[4] = {1, 1, 1, 1};
    for (int k = 0; k < 3; k++) {                        /* sequence 2: 24 = N_CTX positions */
        CHECK_ST(ek_runtime_begin(rt, raw_tokens, s2, MAX_TOK), EK_OK);
        run_graph_users(rt, user_of, got);
        CHECK_ST(ek_runtime_commit(rt), EK_OK);
    }
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, s1, 4), EK_OK);   /* others still have room */
    ek_runtime_abort(rt);
    const int32_t mixed[3] = {1, 2, 2};
    CHECK_ST(ek_runtime_begin(rt, raw_tokens, mixed, 3), EK_ERR_CAPACITY);
    CHECK(strstr(rt->error, "sequence 2: 24 + 2 tokens exceed 24") != NULL);
    CHECK_EQ_I64(rt->seqs[1].n_pending, 0);

    /* truncate and set_stacks of other sequences; their refusals change nothing */
    ek_runtime_reset(rt);
    CHECK_ST(ek_runtime_truncate(rt, N_SEQS, 0), EK_ERR_RANGE);
    CHECK_ST(ek_runtime_truncate(rt, -1, 0), EK_ERR_RANGE);
    CHECK_ST(ek_runtime_truncate(rt, 1, 1), EK_ERR_RANGE);      /* beyond its n_past (0) */
    CHECK_ST(rt->status, EK_OK);
    CHECK_ST(ek_runtime_set_stacks(NULL, 0, NULL), EK_ERR_NULL);
    CHECK_ST(ek_runtime_set_stacks(rt, N_SEQS, NULL), EK_ERR_RANGE);
    CHECK_ST(ek_runtime_set_stacks(rt, -1, NULL), EK_ERR_RANGE);
    const ek_stack *before = rt->seqs[1].stacks;
    ek_stack neg[N_LAYERS] = {{NULL, 0}, {NULL, -1}}, null_ovs[N_LAYERS] = {{NULL, 1}, {NULL, 0}};
    CHECK_ST(ek_runtime_set_stacks(rt, 1, neg), EK_ERR_ARG);
    CHECK_ST(ek_runtime_set_stacks(rt, 1, null_ovs), EK_ERR_NULL);
    ek_override unsorted = layer_a.ov;
    int64_t rows_rev[N_OV];
    for (int i = 0; i < N_OV; i++) rows_rev[i] = layer_a.ov_rows[N_OV - 1 - i];
    unsorted.rows = rows_rev;
    ek_stack bad_set[N_LAYERS] = {{&unsorted, 1}, {NULL, 0}};
    CHECK_ST(ek_runtime_set_stacks(rt, 1, bad_set), EK_ERR_UNSORTED);
    ek_override too_far = layer_a.ov;
    int64_t rows_far[N_OV];
    for (int i = 0; i < N_OV; i++) rows_far[i] = layer_b.n_rows + i;  /* outside layer B's table */
    too_far.rows = rows_far;
    ek_stack far_set[N_LAYERS] = {{NULL, 0}, {&too_far, 1}};
    CHECK_ST(ek_runtime_set_stacks(rt, 1, far_set), EK_ERR_RANGE);
    CHECK(rt->seqs[1].stacks == before);
    CHECK_ST(ek_runtime_begin(rt, toks, s1, 2), EK_OK);
    CHECK_ST(ek_runtime_set_stacks(rt, 1, NULL), EK_ERR_ARG);  /* a batch is pending */
    CHECK(rt->seqs[1].stacks == before);
    CHECK_ST(rt->status, EK_OK);
    ek_runtime_abort(rt);
    CHECK_ST(ek_runtime_set_stacks(rt, 1, NULL), EK_OK);
    CHECK(rt->seqs[1].stacks == NULL);
    rt->status = EK_ERR_ARG;                                    /* a failed runtime refuses */
    CHECK_ST(ek_runtime_set_stacks(rt, 1, stack_none), EK_ERR_ARG);
    ek_runtime_reset(rt);
    CHECK(fake_oob == 0);
    fixture_free(&f);

    /* init checks every sequence's stacks */
    INIT_EXPECT(fx->seqs[2].stacks = bad_set, EK_ERR_UNSORTED);
    INIT_EXPECT(fx->seqs[1].stacks = neg, EK_ERR_ARG);
}

int main(void) {
    static const int64_t mult_a[N_GRAM] = {3, 29, 41}, primes_a[COLS] = {5, 7, 11, 13};
    static const int64_t mult_b[N_GRAM] = {7, 17, 53}, primes_b[COLS] = {3, 5, 7, 11};
    model_init(&layer_a, mult_a, primes_a, 4);
    model_init(&layer_b, mult_b, primes_b, 2);
    for (int t = 0; t < SEQ; t++) {
        seq_ids[t] = rng_int(VOCAB);
        raw_tokens[t] = (int32_t)rng_int(MAP_LEN);
    }
    seq_ids[11] = seq_ids[3]; /* repeat position 4's bigram: its keyed override fires twice */
    seq_ids[12] = seq_ids[4];
    for (int i = 0; i < SEQ * HID; i++) seq_h[i] = rng_float(-2.0, 2.0);
    model_add_overrides(&layer_a, seq_ids);

    test_forward_matches_reference();
    test_forward_scratch_contract();
    test_forward_errors();

    /* the runtime decodes raw_tokens: layer A's overrides must fire on that sequence too */
    int64_t canon[SEQ];
    for (int t = 0; t < SEQ; t++) canon[t] = canonical_of(raw_tokens[t]);
    model_add_overrides(&layer_a, canon);
    test_runtime_sequence();
    test_runtime_init_errors();
    test_runtime_call_errors();
    for (int u = 0; u < N_SEQS; u++)
        for (int t = 0; t < SEQ; t++) user_tokens[u][t] = u == 0 ? raw_tokens[t] : (int32_t)rng_int(MAP_LEN);
    stacks_init();
    test_forward_batch_equals_segments_alone();
    test_runtime_sequences();

    free(layer_a.table);
    free(layer_b.table);
    printf("%d checks, %d failed\n", n_checks, n_failed);
    return n_failed != 0;
}
