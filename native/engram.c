/* engram.c — the native kernel of engram_local: canonical ids, N-gram hashing, table gather.
 *
 * Implements native/engram.h exactly; the header is the contract and documents every
 * function. Style (llama2.c): no globals, no allocation, no exit(); every entry point checks
 * all of its arguments before it writes anything, so an error status leaves the outputs
 * untouched. Every pointer may be NULL only where its element count is 0.
 *
 * Bit-exactness: values are produced exactly as gguf-py's numpy code does
 * (gguf/quants.py, `dequantize`): one float32 multiply per quantized value, F16 widened by bit
 * operations, BF16 as u16 << 16. This file must therefore be built without -ffast-math.
 * Hashing reproduces DeepSeek's numpy `_get_ngram_hashes` (engram-architecture.md §2-§3):
 * int64 products that wrap like numpy's, XOR, and numpy's floor `%`.
 */
#include "engram.h"

#include <string.h>

/* GGUF stores little-endian values; rows are copied and read as host numbers. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "engram.c assumes a little-endian host"
#endif

/* Key of an override entry (and of a look-up without key) that matches every look-up. */
#define EK_ANY_KEY (-1)

/* ---------------------------------------------------------------- size arithmetic */

/* *out = a * b for a, b >= 0. Returns 0 (and leaves *out alone) on negative input or
 * int64 overflow, so callers can treat "too big to represent" as "too big for any buffer". */
static int mul_nonneg(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* ---------------------------------------------------------------- tensor types */

/* Block geometry of a ggml type: values per block and bytes per block. 0 when unsupported. */
static int qtype_block(int32_t qtype, int64_t *block_size, int64_t *block_bytes) {
    switch (qtype) {
    case EK_F32:  *block_size = 1;  *block_bytes = 4;  return 1;
    case EK_F16:  *block_size = 1;  *block_bytes = 2;  return 1;
    case EK_BF16: *block_size = 1;  *block_bytes = 2;  return 1;
    case EK_Q8_0: *block_size = 32; *block_bytes = 34; return 1; /* f16 d, 32 x int8 */
    case EK_Q4_0: *block_size = 32; *block_bytes = 18; return 1; /* f16 d, 16 x 2 nibbles */
    default:      return 0;
    }
}

int64_t ek_row_bytes(int32_t qtype, int64_t dim) {
    int64_t block_size, block_bytes, bytes;
    if (!qtype_block(qtype, &block_size, &block_bytes)) return 0;
    if (dim <= 0 || dim % block_size != 0) return 0;
    if (!mul_nonneg(dim / block_size, block_bytes, &bytes)) return 0;
    return bytes;
}

/* ---------------------------------------------------------------- canonical ids */

int32_t ek_canonicalize(const int64_t *map, int64_t map_len,
                        const int64_t *raw, int64_t n,
                        int64_t *out, int64_t out_cap) {
    if (map_len < 0 || n < 0 || out_cap < 0) return EK_ERR_ARG;
    if ((map_len > 0 && !map) || (n > 0 && (!raw || !out))) return EK_ERR_NULL;
    if (out_cap < n) return EK_ERR_CAPACITY;
    for (int64_t i = 0; i < n; i++) {
        if (raw[i] < 0 || raw[i] >= map_len) return EK_ERR_RANGE;
    }
    for (int64_t i = 0; i < n; i++) out[i] = map[raw[i]];
    return EK_OK;
}

/* ---------------------------------------------------------------- N-gram hashing */

/* The int64 with the bits of u (two's complement), without implementation-defined casts:
 * numpy's int64 multiply wraps, so products are formed in uint64 and reinterpreted. */
static int64_t as_int64(uint64_t u) {
    return u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}

/* numpy's int64 `a % p` for p >= 1: the remainder takes the divisor's sign, so it lies in
 * [0, p) even for a negative mix (only reachable with multipliers beyond DeepSeek's bound). */
static int64_t floor_mod(int64_t a, int64_t p) {
    int64_t r = a % p;
    return r < 0 ? r + p : r;
}

/* Validate a layer's configuration: shapes, pad id, and that every row id
 * offset + (mix mod prime) is representable. */
static int32_t hash_layer_check(const ek_hash_layer *layer) {
    if (layer->max_ngram < 2 || layer->n_head < 1 || layer->vocab < 1) return EK_ERR_ARG;
    if (!layer->multipliers || !layer->primes || !layer->offsets) return EK_ERR_NULL;
    if (layer->pad_id < 0 || layer->pad_id >= layer->vocab) return EK_ERR_ARG;
    const int64_t n_cols = (int64_t)(layer->max_ngram - 1) * layer->n_head;
    for (int64_t h = 0; h < n_cols; h++) {
        const int64_t p = layer->primes[h], off = layer->offsets[h];
        if (p < 1 || off < 0 || off > INT64_MAX - (p - 1)) return EK_ERR_ARG;
    }
    return EK_OK;
}

int32_t ek_hash(const ek_hash_layer *layer, const int64_t *ids, int64_t n, int64_t start,
                int64_t *rows_out, int64_t rows_cap, int64_t *mix_out, int64_t mix_cap) {
    if (!layer) return EK_ERR_NULL;
    int32_t st = hash_layer_check(layer);
    if (st != EK_OK) return st;
    if (n < 0 || start < 0 || start > n || rows_cap < 0 || mix_cap < 0) return EK_ERR_ARG;

    const int64_t N = layer->max_ngram, K = layer->n_head;
    const int64_t n_cols = (N - 1) * K, n_out = n - start;
    int64_t rows_need, mix_need;
    if (!mul_nonneg(n_out, n_cols, &rows_need) || !mul_nonneg(n_out, N - 1, &mix_need))
        return EK_ERR_CAPACITY; /* more outputs than any buffer can hold */
    if ((n > 0 && !ids) || (n_out > 0 && !rows_out)) return EK_ERR_NULL;
    if (rows_cap < rows_need || (mix_out && mix_cap < mix_need)) return EK_ERR_CAPACITY;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= layer->vocab) return EK_ERR_RANGE;
    }

    const uint64_t pad = (uint64_t)layer->pad_id;
    for (int64_t t = start; t < n; t++) {
        int64_t *rows = rows_out + (t - start) * n_cols;
        /* mix_n = XOR_{k<n} ids[t-k] * m_k, extended one look-back k at a time (rolling):
         * look-back k completes order n = k + 1, whose K heads share this mix. */
        uint64_t mix = (uint64_t)ids[t] * (uint64_t)layer->multipliers[0];
        for (int64_t k = 1; k < N; k++) {
            const uint64_t tok = t - k >= 0 ? (uint64_t)ids[t - k] : pad;
            mix ^= tok * (uint64_t)layer->multipliers[k];
            const int64_t m = as_int64(mix), col0 = (k - 1) * K;
            for (int64_t j = 0; j < K; j++) {
                rows[col0 + j] = floor_mod(m, layer->primes[col0 + j]) + layer->offsets[col0 + j];
            }
            if (mix_out) mix_out[(t - start) * (N - 1) + (k - 1)] = m;
        }
    }
    return EK_OK;
}

