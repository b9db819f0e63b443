// The C API (kvfold.h): the same results as the C++ API it wraps, errors as codes and messages that
// leave the cache untouched, and null handles or pointers reported instead of crashing.
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "c_api_fixtures.hpp"
#include "check.hpp"
#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

using namespace c_api_fixtures;

TEST(c_api_step_and_forward_match_the_cpp_api) {
    const kvfold_config c = small_config();
    const CRule rules[] = {CRule("cumulative", {}), CRule("ema", {{"alpha", {0.25}}}),
                           CRule("compressive", {{"slots", {2}}, {"rate", {2}}}, {{"pool", "max"}}),
                           CRule("linear", {{"mix", {0.5}}}, {{"feature_map", "elu1"}, {"normalize", "true"}})};
    const int64_t T = 9, B = 2, H = 2, Hq = 4, dk = 5, dv = 3;
    auto q = normal(B * Hq * T * dk, 1), k = normal(B * H * T * dk, 2), v = normal(B * H * T * dv, 3);
    for (const CRule& r : rules) {
        kvfold_cache* cache = create(c, r);
        CHECK(cache != nullptr);
        if (!cache) continue;
        kvfold::MemoryCache ref(to_cpp(c), r.spec());
        std::vector<float> out(B * Hq * T * dv), want(out.size());
        CHECK(kvfold_forward(cache, q.data(), k.data(), v.data(), T, out.data(), nullptr) == KVFOLD_OK);
        ref.forward(q.data(), k.data(), v.data(), T, want.data());
        CHECK(out == want);
        // One more token by step, then attend: still the same as the C++ cache.
        std::vector<float> q1(B * Hq * dk), k1(B * H * dk), v1(B * H * dv), o1(B * Hq * dv), w1(o1.size());
        for (size_t i = 0; i < q1.size(); ++i) q1[i] = q[i];
        for (size_t i = 0; i < k1.size(); ++i) k1[i] = k[i] * 0.5f;
        for (size_t i = 0; i < v1.size(); ++i) v1[i] = v[i] - 0.25f;
        CHECK(kvfold_step(cache, q1.data(), k1.data(), v1.data(), o1.data(), nullptr) == KVFOLD_OK);
        ref.step(q1.data(), k1.data(), v1.data(), w1.data());
        CHECK(o1 == w1);
        CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
        ref.update(k.data(), v.data(), T);
        CHECK(kvfold_attend(cache, q1.data(), o1.data()) == KVFOLD_OK);
        ref.attend(q1.data(), w1.data());
        CHECK(o1 == w1);
        int64_t lengths[2] = {0, 0};
        CHECK(kvfold_lengths(cache, lengths, 2) == KVFOLD_OK);
        CHECK(lengths[0] == 2 * T + 1 && lengths[1] == 2 * T + 1);
        size_t nbytes = 0;
        CHECK(kvfold_nbytes(cache, &nbytes) == KVFOLD_OK);
        CHECK(nbytes == ref.nbytes() && nbytes > 0);
        // The memory, as the C++ API shows it.
        size_t nk = 0, nv = 0;
        CHECK(kvfold_memory_size(cache, &nk, &nv) == KVFOLD_OK);
        CHECK(nk > 0);
        std::vector<float> mk(nk), mv(nv + 1), rk(nk), rv(nv + 1);
        CHECK(kvfold_memory(cache, mk.data(), nk, mv.data(), nv) == KVFOLD_OK);
        ref.memory(rk.data(), nv ? rv.data() : nullptr);
        CHECK(mk == rk && mv == rv);
        kvfold_free(cache);
    }
}

