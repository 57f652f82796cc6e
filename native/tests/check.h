/* check.h — the check macros shared by the C tests (test_engram.c, test_runtime.c).
 *
 * Each test file defines `static int n_checks, n_failed;` through CHECK_STATE and returns
 * nonzero from main when n_failed > 0.
 */
#ifndef ENGRAM_TESTS_CHECK_H
#define ENGRAM_TESTS_CHECK_H

#include <stdint.h>
#include <stdio.h>

#define CHECK_STATE static int n_checks, n_failed

#define CHECK(cond)                                                                  \
    do {                                                                             \
        n_checks++;                                                                  \
        if (!(cond)) {                                                               \
            n_failed++;                                                              \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_EQ_I64(a, b) CHECK((int64_t)(a) == (int64_t)(b))

#endif
