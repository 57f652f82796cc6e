/* test_engram.c — C-level tests of the native kernel (native/engram.h).
 *
 * Known values for small hashes, dequantization of hand-built blocks, override precedence,
 * and the status code of every kind of bad argument. Exits nonzero if any check fails.
 * Built and run by ctest; under AddressSanitizer + UBSan (also run by tests/test_c_sanitizers.py):
 *
 *   cmake -S . -B build-asan -DENGRAM_BUILD_TESTS=ON -DENGRAM_SANITIZE=ON
 *   cmake --build build-asan && ctest --test-dir build-asan --output-on-failure
 */
#include "engram.h"

#include <stdio.h>
#include <string.h>

#include "check.h"

CHECK_STATE;

#define COUNT(a) ((int64_t)(sizeof(a) / sizeof((a)[0])))

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* ---------------------------------------------------------------- row bytes */

static void test_row_bytes(void) {
    CHECK_EQ_I64(ek_row_bytes(EK_F32, 3), 12);
    CHECK_EQ_I64(ek_row_bytes(EK_F16, 3), 6);
    CHECK_EQ_I64(ek_row_bytes(EK_BF16, 5), 10);
    CHECK_EQ_I64(ek_row_bytes(EK_Q8_0, 64), 68);
    CHECK_EQ_I64(ek_row_bytes(EK_Q4_0, 32), 18);
    CHECK_EQ_I64(ek_row_bytes(EK_Q8_0, 33), 0);      /* not a multiple of the block */
    CHECK_EQ_I64(ek_row_bytes(3, 32), 0);            /* Q4_1: unsupported */
    CHECK_EQ_I64(ek_row_bytes(EK_F32, 0), 0);
    CHECK_EQ_I64(ek_row_bytes(EK_F32, -4), 0);
    CHECK_EQ_I64(ek_row_bytes(EK_F32, INT64_MAX), 0); /* bytes overflow int64 */
}

/* ---------------------------------------------------------------- canonical ids */

static void test_canonicalize(void) {
    const int64_t map[5] = {0, 0, 1, 2, 1};
    const int64_t raw[4] = {4, 0, 3, 2};
    int64_t out[4] = {-9, -9, -9, -9};
    CHECK(ek_canonicalize(map, 5, raw, 4, out, 4) == EK_OK);
    CHECK(out[0] == 1 && out[1] == 0 && out[2] == 2 && out[3] == 1);

    const int64_t bad_hi[2] = {1, 5}, bad_lo[2] = {-1, 1};
    int64_t keep[2] = {-9, -9};
    CHECK(ek_canonicalize(map, 5, bad_hi, 2, keep, 2) == EK_ERR_RANGE);
    CHECK(ek_canonicalize(map, 5, bad_lo, 2, keep, 2) == EK_ERR_RANGE);
    CHECK(keep[0] == -9 && keep[1] == -9); /* outputs untouched on error */
    CHECK(ek_canonicalize(map, 0, raw, 1, out, 4) == EK_ERR_RANGE); /* empty map */
    CHECK(ek_canonicalize(map, 5, raw, 4, out, 3) == EK_ERR_CAPACITY);
    CHECK(ek_canonicalize(NULL, 5, raw, 4, out, 4) == EK_ERR_NULL);
    CHECK(ek_canonicalize(map, 5, NULL, 4, out, 4) == EK_ERR_NULL);
    CHECK(ek_canonicalize(map, 5, raw, 4, NULL, 4) == EK_ERR_NULL);
    CHECK(ek_canonicalize(map, -1, raw, 4, out, 4) == EK_ERR_ARG);
    CHECK(ek_canonicalize(map, 5, raw, -1, out, 4) == EK_ERR_ARG);
    CHECK(ek_canonicalize(map, 5, raw, 4, out, -1) == EK_ERR_ARG);
    CHECK(ek_canonicalize(NULL, 0, NULL, 0, NULL, 0) == EK_OK); /* nothing to do */
}

/* ---------------------------------------------------------------- N-gram hashing */