/* ---------------------------------------------------------------- dequantization */

/* Little-endian u16 at p (no alignment assumed: GGUF rows are packed). */
static uint16_t load_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}

static float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint32_t f32_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/* IEEE half -> single, exact for every input like numpy's astype: subnormals become normal
 * floats, inf stays inf, NaN keeps its sign and payload (it is not quieted). Branch-free
 * (all three cases computed, one selected by masks) so that a row's conversion vectorizes. */
static float f16_to_f32(uint16_t h) {
    const uint32_t shifted = (uint32_t)(h & 0x7fffu) << 13; /* exponent + mantissa, f32 places */
    const uint32_t exp = shifted & 0x0f800000u;
    const uint32_t normal = shifted + (112u << 23);          /* rebias the exponent: 15 -> 127 */
    const uint32_t inf_nan = normal + (112u << 23);          /* exponent all ones, payload kept */
    /* zero / subnormal m * 2^-24: form 2^-14 * (1 + m/1024), subtract 2^-14 (exact) */
    const uint32_t small = f32_bits(f32_from_bits(normal + (1u << 23)) - 0x1p-14f);
    const uint32_t is_inf_nan = 0u - (uint32_t)(exp == 0x0f800000u); /* all ones or zero */
    const uint32_t is_small = 0u - (uint32_t)(exp == 0);
    const uint32_t bits = (inf_nan & is_inf_nan) | (small & is_small) |
                          (normal & ~(is_inf_nan | is_small));
    return f32_from_bits(bits | (uint32_t)(h & 0x8000u) << 16);
}

