/* engram.h — the contract between engram_local (Python) and its native kernel.
 *
 * Everything the kernel does is declared here; engram_local/native.py is the only Python
 * module that calls it. The block between EK_CDEF_BEGIN and EK_CDEF_END is read verbatim by
 * native/ffi_build.py as the cffi cdef, so it holds plain declarations only (no macros,
 * no preprocessor lines).
 *
 * Conventions (llama2.c style): no globals, no exit(), every function returns an ek_status,
 * outputs go to caller-owned buffers whose capacities (in elements) are passed in and checked.
 * No function allocates or touches Python objects, so callers may release the GIL.
 */
#ifndef ENGRAM_H
#define ENGRAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* EK_CDEF_BEGIN */

/* ---------------------------------------------------------------- status codes */
enum ek_status {
    EK_OK = 0,
    EK_ERR_NULL = 1,      /* a required pointer is NULL */
    EK_ERR_ARG = 2,       /* a size or configuration value is invalid */
    EK_ERR_RANGE = 3,     /* an id or row index lies outside its valid range */
    EK_ERR_QTYPE = 4,     /* unsupported tensor type, or row width not a multiple of its block */
    EK_ERR_CAPACITY = 5,  /* an output buffer is too small */
    EK_ERR_UNSORTED = 6,  /* override rows are not ascending by (row, key) */
    EK_ERR_SIZE = 7       /* a data buffer is shorter than its declared shape needs */
};

/* ---------------------------------------------------------------- tensor types (ggml ids) */
enum ek_qtype {
    EK_F32 = 0,
    EK_F16 = 1,
    EK_Q4_0 = 2,
    EK_Q8_0 = 8,
    EK_BF16 = 30
};

/* Bytes of one row of `dim` values in `qtype`; 0 when the type is unsupported or `dim` is not
 * a multiple of the type's block size. */
int64_t ek_row_bytes(int32_t qtype, int64_t dim);

/* ---------------------------------------------------------------- canonical ids
 * out[i] = map[raw[i]] (DeepSeek CompressedTokenizer semantics: a precomputed surjective
 * raw -> canonical map). Every raw id must lie in [0, map_len). */
int32_t ek_canonicalize(const int64_t *map, int64_t map_len,
                        const int64_t *raw, int64_t n,
                        int64_t *out, int64_t out_cap);

/* ---------------------------------------------------------------- N-gram hashing
 * One Engram layer's hash constants (engram-architecture.md §2-§4). Orders n = 2..max_ngram,
 * n_head heads per order; head j of order n is column (n-2)*n_head + j. */
typedef struct {
    int32_t max_ngram;            /* N >= 2 */
    int32_t n_head;               /* K >= 1 */
    int64_t vocab;                /* canonical vocabulary size: ids must lie in [0, vocab) */
    int64_t pad_id;               /* canonical id used for positions before the sequence start */
    const int64_t *multipliers;   /* [N] odd multipliers, one per look-back k */
    const int64_t *primes;        /* [(N-1)*K] per-head table sizes */
    const int64_t *offsets;       /* [(N-1)*K] per-head first row in the layer's table */
} ek_hash_layer;

/* Hash positions [start, n) of the canonical ids `ids[0..n)`: positions before 0 read pad_id,
 * so a caller decoding token by token passes its last N-1 ids as history and start = their
 * count. For each hashed position t (output row t-start):
 *   mix_n   = XOR_{k<n} ids[t-k] * multipliers[k]        (int64, rolling)
 *   rows    [t-start, (n-2)*K + j] = mix_n mod primes[(n-2)*K + j] + offsets[(n-2)*K + j]
 *   mix_out [t-start, n-2]         = mix_n                  (mix_out may be NULL)
 * rows_cap and mix_cap are capacities in elements. */
int32_t ek_hash(const ek_hash_layer *layer, const int64_t *ids, int64_t n, int64_t start,
                int64_t *rows_out, int64_t rows_cap, int64_t *mix_out, int64_t mix_cap);

/* ---------------------------------------------------------------- tables and overrides */
typedef struct {
    const uint8_t *data;  /* n_rows * ek_row_bytes(qtype, dim) bytes, e.g. a GGUF mmap view */
    int64_t nbytes;       /* bytes available at data */
    int32_t qtype;        /* EK_F32, EK_F16, EK_BF16, EK_Q8_0 or EK_Q4_0 */
    int64_t n_rows;
    int64_t dim;
} ek_table;