/* N = 3, K = 2, multipliers {3, 5, 7}, pad 4. Worked by hand, e.g. position 0:
 * mix_2 = 1*3 ^ 4*5 = 23 -> 23 % 11 + 0 = 1, 23 % 13 + 11 = 21;
 * mix_3 = 23 ^ 4*7 = 11 -> 11 % 17 + 24 = 35, 11 % 19 + 41 = 52. */
static const int64_t small_mult[3] = {3, 5, 7};
static const int64_t small_primes[4] = {11, 13, 17, 19};
static const int64_t small_offsets[4] = {0, 11, 24, 41};

static ek_hash_layer small_layer(void) {
    ek_hash_layer layer = {3, 2, 10, 4, small_mult, small_primes, small_offsets};
    return layer;
}

static void test_hash_known_values(void) {
    const ek_hash_layer layer = small_layer();
    const int64_t ids[3] = {1, 2, 3};
    const int64_t want_rows[3][4] = {{1, 21, 35, 52}, {3, 14, 38, 53}, {3, 14, 28, 45}};
    const int64_t want_mix[3][2] = {{23, 11}, {3, 31}, {3, 4}};
    int64_t rows[3][4], mix[3][2];
    CHECK(ek_hash(&layer, ids, 3, 0, &rows[0][0], 12, &mix[0][0], 6) == EK_OK);
    CHECK(memcmp(rows, want_rows, sizeof rows) == 0);
    CHECK(memcmp(mix, want_mix, sizeof mix) == 0);

    /* Decoding: ids[0..2) are history, only position 2 is hashed; mix_out may be NULL. */
    int64_t last[4];
    CHECK(ek_hash(&layer, ids, 3, 2, last, 4, NULL, 0) == EK_OK);
    CHECK(memcmp(last, want_rows[2], sizeof last) == 0);

    /* Length 1 reads only pads behind it; start == n hashes nothing. */
    CHECK(ek_hash(&layer, ids, 1, 0, last, 4, NULL, 0) == EK_OK);
    CHECK(memcmp(last, want_rows[0], sizeof last) == 0);
    CHECK(ek_hash(&layer, ids, 3, 3, NULL, 0, NULL, 0) == EK_OK);
    CHECK(ek_hash(&layer, NULL, 0, 0, NULL, 0, NULL, 0) == EK_OK);
}

/* DeepSeek-V4.1 layer-1 multipliers (compressed vocab 99092, engram-architecture.md §3) with
 * the largest id: products stay below 2^63. Expected values from reference.hash_layer_ref. */
static void test_hash_deepseek_multipliers(void) {
    const int64_t mult[4] = {76632096046245, 4839876093313, 35959672319349, 73987337458391};
    const int64_t primes[3] = {1000003, 1000033, 1000037};
    const int64_t offsets[3] = {0, 1000003, 2000036};
    const ek_hash_layer layer = {4, 1, 99092, 2, mult, primes, offsets};
    const int64_t ids[4] = {99091, 0, 99091, 5};
    const int64_t want_rows[4][3] = {{502056, 1382578, 2939135}, {308877, 1561593, 2333995},
                                     {717096, 1418769, 2376937}, {464699, 1111343, 2866993}};
    const int64_t want_mix[4][3] = {
        {7593560043147289661, 7593631687600881367, 7593483884771580793},
        {479588161962478483, 479518519176515961, 479370682251343063},
        {7593551029318463295, 6346388002583515536, 6346241299525776446},
        {479222829893641386, 479222829893641386, 7140508979948129887}};
    int64_t rows[4][3], mix[4][3];
    CHECK(ek_hash(&layer, ids, 4, 0, &rows[0][0], 12, &mix[0][0], 12) == EK_OK);
    CHECK(memcmp(rows, want_rows, sizeof rows) == 0);
    CHECK(memcmp(mix, want_mix, sizeof mix) == 0);
}

/* A multiplier beyond DeepSeek's bound: the product wraps like numpy's int64 (2 * INT64_MAX
 * = -2) and the row is numpy's floor modulo: -2 mod 1009 = 1007, + offset 5. */
static void test_hash_wrapping(void) {
    const int64_t mult[2] = {INT64_MAX, 3}, primes[1] = {1009}, offsets[1] = {5};
    const ek_hash_layer layer = {2, 1, 100, 0, mult, primes, offsets};
    const int64_t ids[1] = {2};
    int64_t row = 0, mix = 0;
    CHECK(ek_hash(&layer, ids, 1, 0, &row, 1, &mix, 1) == EK_OK);
    CHECK_EQ_I64(mix, -2);
    CHECK_EQ_I64(row, 1012);
}