TEST(c_api_forward_takes_the_per_token_gates) {
    kvfold_config c = small_config();
    c.window = 0;
    c.sinks = 0;
    const CRule r("gated_delta", {});
    const int64_t T = 6, B = 2, H = 2, Hq = 4, dk = 5, dv = 3;
    auto q = normal(B * Hq * T * dk, 4), k = normal(B * H * T * dk, 5), v = normal(B * H * T * dv, 6);
    std::vector<float> decay(B * H * T * dk), beta(B * H * T);
    for (size_t i = 0; i < decay.size(); ++i) decay[i] = -0.05f * static_cast<float>(1 + i % 7);
    for (size_t i = 0; i < beta.size(); ++i) beta[i] = 0.1f * static_cast<float>(1 + i % 9);
    kvfold_cache* cache = create(c, r);
    REQUIRE(cache != nullptr);
    kvfold::MemoryCache ref(to_cpp(c), r.spec());
    std::vector<float> out(B * Hq * T * dv), want(out.size()), ungated(out.size());
    // The gated delta rule needs its gates: without them the call fails and changes nothing.
    CHECK(kvfold_forward(cache, q.data(), k.data(), v.data(), T, out.data(), nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "decay"));
    int64_t lengths[2] = {-1, -1};
    CHECK(kvfold_lengths(cache, lengths, 2) == KVFOLD_OK && lengths[0] == 0 && lengths[1] == 0);
    kvfold_gates gates{decay.data(), 1, beta.data()};
    CHECK(kvfold_forward(cache, q.data(), k.data(), v.data(), T, out.data(), &gates) == KVFOLD_OK);
    kvfold::TokenGates g;
    g.decay = decay.data(), g.decay_per_key = true, g.beta = beta.data();
    ref.forward(q.data(), k.data(), v.data(), T, want.data(), g);
    CHECK(out == want);
    // The gates matter: per-head decays of another value give another result.
    std::vector<float> head_decay(B * H * T, -2.0f);
    kvfold_gates other{head_decay.data(), 0, beta.data()};
    CHECK(kvfold_reset(cache) == KVFOLD_OK);
    CHECK(kvfold_forward(cache, q.data(), k.data(), v.data(), T, ungated.data(), &other) == KVFOLD_OK);
    CHECK(ungated != want);
    kvfold_free(cache);
}