/* One override set: replacement rows for some global row ids of one table. Entries are
 * ascending by (row, key). An entry whose key is -1 applies to every look-up of its row; an
 * entry with key >= 0 applies only to a look-up that carries exactly that key (the 64-bit
 * N-gram mix of the position it was written for), so it never fires on a hash collision. */
typedef struct {
    const int64_t *rows;    /* [n] global row ids */
    const int64_t *keys;    /* [n] exact keys, -1 for "any"; NULL means every key is -1 */
    const uint8_t *values;  /* [n, dim] in qtype */
    int64_t nbytes;         /* bytes available at values */
    int32_t qtype;          /* EK_F32 or EK_F16 */
    int64_t n;
    const int64_t *index;   /* [index_cap] row index from ek_override_index, or NULL (then rows
                               are found by binary search, O(log n) per look-up) */
    int64_t index_cap;      /* slots of index: a power of two >= 2n; 0 without an index */
} ek_override;

/* Build an override set's row index into the caller's slots[cap] (cap a power of two >= 2*n):
 * an open-addressing hash from row id to the row's first entry, so a look-up costs O(1)
 * expected instead of a binary search. Set ov->index = slots, ov->index_cap = cap afterwards.
 * The set must already pass ek_override_check. */
int32_t ek_override_index(const ek_override *ov, int64_t *slots, int64_t cap);

/* Validate an override set against a table of n_rows x dim: ordering, ranges, sizes, and (when
 * present) that its index finds every row. */
int32_t ek_override_check(const ek_override *ov, int64_t n_rows, int64_t dim);

/* Gather rows[i] (i < n) into out[i, 0..dim) as float32, dequantized bit-exactly as
 * gguf.quants.dequantize does. Override sets are searched from the last to the first; the
 * first applicable entry wins (within a set, a keyed entry that matches beats a key -1 entry);
 * a row with no applicable entry comes from the base table. keys[i] is the look-up's key
 * (keys may be NULL: then only key -1 entries apply). n_hits, when not NULL, receives the
 * number of look-ups served by an override. out_cap is in floats. */
int32_t ek_gather(const ek_table *table, const ek_override *ovs, int32_t n_ovs,
                  const int64_t *rows, const int64_t *keys, int64_t n,
                  float *out, int64_t out_cap, int64_t *n_hits);

/* ================================================================ Engram runtime (engram_runtime.c)
 * The whole Engram term of one layer, and the llama.cpp eval callback that adds it to the
 * residual stream. Per-sequence state lives in caller-owned buffers: the canonical id of every
 * position and, per layer, the normalised gated value x of every position (the short conv's
 * history), so rolling a sequence back to any position p is just "n_past = p". */

/* One Engram layer: hash constants, table + override stack, and float32 weights.
 * Weights are stored transposed for contiguous, vectorisable matvecs: w_k_t[j*hidden + d] =
 * W_K[d, j] (torch's Linear weight is [hidden, mem_dim]); conv_t[i*hidden + d] = conv[d, 0, i]. */
typedef struct {
    ek_hash_layer hash;
    ek_table table;             /* row width table.dim = d_head */
    const ek_override *ovs;     /* [n_ovs] override sets, later ones win (ek_engram_forward, and
                                   the runtime's sequences that have no stack of their own) */
    int32_t n_ovs;
    int64_t hidden;             /* D */
    int64_t mem_dim;            /* E = (max_ngram-1) * n_head * table.dim */
    const float *w_k_t;         /* [E, D] */
    const float *w_v_t;         /* [E, D] */
    const float *norm_q;        /* [D] RMSNorm scale on the hidden state */
    const float *norm_k;        /* [D] RMSNorm scale on the key */
    const float *norm_v;        /* [D] RMSNorm scale on the gated value */
    const float *conv_t;        /* [kernel, D] depthwise causal conv taps */
    int32_t kernel;             /* conv taps (>= 1) */
    int32_t dilation;           /* conv dilation (>= 1; = max_ngram) */
    float eps;                  /* RMSNorm epsilon */
} ek_engram_layer;

/* One sequence's override sets for one Engram layer (its user's memory), later sets win. The
 * sets point into memory the caller keeps alive (e.g. an .eov mmap): nothing is copied. */
typedef struct {
    const ek_override *ovs;     /* [n_ovs]; may be NULL when n_ovs = 0 */
    int32_t n_ovs;
} ek_stack;