static void test_hash_errors(void) {
    const int64_t ids[3] = {1, 2, 3};
    int64_t rows[12], mix[6];
    for (int i = 0; i < 12; i++) rows[i] = -9;
    ek_hash_layer layer = small_layer();

    CHECK(ek_hash(NULL, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_NULL);
    CHECK(ek_hash(&layer, NULL, 3, 0, rows, 12, NULL, 0) == EK_ERR_NULL);
    CHECK(ek_hash(&layer, ids, 3, 0, NULL, 12, NULL, 0) == EK_ERR_NULL);
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 11, NULL, 0) == EK_ERR_CAPACITY);
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, mix, 5) == EK_ERR_CAPACITY);
    CHECK(ek_hash(&layer, ids, -1, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    CHECK(ek_hash(&layer, ids, 3, -1, rows, 12, NULL, 0) == EK_ERR_ARG);
    CHECK(ek_hash(&layer, ids, 3, 4, rows, 12, NULL, 0) == EK_ERR_ARG);
    CHECK(ek_hash(&layer, ids, 3, 0, rows, -1, NULL, 0) == EK_ERR_ARG);
    /* n * columns overflows int64: refused before any id is read */
    CHECK(ek_hash(&layer, ids, INT64_MAX / 2, 0, rows, 12, NULL, 0) == EK_ERR_CAPACITY);

    const int64_t big[3] = {1, 10, 3}, neg[3] = {1, -1, 3};
    CHECK(ek_hash(&layer, big, 3, 0, rows, 12, NULL, 0) == EK_ERR_RANGE); /* id == vocab */
    CHECK(ek_hash(&layer, neg, 3, 0, rows, 12, NULL, 0) == EK_ERR_RANGE);
    CHECK(ek_hash(&layer, big, 3, 2, rows, 12, NULL, 0) == EK_ERR_RANGE); /* in the history */

    layer.max_ngram = 1;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer = small_layer();
    layer.n_head = 0;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer = small_layer();
    layer.vocab = 0;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer = small_layer();
    layer.pad_id = 10;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer.pad_id = -1;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer = small_layer();
    layer.multipliers = NULL;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_NULL);
    layer = small_layer();
    layer.primes = NULL;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_NULL);
    layer = small_layer();
    layer.offsets = NULL;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_NULL);

    const int64_t zero_prime[4] = {11, 0, 17, 19}, neg_offset[4] = {0, -1, 24, 41};
    const int64_t huge_offset[4] = {0, INT64_MAX - 5, 24, 41}; /* + (13 - 1) overflows */
    layer = small_layer();
    layer.primes = zero_prime;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer = small_layer();
    layer.offsets = neg_offset;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);
    layer.offsets = huge_offset;
    CHECK(ek_hash(&layer, ids, 3, 0, rows, 12, NULL, 0) == EK_ERR_ARG);

    int untouched = 1;
    for (int i = 0; i < 12; i++) untouched &= rows[i] == -9;
    CHECK(untouched);
}

/* ---------------------------------------------------------------- dequantization */

static void test_dequant_f16(void) {
    /* 1, -2, smallest subnormal, largest subnormal, +inf, NaN with payload, -0, 65504 */
    const uint16_t halves[8] = {0x3c00, 0xc000, 0x0001, 0x03ff, 0x7c00, 0xfc01, 0x8000, 0x7bff};
    const uint32_t want[8] = {0x3f800000, 0xc0000000, 0x33800000, 0x387fc000,
                              0x7f800000, 0xff802000, 0x80000000, 0x477fe000};
    uint8_t bytes[16];
    for (int i = 0; i < 8; i++) {
        bytes[2 * i] = (uint8_t)(halves[i] & 0xff);
        bytes[2 * i + 1] = (uint8_t)(halves[i] >> 8);
    }
    const ek_table table = {bytes, 16, EK_F16, 1, 8};
    const int64_t row = 0;
    float out[8];
    CHECK(ek_gather(&table, NULL, 0, &row, NULL, 1, out, 8, NULL) == EK_OK);
    for (int i = 0; i < 8; i++) CHECK(bits_of(out[i]) == want[i]);
}

