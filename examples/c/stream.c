/* Streams tokens through a kvfold cache with the C API: two sink pairs and a window of 8 kept
 * exactly, older pairs folded into a running average, one query per token. Prints what a caller
 * can check: the tokens seen, the fixed size of the cache and the norm of the last output; then saves
 * the state, restores it into a new cache and checks that both answer the next query alike.
 * Exit status 0 when every call succeeded and the restored cache agrees. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "kvfold/kvfold.h"

#define HEADS 2       /* KV heads */
#define QUERY_HEADS 4 /* two query heads per KV head */
#define DIM 16        /* d_k = d_v */
#define TOKENS 100

/* Reproducible inputs in [-1, 1) from a linear congruential generator. */
static unsigned long seed = 12345;
static float uniform(void) {
    seed = (seed * 1103515245UL + 12345UL) & 0x7fffffffUL;
    return (float)seed / 1073741824.0f - 1.0f;
}
static void fill(float* x, int n) {
    int i;
    for (i = 0; i < n; ++i) x[i] = uniform();
}

static int check(kvfold_status status, const kvfold_cache* cache, const char* what) {
    if (status == KVFOLD_OK) return 0;
    fprintf(stderr, "%s failed (%s): %s\n", what, kvfold_status_name(status), kvfold_last_error(cache));
    return 1;
}

int main(void) {
    kvfold_config config;
    kvfold_rule rule;
    kvfold_cache *cache = NULL, *restored = NULL;
    float q[QUERY_HEADS * DIM], k[HEADS * DIM], v[HEADS * DIM];
    float out[QUERY_HEADS * DIM], again[QUERY_HEADS * DIM];
    int64_t length = 0;
    size_t nbytes = 0, state_size = 0;
    void* state = NULL;
    double norm = 0, difference = 0;
    int t, i;

    kvfold_config_init(&config);
    config.num_heads = HEADS;
    config.num_query_heads = QUERY_HEADS;
    config.head_dim = DIM;
    config.value_dim = DIM;
    config.window = 8;
    config.sinks = 2;
    memset(&rule, 0, sizeof(rule));
    rule.kind = "cumulative"; /* the running average of every pair pushed out of the window */
    if (check(kvfold_create(&config, &rule, &cache), NULL, "kvfold_create")) return 1;

    for (t = 0; t < TOKENS; ++t) {
        fill(q, QUERY_HEADS * DIM);
        fill(k, HEADS * DIM);
        fill(v, HEADS * DIM);
        if (check(kvfold_step(cache, q, k, v, out, NULL), cache, "kvfold_step")) return 1;
    }
    if (check(kvfold_lengths(cache, &length, 1), cache, "kvfold_lengths")) return 1;
    if (check(kvfold_nbytes(cache, &nbytes), cache, "kvfold_nbytes")) return 1;
    for (i = 0; i < QUERY_HEADS * DIM; ++i) norm += (double)out[i] * out[i];
    printf("kvfold %s (%s kernels)\n", kvfold_version(), kvfold_simd_backend());
    printf("length %ld\n", (long)length);
    printf("nbytes %lu\n", (unsigned long)nbytes);
    printf("output norm %.4f\n", sqrt(norm));

    /* Save, restore into a new cache, and ask both the same question. */
    if (check(kvfold_to_bytes_alloc(cache, &state, &state_size), cache, "kvfold_to_bytes_alloc")) return 1;
    if (check(kvfold_from_bytes(state, state_size, &restored), NULL, "kvfold_from_bytes")) return 1;
    kvfold_free_bytes(state);
    fill(q, QUERY_HEADS * DIM);
    if (check(kvfold_attend(cache, q, out), cache, "kvfold_attend")) return 1;
    if (check(kvfold_attend(restored, q, again), restored, "kvfold_attend")) return 1;
    for (i = 0; i < QUERY_HEADS * DIM; ++i) difference += fabs((double)out[i] - again[i]);
    printf("state %lu bytes, restored cache %s\n", (unsigned long)state_size, difference == 0 ? "agrees" : "DIFFERS");

    kvfold_free(restored);
    kvfold_free(cache);
    return difference == 0 ? 0 : 1;
}