/* Scratch a forward of n_tokens positions needs: *n_i64 int64 and *n_f32 float elements
 * (the same for ek_engram_forward and ek_engram_forward_batch). */
int32_t ek_engram_scratch(const ek_engram_layer *layer, int64_t n_tokens,
                          int64_t *n_i64, int64_t *n_f32);

/* The Engram term y [n_tokens, D] of positions p_t = ids_start + t, exactly EngramLayer.forward
 * of engram_local/model.py:
 *   e = gather(hash(ids)), k = W_K e, v = W_V e,
 *   a = sigmoid(ssqrt(<RMSNorm_q(h), RMSNorm_k(k)> / sqrt(D))), ssqrt(g) = sign(g) sqrt(max(|g|, 1e-6)),
 *   x = RMSNorm_v(a v), y = SiLU(causal dilated depthwise conv over x) + a v.
 * h [n_tokens, D]. ids [n_ids] canonical ids: the current tokens are ids[ids_start ..
 * ids_start + n_tokens), the entries before ids_start the history the N-gram hash reads (it
 * reads pad_id before ids[0]; only the last max_ngram-1 history ids matter).
 * xs [xs_rows, D]: the x of earlier positions; rows [xs_start, xs_start + n_tokens) are written,
 * rows before xs_start are the conv's history (rows before 0 read as zero).
 * Rows come from the layer's own override stack (layer->ovs) over its table.
 * y_cap is in floats. n_hits (may be NULL) receives the look-ups served by an override. */
int32_t ek_engram_forward(const ek_engram_layer *layer, const float *h, int64_t n_tokens,
                          const int64_t *ids, int64_t n_ids, int64_t ids_start,
                          float *xs, int64_t xs_rows, int64_t xs_start,
                          float *y, int64_t y_cap,
                          int64_t *scratch_i64, int64_t cap_i64,
                          float *scratch_f32, int64_t cap_f32, int64_t *n_hits);

/* One sequence's run of consecutive tokens in a batch (ek_engram_forward_batch): the meaning of
 * ids, n_ids, ids_start, xs, xs_rows and xs_start is that of ek_engram_forward's arguments;
 * stack is the sequence's override sets (the layer's own set list is not used). */
typedef struct {
    int64_t n;                  /* tokens (>= 1): the next n rows of the batch */
    const int64_t *ids;
    int64_t n_ids;
    int64_t ids_start;
    float *xs;
    int64_t xs_rows;
    int64_t xs_start;
    ek_stack stack;
} ek_segment;

/* The Engram term of a batch of several sequences: h [n_tokens, D] holds segs[0]'s tokens, then
 * segs[1]'s, ... (the n of all segments sum to n_tokens). Row for row, y equals what
 * ek_engram_forward gives each segment alone with its stack as the layer's override sets (bit
 * for bit), but the projections read the weights once for the whole batch. */
int32_t ek_engram_forward_batch(const ek_engram_layer *layer, const float *h, int64_t n_tokens,
                                const ek_segment *segs, int32_t n_segs,
                                float *y, int64_t y_cap,
                                int64_t *scratch_i64, int64_t cap_i64,
                                float *scratch_f32, int64_t cap_f32, int64_t *n_hits);

/* The ggml entry points the eval callback uses, taken from the libggml-base that llama.cpp
 * loaded (the extension never links llama.cpp). */
typedef struct {
    const char *(*get_name)(void *tensor);
    int64_t (*nelements)(void *tensor);
    size_t (*nbytes)(void *tensor);
    void (*tensor_get)(void *tensor, void *data, size_t offset, size_t size);
    void (*tensor_set)(void *tensor, const void *data, size_t offset, size_t size);
    bool (*is_contiguous)(void *tensor);
} ek_ggml_api;

/* One sequence of the llama.cpp backend (llama.cpp's seq_id = its index in ek_runtime.seqs).
 * The caller owns the buffers; n_past, n_pending and batch_row belong to the runtime. */
typedef struct {
    int64_t *ids;                    /* [n_ctx] canonical id of every position */
    float *xs;                       /* [n_layers, n_ctx, D] x of every position, per layer */
    const ek_stack *stacks;          /* [n_layers] this sequence's override sets per layer, or
                                        NULL: each layer's own (ek_engram_layer.ovs). Set with
                                        ek_runtime_set_stacks (validated there) */
    int64_t n_past;                  /* committed positions */
    int64_t n_pending;               /* its tokens in the batch being decoded */
    int64_t batch_row;               /* the batch row of the first of them */
} ek_seq;