static void test_dequant_bf16_f32(void) {
    const uint8_t bf16[4] = {0x80, 0x3f, 0x81, 0xff}; /* 0x3f80 = 1.0, 0xff81 = NaN payload */
    const ek_table table = {bf16, 4, EK_BF16, 1, 2};
    const int64_t row = 0;
    float out[2];
    CHECK(ek_gather(&table, NULL, 0, &row, NULL, 1, out, 2, NULL) == EK_OK);
    CHECK(bits_of(out[0]) == 0x3f800000u && bits_of(out[1]) == 0xff810000u);

    const float values[2][2] = {{1.5f, -0.25f}, {3.0f, 7.0f}};
    const ek_table f32 = {(const uint8_t *)values, sizeof values, EK_F32, 2, 2};
    const int64_t rows[2] = {1, 0};
    float got[4];
    CHECK(ek_gather(&f32, NULL, 0, rows, NULL, 2, got, 4, NULL) == EK_OK);
    CHECK(got[0] == 3.0f && got[1] == 7.0f && got[2] == 1.5f && got[3] == -0.25f);
}

static void test_dequant_q8_0(void) {
    uint8_t block[34];
    block[0] = 0x00; /* d = f16 0x3800 = 0.5 */
    block[1] = 0x38;
    for (int i = 0; i < 32; i++) block[2 + i] = (uint8_t)(i * 8 - 128 + (i == 31 ? 7 : 0));
    const ek_table table = {block, 34, EK_Q8_0, 1, 32};
    const int64_t row = 0;
    float out[32];
    CHECK(ek_gather(&table, NULL, 0, &row, NULL, 1, out, 32, NULL) == EK_OK);
    for (int i = 0; i < 32; i++) {
        const int q = i * 8 - 128 + (i == 31 ? 7 : 0); /* -128 .. 127 */
        CHECK(out[i] == (float)q * 0.5f);
    }
}

static void test_dequant_q4_0(void) {
    uint8_t block[18];
    block[0] = 0x00; /* d = f16 0x4000 = 2.0 */
    block[1] = 0x40;
    for (int i = 0; i < 16; i++) block[2 + i] = (uint8_t)(i | ((15 - i) << 4));
    const ek_table table = {block, 18, EK_Q4_0, 1, 32};
    const int64_t row = 0;
    float out[32];
    CHECK(ek_gather(&table, NULL, 0, &row, NULL, 1, out, 32, NULL) == EK_OK);
    for (int i = 0; i < 16; i++) {
        CHECK(out[i] == 2.0f * (float)(i - 8));             /* low nibbles: values 0..15 */
        CHECK(out[i + 16] == 2.0f * (float)(15 - i - 8));   /* high nibbles: values 16..31 */
    }
}

/* ---------------------------------------------------------------- overrides */

/* Base table: 4 rows of 2 floats, row r = {10r, 10r + 1}. */
static const float base_values[4][2] = {{0, 1}, {10, 11}, {20, 21}, {30, 31}};
/* Set 0 (F32): row 1 any key -> A, row 2 any key -> B, row 2 key 7 -> C. */
static const int64_t set0_rows[3] = {1, 2, 2};
static const int64_t set0_keys[3] = {-1, -1, 7};
static const float set0_values[3][2] = {{100, 101}, {200, 201}, {700, 701}};
/* Set 1 (F16): row 2 key 9 -> D = {1.0, -2.0}. */
static const int64_t set1_rows[1] = {2};
static const int64_t set1_keys[1] = {9};
static const uint8_t set1_values[4] = {0x00, 0x3c, 0x00, 0xc0};

static ek_table base_table(void) {
    ek_table table = {(const uint8_t *)base_values, sizeof base_values, EK_F32, 4, 2};
    return table;
}

static void make_sets(ek_override sets[2]) {
    const ek_override s0 = {set0_rows, set0_keys, (const uint8_t *)set0_values,
                            sizeof set0_values, EK_F32, 3};
    const ek_override s1 = {set1_rows, set1_keys, set1_values, sizeof set1_values, EK_F16, 1};
    sets[0] = s0;
    sets[1] = s1;
}