TEST(c_api_create_reports_bad_configs_and_rules) {
    kvfold_config c = small_config();
    const CRule cumulative("cumulative", {});
    kvfold_cache* cache = reinterpret_cast<kvfold_cache*>(&c);  // must be reset to null on failure
    c.head_dim = 0;
    CHECK(kvfold_create(&c, &cumulative.rule, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(cache == nullptr);
    CHECK(contains(kvfold_last_error(nullptr), "head_dim"));
    c = small_config();
    c.dtype = 7;
    CHECK(kvfold_create(&c, &cumulative.rule, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "dtype") && contains(kvfold_last_error(nullptr), "7"));
    c = small_config();
    const CRule unknown("nonesuch", {});
    CHECK(kvfold_create(&c, &unknown.rule, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "nonesuch"));
    const CRule custom("custom", {{"slots", {2}}});
    CHECK(kvfold_create(&c, &custom.rule, &cache) == KVFOLD_TYPE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "custom"));
    const CRule twice("ema", {{"alpha", {0.1}}, {"alpha", {0.2}}});
    CHECK(kvfold_create(&c, &twice.rule, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "twice"));
    const CRule out_of_range("ema", {{"alpha", {1.5}}});
    CHECK(kvfold_create(&c, &out_of_range.rule, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "alpha"));
    CHECK(kvfold_create(nullptr, &cumulative.rule, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "config"));
    CHECK(kvfold_create(&c, nullptr, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_create(&c, &cumulative.rule, nullptr) == KVFOLD_VALUE_ERROR);
    kvfold_rule no_kind{};
    CHECK(kvfold_create(&c, &no_kind, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "rule.kind"));
    kvfold_rule missing_params{"ema", nullptr, 1, nullptr, 0};
    CHECK(kvfold_create(&c, &missing_params, &cache) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "rule.params"));
    // A cache far larger than memory is an out-of-memory error, not a crash.
    c.batch_size = int64_t(1) << 24;
    c.num_heads = c.num_query_heads = 1 << 10;
    c.head_dim = c.value_dim = 1 << 10;
    c.window = 1 << 20;
    const kvfold_status huge = kvfold_create(&c, &cumulative.rule, &cache);
    CHECK(huge == KVFOLD_OUT_OF_MEMORY || huge == KVFOLD_VALUE_ERROR);
    CHECK(cache == nullptr);
    CHECK(std::strlen(kvfold_last_error(nullptr)) > 0);
}

TEST(c_api_null_handles_and_pointers_are_errors) {
    float x[64] = {0};
    int64_t rows[1] = {0};
    size_t n = 0;
    CHECK(kvfold_update(nullptr, x, x, 1, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "cache"));
    CHECK(kvfold_attend(nullptr, x, x) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_step(nullptr, x, x, x, x, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_forward(nullptr, x, x, x, 1, x, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_reset(nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_reset_rows(nullptr, rows, 1) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_lengths(nullptr, rows, 1) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_nbytes(nullptr, &n) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_memory_size(nullptr, &n, &n) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_memory(nullptr, x, 64, x, 64) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_to_bytes(nullptr, nullptr, 0, &n) == KVFOLD_VALUE_ERROR);
    void* data = x;
    CHECK(kvfold_to_bytes_alloc(nullptr, &data, &n) == KVFOLD_VALUE_ERROR);
    CHECK(data == nullptr);
    kvfold_checkpoint* cp = nullptr;
    CHECK(kvfold_checkpoint_new(nullptr, &cp) == KVFOLD_VALUE_ERROR && cp == nullptr);
    CHECK(kvfold_rollback(nullptr, cp) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_rollback_rows(nullptr, cp, rows, 1) == KVFOLD_VALUE_ERROR);
    kvfold_config cfg;
    CHECK(kvfold_get_config(nullptr, &cfg) == KVFOLD_VALUE_ERROR);
    kvfold_cache* out = nullptr;
    CHECK(kvfold_from_bytes(nullptr, 10, &out) == KVFOLD_VALUE_ERROR && out == nullptr);
    CHECK(contains(kvfold_last_error(nullptr), "data"));
    kvfold_free(nullptr);
    kvfold_checkpoint_free(nullptr);
    kvfold_free_bytes(nullptr);
    kvfold_config_init(nullptr);

    // With a cache: each missing array is named, and nothing changes.
    const kvfold_config c = small_config();
    kvfold_cache* cache = create(c, CRule("cumulative", {}));
    REQUIRE(cache != nullptr);
    const auto before = bytes_of(cache);
    CHECK(kvfold_update(cache, x, nullptr, 1, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "v:"));
    CHECK(kvfold_step(cache, nullptr, x, x, x, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "q:"));
    CHECK(kvfold_attend(cache, x, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "out:"));
    CHECK(kvfold_forward(cache, x, nullptr, x, 1, x, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "k:"));
    CHECK(kvfold_reset_rows(cache, nullptr, 1) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "rows"));
    CHECK(kvfold_lengths(cache, nullptr, 2) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_nbytes(cache, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_memory_size(cache, nullptr, &n) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_memory(cache, nullptr, 1 << 20, x, 1 << 20) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "keys"));
    CHECK(kvfold_to_bytes(cache, nullptr, 0, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_checkpoint_new(cache, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_rollback(cache, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "checkpoint"));
    CHECK(kvfold_get_config(cache, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(bytes_of(cache) == before);
    kvfold_free(cache);
}

TEST(c_api_bad_values_leave_the_cache_untouched) {
    const kvfold_config c = small_config();
    kvfold_cache* cache = create(c, CRule("ema", {{"alpha", {0.5}}}));
    REQUIRE(cache != nullptr);
    const int64_t T = 5;
    auto k = normal(2 * 2 * T * 5, 7), v = normal(2 * 2 * T * 3, 8);
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    const auto before = bytes_of(cache);
    CHECK(!before.empty());
    k[17] = std::nanf("");
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "k"));
    CHECK(kvfold_update(cache, k.data(), v.data(), -1, nullptr) == KVFOLD_VALUE_ERROR);
    int64_t bad_rows[1] = {2};
    CHECK(kvfold_reset_rows(cache, bad_rows, 1) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "2"));
    int64_t lengths[1];
    CHECK(kvfold_lengths(cache, lengths, 1) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "capacity"));
    size_t nk = 0, nv = 0;
    CHECK(kvfold_memory_size(cache, &nk, &nv) == KVFOLD_OK);
    std::vector<float> mk(nk), mv(nv);
    CHECK(kvfold_memory(cache, mk.data(), nk - 1, mv.data(), nv) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "key_capacity"));
    CHECK(bytes_of(cache) == before);
    kvfold_free(cache);
}

TEST(c_api_messages_per_handle_and_per_thread) {
    const kvfold_config c = small_config();
    kvfold_cache* a = create(c, CRule("cumulative", {}));
    kvfold_cache* b = create(c, CRule("cumulative", {}));
    CHECK(a && b);
    if (!a || !b) return kvfold_free(a), kvfold_free(b);
    CHECK(std::string(kvfold_last_error(a)).empty());
    int64_t row = 5;
    CHECK(kvfold_reset_rows(a, &row, 1) == KVFOLD_VALUE_ERROR);
    const std::string on_a = kvfold_last_error(a);
    CHECK(!on_a.empty());
    CHECK(kvfold_last_error(nullptr) == on_a);  // the thread's last failure too
    CHECK(std::string(kvfold_last_error(b)).empty());
    // A failure on another thread changes neither this thread's message nor a's.
    std::thread t([] { kvfold_set_num_threads(0); });
    t.join();
    CHECK(kvfold_last_error(nullptr) == on_a);
    CHECK(kvfold_set_num_threads(0) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "num_threads"));
    CHECK(kvfold_last_error(a) == on_a);
    kvfold_free(a);
    kvfold_free(b);
}

TEST(c_api_library_queries) {
    CHECK(std::string(kvfold_version()) == kvfold::version());
    CHECK(std::string(kvfold_simd_backend()) == kvfold::simd_backend());
    CHECK(std::string(kvfold_status_name(KVFOLD_OK)) == "ok");
    CHECK(std::string(kvfold_status_name(KVFOLD_OUT_OF_MEMORY)) == "out of memory");
    CHECK(std::string(kvfold_status_name(99)) == "unknown status");
    const int threads = kvfold_get_num_threads();
    CHECK(kvfold_set_num_threads(3) == KVFOLD_OK && kvfold_get_num_threads() == 3);
    CHECK(kvfold_set_num_threads(1025) == KVFOLD_VALUE_ERROR && kvfold_get_num_threads() == 3);
    CHECK(kvfold_set_num_threads(threads) == KVFOLD_OK);
    const std::string backend = kvfold_simd_backend();
    CHECK(kvfold_set_simd_backend("nonesuch") == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "nonesuch"));
    CHECK(kvfold_set_simd_backend(nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_simd_backend() == backend);
    kvfold_config c;
    std::memset(&c, 0xFF, sizeof(c));
    kvfold_config_init(&c);
    CHECK(c.batch_size == 1 && c.num_heads == 1 && c.head_dim == 1 && c.window == 0 && c.sinks == 0 && c.scale == 0 &&
          c.dtype == KVFOLD_FLOAT32 && c.check_finite == 1);
}

extern "C" int kvfold_c_header_smoke(void);

TEST(c_api_from_a_c_translation_unit) { CHECK(kvfold_c_header_smoke() == 0); }