/* SIMD rows. On x86-64 with AVX2 + F16C (checked once per gather at run time, so the build
 * stays portable) F16 rows convert 8 values per vcvtph2ps and Q8_0 blocks 8 quants per
 * instruction; the arithmetic is the same IEEE single multiply as the scalar path, so results
 * are bit-identical. vcvtph2ps quiets signalling NaNs where numpy keeps the payload bits, so an
 * F16 row holding any NaN takes the exact scalar path from that block on. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EK_X86_SIMD 1
#include <immintrin.h>
__attribute__((target("avx2,f16c")))
static int64_t f16_row_simd(const uint8_t *src, int64_t dim, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));
        const __m128i em = _mm_and_si128(h, _mm_set1_epi16(0x7fff));
        if (_mm_movemask_epi8(_mm_cmpgt_epi16(em, _mm_set1_epi16(0x7c00)))) break;
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    return i;
}

/* The block's f16 scale converts with F16C too: a signalling-NaN scale comes out quiet, but the
 * multiply below would quiet it anyway, so the products are bit-identical to numpy's. */
__attribute__((target("avx2,f16c")))
static void q8_0_block_simd(const uint8_t *src, float *dst) {
    const __m256 vd = _mm256_set1_ps(_cvtsh_ss(load_u16(src)));
    for (int j = 0; j < 32; j += 8) {
        const __m128i q8 = _mm_loadl_epi64((const __m128i *)(const void *)(src + 2 + j));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(q, vd));
    }
}