static void test_override_precedence(void) {
    const ek_table table = base_table();
    ek_override sets[2];
    make_sets(sets);
    CHECK(ek_override_check(&sets[0], 4, 2) == EK_OK);
    CHECK(ek_override_check(&sets[1], 4, 2) == EK_OK);

    /* (row, key) look-ups and who serves them */
    const int64_t rows[7] = {0, 1, 2, 2, 2, 3, 2};
    const int64_t keys[7] = {-1, 5, 7, 9, 8, 9, -1};
    const float want[7][2] = {
        {0, 1},       /* no entry for row 0: base */
        {100, 101},   /* set 0's key -1 entry applies to any key */
        {700, 701},   /* set 0's exact key beats its key -1 entry */
        {1, -2},      /* set 1 (later) keyed 9 wins over set 0 */
        {200, 201},   /* key 8: set 1 does not match, set 0's key -1 entry does */
        {30, 31},     /* row 3: base */
        {200, 201}};  /* a look-up without key: only key -1 entries apply */
    float out[7][2];
    int64_t hits = -1;
    CHECK(ek_gather(&table, sets, 2, rows, keys, 7, &out[0][0], 14, &hits) == EK_OK);
    CHECK(memcmp(out, want, sizeof out) == 0);
    CHECK_EQ_I64(hits, 5);

    /* keys == NULL: every look-up is key-less. */
    CHECK(ek_gather(&table, sets, 2, rows, NULL, 7, &out[0][0], 14, &hits) == EK_OK);
    CHECK(out[2][0] == 200 && out[3][0] == 200 && out[1][0] == 100 && out[0][0] == 0);
    CHECK_EQ_I64(hits, 5); /* row 1 and the four look-ups of row 2 */

    /* Zero sets: the base table. A set with keys == NULL: every entry is key -1. */
    CHECK(ek_gather(&table, NULL, 0, rows, keys, 7, &out[0][0], 14, &hits) == EK_OK);
    CHECK(out[2][0] == 20 && out[3][1] == 21);
    CHECK_EQ_I64(hits, 0);
    const int64_t any_rows[1] = {3};
    const ek_override unkeyed = {any_rows, NULL, (const uint8_t *)set0_values, 8, EK_F32, 1};
    CHECK(ek_override_check(&unkeyed, 4, 2) == EK_OK);
    CHECK(ek_gather(&table, &unkeyed, 1, rows, keys, 7, &out[0][0], 14, NULL) == EK_OK);
    CHECK(out[5][0] == 100 && out[5][1] == 101 && out[0][0] == 0);

    /* Rows at both table ends. */
    const int64_t ends[2] = {3, 0};
    CHECK(ek_gather(&table, NULL, 0, ends, NULL, 2, &out[0][0], 4, NULL) == EK_OK);
    CHECK(out[0][0] == 30 && out[1][1] == 1);
}

static void test_override_check_errors(void) {
    ek_override sets[2];
    make_sets(sets);
    ek_override ov = sets[0];
    CHECK(ek_override_check(NULL, 4, 2) == EK_ERR_NULL);
    CHECK(ek_override_check(&ov, -1, 2) == EK_ERR_ARG);
    CHECK(ek_override_check(&ov, 4, 0) == EK_ERR_ARG);
    CHECK(ek_override_check(&ov, 2, 2) == EK_ERR_RANGE);   /* row 2 >= n_rows */
    CHECK(ek_override_check(&ov, 4, 3) == EK_ERR_SIZE);    /* 3 entries x 3 floats > buffer */

    ov.nbytes -= 1;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_SIZE);
    ov = sets[0];
    ov.qtype = EK_Q8_0;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_QTYPE);
    ov = sets[0];
    ov.rows = NULL;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_NULL);
    ov = sets[0];
    ov.values = NULL;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_NULL);
    ov = sets[0];
    ov.n = -1;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_ARG);

    const int64_t desc_rows[3] = {2, 1, 1}, dup_keys[3] = {-1, 7, 7}, low_key[3] = {-1, -2, 7};
    ov = sets[0];
    ov.rows = desc_rows;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_UNSORTED);
    ov = sets[0];
    ov.keys = dup_keys;                                     /* (2, 7) twice */
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_UNSORTED);
    ov.keys = low_key;
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_RANGE);   /* keys below -1 */
    ov = sets[0];
    ov.keys = NULL;                                         /* row 2 twice, both key -1 */
    CHECK(ek_override_check(&ov, 4, 2) == EK_ERR_UNSORTED);

    const ek_override empty = {NULL, NULL, NULL, 0, EK_F16, 0};
    CHECK(ek_override_check(&empty, 0, 1) == EK_OK);
}