/* The Engram state of a llama.cpp context decoding up to n_seqs sequences together. The caller
 * owns every buffer. Per llama_decode call: ek_runtime_begin(tokens and seq id of every batch
 * row) -> llama_decode -> ek_runtime_commit. The callback fires once per Engram layer per
 * ubatch, so a batch must fit one ubatch (n_ubatch >= n_batch >= tokens per decode) and
 * llama.cpp must keep the batch's order in it (a unified KV cache: split_simple). Each
 * sequence's tokens form one run of consecutive batch rows and continue it at n_past. Any
 * failure sets status/error and cancels the graph; the state then stays failed (every later
 * call refuses) until ek_runtime_reset (which forgets every sequence). */
typedef struct {
    ek_ggml_api ggml;
    const ek_engram_layer *layers;   /* [n_layers] */
    const int32_t *inject;           /* [n_layers] decoder layer each adds to: node l_out-(L-1), embd for L = 0 */
    int32_t n_layers;
    const int64_t *canonical_map;    /* [map_len] raw token id -> canonical id */
    int64_t map_len;
    int64_t n_ctx;                   /* positions each sequence's logs hold */
    ek_seq *seqs;                    /* [n_seqs] */
    int32_t n_seqs;
    int32_t *batch_seqs;             /* [n_seqs] the pending batch's sequences, in batch order */
    int32_t n_batch_seqs;
    ek_segment *segs;                /* [n_seqs] the callback's segment list */
    int32_t *fired;                  /* [n_layers] callbacks of the current batch */
    int64_t max_tokens;              /* most tokens per batch the scratch holds */
    int64_t *scratch_i64;
    int64_t cap_i64;
    float *scratch_f32;
    int64_t cap_f32;
    int64_t n_pending;               /* tokens of the batch being decoded */
    int32_t status;                  /* EK_OK, or the first error */
    int32_t enabled;                 /* 0: the callback asks for nothing (plain backbone) */
    int64_t n_calls;                 /* Engram layer evaluations */
    int64_t n_hits;                  /* look-ups served by an override */
    char error[256];                 /* what went wrong, NUL-terminated */
} ek_runtime;

/* Scratch elements a runtime needs for batches of up to max_tokens tokens (reads rt->layers,
 * rt->n_layers and rt->max_tokens only). */
int32_t ek_runtime_scratch(const ek_runtime *rt, int64_t *n_i64, int64_t *n_f32);
/* Check a runtime's configuration and buffers (sizes against the layers, every sequence's
 * stacks); resets its state. */
int32_t ek_runtime_init(ek_runtime *rt);
/* Forget every sequence: n_past = n_pending = 0, status cleared. */
void ek_runtime_reset(ek_runtime *rt);
/* Roll sequence seq back to its first n positions (n <= its n_past; 0 forgets it). A pending
 * batch is dropped. */
int32_t ek_runtime_truncate(ek_runtime *rt, int32_t seq, int64_t n);
/* Give sequence seq the override sets stacks[n_layers] (NULL: the layers' own), each set checked
 * against its layer's table (ek_override_check). Refused while a batch is pending. A refusal
 * changes nothing and fails nothing. The stacks must outlive their use. */
int32_t ek_runtime_set_stacks(ek_runtime *rt, int32_t seq, const ek_stack *stacks);
/* Announce the next llama_decode batch: raw token ids and their sequences (seq_ids NULL: all
 * sequence 0); each sequence's tokens continue it at its n_past. */
int32_t ek_runtime_begin(ek_runtime *rt, const int32_t *tokens, const int32_t *seq_ids, int64_t n);
/* After a successful llama_decode: every Engram layer must have fired once; each sequence of
 * the batch advances by its tokens. */
int32_t ek_runtime_commit(ek_runtime *rt);
/* Abandon the pending batch (llama_decode failed): every n_past stays. */
void ek_runtime_abort(ek_runtime *rt);

/* llama.cpp's cb_eval (ggml_backend_sched_eval_callback), user_data = an ek_runtime. Asks only
 * for the Engram layers' input nodes; on each, adds the Engram term to the tensor in place. */
bool ek_eval_callback(void *tensor, bool ask, void *user_data);

/* EK_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* ENGRAM_H */