static int cpu_simd(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
static int cpu_simd(void) {
    return 0;
}
#endif

static void f16_row(const uint8_t *src, int64_t dim, float *dst, int simd) {
    int64_t i = 0;
#ifdef EK_X86_SIMD
    if (simd) i = f16_row_simd(src, dim, dst);
#else
    (void)simd;
#endif
    for (; i < dim; i++) dst[i] = f16_to_f32(load_u16(src + 2 * i));
}

/* Two's-complement value of a byte, without implementation-defined casts. */
static int byte_to_int8(uint8_t b) {
    return (int)b - ((b & 0x80) << 1);
}

/* Dequantize one row of `dim` values (a multiple of the type's block) from src into dst. */
static void dequantize_row(int32_t qtype, const uint8_t *src, int64_t dim, float *dst, int simd) {
    switch (qtype) {
    case EK_F32:
        memcpy(dst, src, (size_t)dim * sizeof(float));
        break;
    case EK_F16:
        f16_row(src, dim, dst, simd);
        break;
    case EK_BF16:
        for (int64_t i = 0; i < dim; i++) dst[i] = f32_from_bits((uint32_t)load_u16(src + 2 * i) << 16);
        break;
    case EK_Q8_0: /* gguf-py: x * d, x = int8 as float32, d = f16 scale as float32 */
        for (int64_t b = 0; b < dim / 32; b++, src += 34, dst += 32) {
#ifdef EK_X86_SIMD
            if (simd) {
                q8_0_block_simd(src, dst);
                continue;
            }
#endif
            const float d = f16_to_f32(load_u16(src));
            for (int i = 0; i < 32; i++) dst[i] = (float)byte_to_int8(src[2 + i]) * d;
        }
        break;
    case EK_Q4_0: /* gguf-py: d * (q - 8); low nibbles are values 0..15, high nibbles 16..31 */
        for (int64_t b = 0; b < dim / 32; b++, src += 18, dst += 32) {
            const float d = f16_to_f32(load_u16(src));
            const uint8_t *qs = src + 2;
            for (int i = 0; i < 16; i++) {
                dst[i] = d * (float)((qs[i] & 0x0f) - 8);
                dst[i + 16] = d * (float)((qs[i] >> 4) - 8);
            }
        }
        break;
    default: /* unreachable: callers validate qtype first */
        break;
    }
}

#ifndef EK_PREFETCH_AHEAD
#define EK_PREFETCH_AHEAD 16
#endif
#if defined(__GNUC__) || defined(__clang__)
#define EK_PREFETCH(p) __builtin_prefetch(p)
#else
#define EK_PREFETCH(p) ((void)(p))
#endif

/* ---------------------------------------------------------------- tables and overrides */

/* Checks of a table that gather relies on; *row_bytes receives the bytes of one row. */
static int32_t table_check(const ek_table *table, int64_t *row_bytes) {
    int64_t block_size, block_bytes, need;
    if (table->n_rows < 0 || table->nbytes < 0 || table->dim < 1) return EK_ERR_ARG;
    if (!qtype_block(table->qtype, &block_size, &block_bytes) || table->dim % block_size != 0)
        return EK_ERR_QTYPE;
    /* Sizes beyond int64 exceed any buffer. */
    if (!mul_nonneg(table->dim / block_size, block_bytes, row_bytes) ||
        !mul_nonneg(table->n_rows, *row_bytes, &need))
        return EK_ERR_SIZE;
    if (need > 0 && !table->data) return EK_ERR_NULL;
    if (table->nbytes < need) return EK_ERR_SIZE;
    return EK_OK;
}

/* O(1) checks of an override set that keep gather's reads inside its buffers:
 * pointers, value type, and that `values` holds n rows of dim values. */
static int32_t override_shape_check(const ek_override *ov, int64_t dim) {
    int64_t row_bytes, need;
    if (ov->n < 0 || ov->nbytes < 0 || dim < 1) return EK_ERR_ARG;
    if (ov->qtype != EK_F32 && ov->qtype != EK_F16) return EK_ERR_QTYPE;
    row_bytes = ek_row_bytes(ov->qtype, dim); /* 0 only when dim's bytes overflow int64 */
    if (row_bytes == 0 || !mul_nonneg(ov->n, row_bytes, &need)) return EK_ERR_SIZE;
    if (ov->n > 0 && (!ov->rows || !ov->values)) return EK_ERR_NULL;
    if (ov->nbytes < need) return EK_ERR_SIZE;
    return EK_OK;
}

static int64_t entry_key(const ek_override *ov, int64_t i) {
    return ov->keys ? ov->keys[i] : EK_ANY_KEY;
}

static int64_t override_first(const ek_override *ov, int64_t row);

static int is_pow2(int64_t x) {
    return x > 0 && (x & (x - 1)) == 0;
}

int32_t ek_override_check(const ek_override *ov, int64_t n_rows, int64_t dim) {
    if (!ov) return EK_ERR_NULL;
    if (n_rows < 0) return EK_ERR_ARG;
    int32_t st = override_shape_check(ov, dim);
    if (st != EK_OK) return st;
    for (int64_t i = 0; i < ov->n; i++) {
        const int64_t row = ov->rows[i], key = entry_key(ov, i);
        if (row < 0 || row >= n_rows || key < EK_ANY_KEY) return EK_ERR_RANGE;
        /* Strictly ascending: a repeated (row, key) pair would make the winner ambiguous. */
        if (i > 0) {
            const int64_t prev_row = ov->rows[i - 1], prev_key = entry_key(ov, i - 1);
            if (row < prev_row || (row == prev_row && key <= prev_key)) return EK_ERR_UNSORTED;
        }
    }
    if (ov->index) {
        if (!is_pow2(ov->index_cap) || ov->index_cap / 2 < ov->n) return EK_ERR_ARG;
        for (int64_t i = 0; i < ov->n; i++) {
            if ((i == 0 || ov->rows[i] != ov->rows[i - 1]) && override_first(ov, ov->rows[i]) != i)
                return EK_ERR_ARG;
        }
    }
    return EK_OK;
}

/* First index i in [0, n) with (rows[i], keys[i]) >= (row, key), or n (std::lower_bound). */
static int64_t override_lower_bound(const ek_override *ov, int64_t row, int64_t key) {
    int64_t lo = 0, hi = ov->n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        const int64_t r = ov->rows[mid];
        if (r < row || (r == row && entry_key(ov, mid) < key)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Fibonacci hashing of a row id to a slot of a power-of-two index (high bits mix best). */
static uint64_t index_slot(int64_t row, int64_t cap) {
    const uint64_t h = (uint64_t)row * 0x9E3779B97F4A7C15ull;
    return (h ^ (h >> 29)) & (uint64_t)(cap - 1);
}

int32_t ek_override_index(const ek_override *ov, int64_t *slots, int64_t cap) {
    if (!ov || !slots) return EK_ERR_NULL;
    if (ov->n < 0 || !is_pow2(cap) || cap / 2 < ov->n) return EK_ERR_ARG;
    if (ov->n > 0 && !ov->rows) return EK_ERR_NULL;
    for (int64_t s = 0; s < cap; s++) slots[s] = -1;
    for (int64_t i = 0; i < ov->n; i++) {
        if (i > 0 && ov->rows[i] == ov->rows[i - 1]) continue;   /* index the first entry only */
        uint64_t s = index_slot(ov->rows[i], cap);
        while (slots[s] >= 0) s = (s + 1) & (uint64_t)(cap - 1);   /* load <= 1/2: terminates */
        slots[s] = i;
    }
    return EK_OK;
}

/* First entry of `row` in one set, or -1. With an index: probe from the row's slot until an
 * empty slot (at most index_cap probes, and every slot value is bounds-checked, so even a
 * damaged index cannot cause a bad read). Without: binary search. */
static int64_t override_first(const ek_override *ov, int64_t row) {
    if (ov->index) {
        const uint64_t mask = (uint64_t)(ov->index_cap - 1);
        uint64_t s = index_slot(row, ov->index_cap);
        for (int64_t probe = 0; probe < ov->index_cap; probe++, s = (s + 1) & mask) {
            const int64_t e = ov->index[s];
            if (e < 0 || e >= ov->n) return -1;
            if (ov->rows[e] == row) return e;
        }
        return -1;
    }
    const int64_t first = override_lower_bound(ov, row, EK_ANY_KEY);
    return first < ov->n && ov->rows[first] == row ? first : -1;
}

/* Entry of one set that serves the look-up (row, key), or -1: the entry keyed exactly `key`
 * if there is one, else the row's key -1 entry. Entries of a row are contiguous from its first
 * and a key -1 entry sorts first among them. A row has few entries (one per distinct written
 * N-gram that hashes there), so they are scanned. Reads stay within [0, n) even on an
 * unsorted set (which ek_override_check rejects): a bad set yields wrong rows, never a bad read. */
static int64_t override_find(const ek_override *ov, int64_t row, int64_t key) {
    const int64_t first = override_first(ov, row);
    if (first < 0) return -1;
    if (key != EK_ANY_KEY && ov->keys) {
        for (int64_t i = first; i < ov->n && ov->rows[i] == row; i++) {
            if (ov->keys[i] == key) return i;
            if (ov->keys[i] > key) break;
        }
    }
    return entry_key(ov, first) == EK_ANY_KEY ? first : -1;
}

int32_t ek_gather(const ek_table *table, const ek_override *ovs, int32_t n_ovs,
                  const int64_t *rows, const int64_t *keys, int64_t n,
                  float *out, int64_t out_cap, int64_t *n_hits) {
    int64_t row_bytes, out_need;
    if (!table) return EK_ERR_NULL;
    int32_t st = table_check(table, &row_bytes);
    if (st != EK_OK) return st;
    if (n_ovs < 0 || n < 0 || out_cap < 0) return EK_ERR_ARG;
    if (n_ovs > 0 && !ovs) return EK_ERR_NULL;
    for (int32_t s = 0; s < n_ovs; s++) {
        st = override_shape_check(&ovs[s], table->dim);
        if (st != EK_OK) return st;
    }
    if (!mul_nonneg(n, table->dim, &out_need)) return EK_ERR_CAPACITY;
    if (n > 0 && (!rows || !out)) return EK_ERR_NULL;
    if (out_cap < out_need) return EK_ERR_CAPACITY;
    for (int64_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= table->n_rows) return EK_ERR_RANGE;
    }

    const int64_t dim = table->dim;
    const int simd = cpu_simd();
    int64_t hits = 0;
    for (int64_t i = 0; i < n; i++) {
        /* Random rows of a big table are memory-latency bound: ask for a later row's line now. */
        if (i + EK_PREFETCH_AHEAD < n) {
            const int64_t ahead = rows[i + EK_PREFETCH_AHEAD];
            EK_PREFETCH(table->data + (size_t)ahead * (size_t)row_bytes);
            for (int32_t s = 0; s < n_ovs; s++) {
                if (ovs[s].index) EK_PREFETCH(ovs[s].index + index_slot(ahead, ovs[s].index_cap));
            }
        }
        const int64_t key = keys ? keys[i] : EK_ANY_KEY;
        float *dst = out + i * dim;
        int served = 0;
        /* Later sets were written later: search them first. */
        for (int32_t s = n_ovs - 1; s >= 0 && !served; s--) {
            const int64_t e = override_find(&ovs[s], rows[i], key);
            if (e < 0) continue;
            const size_t value_bytes = ovs[s].qtype == EK_F32 ? 4 : 2;
            dequantize_row(ovs[s].qtype, ovs[s].values + (size_t)e * (size_t)dim * value_bytes, dim, dst, simd);
            served = 1;
        }
        if (served) hits++;
        else dequantize_row(table->qtype, table->data + (size_t)rows[i] * (size_t)row_bytes, dim, dst, simd);
    }
    if (n_hits) *n_hits = hits;
    return EK_OK;
}