/* ---------------------------------------------------------------- gather errors */

static void test_gather_errors(void) {
    ek_table table = base_table();
    ek_override sets[2];
    make_sets(sets);
    const int64_t rows[2] = {0, 3};
    float out[4] = {-9, -9, -9, -9};
    int64_t hits = -9;

    CHECK(ek_gather(NULL, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_NULL);
    CHECK(ek_gather(&table, NULL, 0, NULL, NULL, 2, out, 4, NULL) == EK_ERR_NULL);
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, NULL, 4, NULL) == EK_ERR_NULL);
    CHECK(ek_gather(&table, NULL, 1, rows, NULL, 2, out, 4, NULL) == EK_ERR_NULL);
    CHECK(ek_gather(&table, NULL, -1, rows, NULL, 2, out, 4, NULL) == EK_ERR_ARG);
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, -1, out, 4, NULL) == EK_ERR_ARG);
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, -1, NULL) == EK_ERR_ARG);
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 3, NULL) == EK_ERR_CAPACITY);
    /* n * dim overflows int64: refused before any row is read */
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, INT64_MAX / 2 + 1, out, 4, NULL) == EK_ERR_CAPACITY);

    const int64_t past_end[2] = {0, 4}, negative[2] = {-1, 0};
    CHECK(ek_gather(&table, sets, 2, past_end, NULL, 2, out, 4, &hits) == EK_ERR_RANGE);
    CHECK(ek_gather(&table, sets, 2, negative, NULL, 2, out, 4, &hits) == EK_ERR_RANGE);

    ek_override bad = sets[0];
    bad.nbytes = 8; /* 3 entries need 24 bytes */
    CHECK(ek_gather(&table, &bad, 1, rows, NULL, 2, out, 4, NULL) == EK_ERR_SIZE);
    bad = sets[0];
    bad.qtype = EK_BF16;
    CHECK(ek_gather(&table, &bad, 1, rows, NULL, 2, out, 4, NULL) == EK_ERR_QTYPE);

    table.nbytes -= 1;
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_SIZE);
    table = base_table();
    table.qtype = 3;
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_QTYPE);
    table = base_table();
    table.qtype = EK_Q8_0; /* dim 2 is not a multiple of 32 */
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_QTYPE);
    table = base_table();
    table.dim = 0;
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_ARG);
    table = base_table();
    table.n_rows = -1;
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_ARG);
    table = base_table();
    table.data = NULL;
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_NULL);
    table = base_table();
    table.n_rows = INT64_MAX; /* n_rows * row bytes overflows: no buffer can be that big */
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_SIZE);
    table = base_table();
    table.dim = INT64_MAX / 2; /* the bytes of one row overflow int64 */
    table.n_rows = 0;
    CHECK(ek_gather(&table, NULL, 0, rows, NULL, 2, out, 4, NULL) == EK_ERR_SIZE);

    CHECK(out[0] == -9 && out[3] == -9 && hits == -9); /* outputs untouched on error */
    table = base_table();
    CHECK(ek_gather(&table, NULL, 0, NULL, NULL, 0, NULL, 0, &hits) == EK_OK);
    CHECK_EQ_I64(hits, 0);
}

int main(void) {
    test_row_bytes();
    test_canonicalize();
    test_hash_known_values();
    test_hash_deepseek_multipliers();
    test_hash_wrapping();
    test_hash_errors();
    test_dequant_f16();
    test_dequant_bf16_f32();
    test_dequant_q8_0();
    test_dequant_q4_0();
    test_override_precedence();
    test_override_check_errors();
    test_gather_errors();
    printf("%d checks, %d failed\n", n_checks, n_failed);
    return n_failed != 0;
}
