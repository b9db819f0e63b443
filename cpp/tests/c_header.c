/* kvfold.h must stay plain C: the native tests compile this file as C89 and as C99 (with
 * -pedantic-errors where the compiler has it) and run the function below. */
#include "kvfold/kvfold.h"

#include <string.h>

/* Streams three tokens through a one-head cache through the C API alone; 0 when every call did
 * what it should. */
int kvfold_c_header_smoke(void) {
    kvfold_config config;
    kvfold_param alpha;
    kvfold_rule rule;
    kvfold_options options;
    kvfold_cache* cache = NULL;
    double alpha_value = 0.5;
    int64_t positions[1], last = -1;
    float q[4] = {1, 0, 0, 0}, k[4] = {0.5f, 0.5f, 0, 0}, v[2] = {1, 2}, out[2] = {0, 0};
    int64_t length = 0;
    int t, failures = 0;

    kvfold_config_init(&config);
    config.head_dim = 4;
    config.value_dim = 2;
    config.window = 1;
    alpha.name = "alpha";
    alpha.data = &alpha_value;
    alpha.shape = NULL;
    alpha.ndim = 0;
    memset(&rule, 0, sizeof(rule));
    rule.kind = "ema";
    rule.params = &alpha;
    rule.num_params = 1;
    if (kvfold_create(&config, &rule, &cache) != KVFOLD_OK) return 1;
    for (t = 0; t < 3; ++t)
        if (kvfold_step(cache, q, k, v, out, NULL) != KVFOLD_OK) ++failures;
    if (kvfold_lengths(cache, &length, 1) != KVFOLD_OK || length != 3) ++failures;
    /* Every value folded was (1, 2), so attention over any of them reads (1, 2). */
    if (out[0] < 0.999f || out[0] > 1.001f || out[1] < 1.999f || out[1] > 2.001f) ++failures;
    if (kvfold_step(NULL, q, k, v, out, NULL) != KVFOLD_VALUE_ERROR || kvfold_last_error(NULL)[0] == 0) ++failures;
    kvfold_free(cache);

    /* The same keys rotated by a RoPE at positions 10, 20, 30, the oldest folded by attention weight. */
    if (kvfold_options_init(&options, sizeof options) != KVFOLD_OK) return failures + 1;
    options.rope_theta = 10000.0;
    options.retain = KVFOLD_RETAIN_TOVA;
    if (kvfold_create_with_options(&config, &options, &rule, &cache) != KVFOLD_OK) return failures + 1;
    for (t = 0; t < 3; ++t) {
        positions[0] = 10 * (t + 1);
        if (kvfold_step_at(cache, q, k, v, out, NULL, positions) != KVFOLD_OK) ++failures;
    }
    if (kvfold_last_positions(cache, &last, 1) != KVFOLD_OK || last != 30) ++failures;
    if (out[0] < 0.999f || out[0] > 1.001f || out[1] < 1.999f || out[1] > 2.001f) ++failures;
    positions[0] = 29; /* behind the last: refused */
    if (kvfold_update_at(cache, k, v, 1, NULL, positions) != KVFOLD_VALUE_ERROR) ++failures;
    kvfold_free(cache);
    return failures;
}
