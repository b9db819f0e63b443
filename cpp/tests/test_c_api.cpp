// The C API (kvfold.h): the same results as the C++ API it wraps, errors as codes and messages that
// leave the cache untouched, and null handles or pointers reported instead of crashing.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "fixtures.hpp"
#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

namespace {

using fixtures::normal;

// B=2, H=2, Hq=4, d_k=5, d_v=3, a window of 3 and one sink.
kvfold_config small_config() {
    kvfold_config c;
    kvfold_config_init(&c);
    c.batch_size = 2;
    c.num_heads = 2;
    c.num_query_heads = 4;
    c.head_dim = 5;
    c.value_dim = 3;
    c.window = 3;
    c.sinks = 1;
    return c;
}

kvfold::Config to_cpp(const kvfold_config& c) {
    kvfold::Config g;
    g.batch_size = c.batch_size, g.num_heads = c.num_heads, g.num_query_heads = c.num_query_heads;
    g.head_dim = c.head_dim, g.value_dim = c.value_dim, g.window = c.window, g.sinks = c.sinks;
    g.dtype = static_cast<kvfold::DType>(c.dtype);
    return g;
}

// A C rule spec that owns its strings and arrays.
struct CRule {
    std::vector<std::string> names;
    std::vector<std::vector<double>> values;
    std::vector<std::vector<int64_t>> shapes;
    std::vector<kvfold_param> params;
    std::vector<kvfold_option> options;
    kvfold_rule rule{};

    CRule(const char* kind, std::vector<std::pair<std::string, std::vector<double>>> arrays,
          std::vector<kvfold_option> opts = {}) {
        for (auto& [name, v] : arrays) names.push_back(name), values.push_back(v);
        for (auto& v : values) shapes.push_back({static_cast<int64_t>(v.size())});
        for (size_t i = 0; i < values.size(); ++i)
            params.push_back({names[i].c_str(), values[i].data(), shapes[i].data(), values[i].size() == 1 ? 0 : 1});
        options = opts;
        rule.kind = kind;
        rule.params = params.data();
        rule.num_params = params.size();
        rule.options = options.data();
        rule.num_options = options.size();
    }
    // The same rule for the C++ API.
    kvfold::RuleSpec spec() const {
        kvfold::RuleSpec s;
        s.kind = rule.kind;
        for (const auto& p : params) {
            kvfold::Array a;
            if (p.ndim) a.shape = {p.shape[0]};
            a.data.assign(p.data, p.data + (p.ndim ? p.shape[0] : 1));
            s.arrays[p.name] = a;
        }
        for (const auto& o : options) s.options[o.name] = o.value;
        return s;
    }
};

kvfold_cache* create(const kvfold_config& c, const CRule& r) {
    kvfold_cache* cache = nullptr;
    kvfold_status s = kvfold_create(&c, &r.rule, &cache);
    if (s != KVFOLD_OK) std::printf("  create failed: %s\n", kvfold_last_error(nullptr));
    return cache;
}

std::vector<uint8_t> bytes_of(const kvfold_cache* cache) {
    size_t n = 0;
    if (kvfold_to_bytes(cache, nullptr, 0, &n) != KVFOLD_OK) return {};
    std::vector<uint8_t> b(n);
    if (kvfold_to_bytes(cache, b.data(), b.size(), &n) != KVFOLD_OK) return {};
    return b;
}

bool contains(const char* message, const char* part) { return std::strstr(message, part) != nullptr; }

}  // namespace

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
    CHECK(cache != nullptr);
    if (!cache) return;
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
    CHECK(cache != nullptr);
    if (!cache) return;
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
    CHECK(cache != nullptr);
    if (!cache) return;
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

TEST(c_api_state_round_trips_through_bytes) {
    kvfold_config c = small_config();
    c.dtype = KVFOLD_FLOAT16;
    kvfold_cache* cache = create(c, CRule("moving", {{"n", {2}}}));
    CHECK(cache != nullptr);
    if (!cache) return;
    const int64_t T = 7;
    auto k = normal(2 * 2 * T * 5, 9), v = normal(2 * 2 * T * 3, 10), q = normal(2 * 4 * 5, 11);
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);

    size_t size = 0;
    CHECK(kvfold_to_bytes(cache, nullptr, 0, &size) == KVFOLD_OK);
    CHECK(size > 0);
    std::vector<uint8_t> small(size - 1, 0xAB);
    size_t reported = 0;
    CHECK(kvfold_to_bytes(cache, small.data(), small.size(), &reported) == KVFOLD_VALUE_ERROR);
    CHECK(reported == size);
    CHECK(small == std::vector<uint8_t>(size - 1, 0xAB));
    const auto bytes = bytes_of(cache);
    CHECK(bytes.size() == size);
    void* data = nullptr;
    size_t alloc_size = 0;
    CHECK(kvfold_to_bytes_alloc(cache, &data, &alloc_size) == KVFOLD_OK);
    CHECK(data != nullptr && alloc_size == size && std::memcmp(data, bytes.data(), size) == 0);
    kvfold_free_bytes(data);

    kvfold_cache* copy = nullptr;
    CHECK(kvfold_from_bytes(bytes.data(), bytes.size(), &copy) == KVFOLD_OK);
    CHECK(copy != nullptr);
    if (copy) {
        kvfold_config got;
        CHECK(kvfold_get_config(copy, &got) == KVFOLD_OK);
        CHECK(got.batch_size == 2 && got.num_query_heads == 4 && got.window == 3 && got.sinks == 1 &&
              got.dtype == KVFOLD_FLOAT16 && got.check_finite == 1);
        std::vector<float> o1(2 * 4 * 3), o2(o1.size());
        CHECK(kvfold_attend(cache, q.data(), o1.data()) == KVFOLD_OK);
        CHECK(kvfold_attend(copy, q.data(), o2.data()) == KVFOLD_OK);
        CHECK(o1 == o2);
        kvfold_free(copy);
    }
    // Damaged bytes: an error naming the problem, no cache.
    auto damaged = bytes;
    damaged[damaged.size() / 2] ^= 0x5A;
    copy = reinterpret_cast<kvfold_cache*>(&c);
    CHECK(kvfold_from_bytes(damaged.data(), damaged.size(), &copy) == KVFOLD_VALUE_ERROR);
    CHECK(copy == nullptr);
    CHECK(std::strlen(kvfold_last_error(nullptr)) > 0);
    CHECK(kvfold_from_bytes(bytes.data(), 10, &copy) == KVFOLD_VALUE_ERROR);
    kvfold_free(cache);
}

TEST(c_api_checkpoint_and_rollback) {
    const kvfold_config c = small_config();
    kvfold_cache* cache = create(c, CRule("weighted", {{"betas", {0.5, 1.0, 2.0}}}));
    CHECK(cache != nullptr);
    if (!cache) return;
    const int64_t T = 4;
    auto k = normal(2 * 2 * T * 5, 12), v = normal(2 * 2 * T * 3, 13);
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    const auto at_checkpoint = bytes_of(cache);
    kvfold_checkpoint* cp = nullptr;
    CHECK(kvfold_checkpoint_new(cache, &cp) == KVFOLD_OK && cp != nullptr);
    CHECK(kvfold_update(cache, v.data(), v.data(), 2, nullptr) == KVFOLD_OK);
    CHECK(bytes_of(cache) != at_checkpoint);
    CHECK(kvfold_rollback(cache, cp) == KVFOLD_OK);
    CHECK(bytes_of(cache) == at_checkpoint);

    // Per row: row 1 goes back, row 0 keeps its new tokens.
    CHECK(kvfold_update(cache, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    int64_t row = 1, lengths[2];
    CHECK(kvfold_rollback_rows(cache, cp, &row, 1) == KVFOLD_OK);
    CHECK(kvfold_lengths(cache, lengths, 2) == KVFOLD_OK);
    CHECK(lengths[0] == 2 * T && lengths[1] == T);
    row = 3;
    CHECK(kvfold_rollback_rows(cache, cp, &row, 1) == KVFOLD_VALUE_ERROR);

    // A checkpoint outlives its cache, and fits only a cache of the same configuration.
    kvfold_free(cache);
    kvfold_cache* other = create(c, CRule("weighted", {{"betas", {0.5, 1.0, 2.0}}}));
    CHECK(other && kvfold_rollback(other, cp) == KVFOLD_OK && bytes_of(other) == at_checkpoint);
    kvfold_config wider = c;
    wider.window = 4;
    kvfold_cache* different = create(wider, CRule("weighted", {{"betas", {0.5, 1.0, 2.0}}}));
    CHECK(different && kvfold_rollback(different, cp) == KVFOLD_VALUE_ERROR);
    CHECK(different && contains(kvfold_last_error(different), "window"));
    kvfold_free(different);

    // reset and reset_rows
    CHECK(kvfold_reset(other) == KVFOLD_OK);
    CHECK(kvfold_lengths(other, lengths, 2) == KVFOLD_OK && lengths[0] == 0 && lengths[1] == 0);
    CHECK(kvfold_update(other, k.data(), v.data(), T, nullptr) == KVFOLD_OK);
    row = 0;
    CHECK(kvfold_reset_rows(other, &row, 1) == KVFOLD_OK);
    CHECK(kvfold_lengths(other, lengths, 2) == KVFOLD_OK && lengths[0] == 0 && lengths[1] == T);
    kvfold_free(other);
    kvfold_checkpoint_free(cp);
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

namespace {

// B=2, H=2, Hq=4, d_k=6 (a RoPE rotates pairs of dimensions), d_v=3, a window of 3 and one sink.
kvfold_config rope_config() {
    kvfold_config c = small_config();
    c.head_dim = 6;
    return c;
}

kvfold_options options(double theta, int64_t dim, int layout, int retain, int64_t recent = -1) {
    kvfold_options o;
    kvfold_options_init(&o, sizeof o);
    o.rope_theta = theta, o.rope_dim = dim, o.rope_layout = layout, o.retain = retain, o.recent = recent;
    return o;
}

kvfold::Config to_cpp(const kvfold_config& c, const kvfold_options& o) {
    kvfold::Config g = to_cpp(c);
    g.rope = kvfold::RoPE{o.rope_theta, o.rope_dim, o.rope_layout == KVFOLD_ROPE_INTERLEAVED};
    g.retain = static_cast<kvfold::Retain>(o.retain);
    g.recent = o.recent;
    return g;
}

kvfold_cache* create(const kvfold_config& c, const kvfold_options& o, const CRule& r) {
    kvfold_cache* cache = nullptr;
    kvfold_status s = kvfold_create_with_options(&c, &o, &r.rule, &cache);
    if (s != KVFOLD_OK) std::printf("  create failed: %s\n", kvfold_last_error(nullptr));
    return cache;
}

}  // namespace

TEST(c_api_rope_positions_and_retention_match_the_cpp_api) {
    const kvfold_config c = rope_config();
    struct Case {
        CRule rule;
        kvfold_options opts;
    };
    const Case cases[] = {
        {CRule("merge", {{"slots", {2}}}, {{"bias", "log_count"}}),
         options(100, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO)},
        {CRule("cumulative", {}), options(50, 4, KVFOLD_ROPE_INTERLEAVED, KVFOLD_RETAIN_TOVA)},
        {CRule("merge", {{"slots", {3}}}), options(0, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_H2O, 1)},
        {CRule("ema", {{"alpha", {0.25}}}), options(1000, 2, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_H2O)},
    };
    const int64_t T = 9, B = 2, H = 2, Hq = 4, dk = 6, dv = 3;
    auto q = normal(B * Hq * T * dk, 21), k = normal(B * H * T * dk, 22), v = normal(B * H * T * dv, 23);
    // Row 0 at positions 0, 3, 6, ..., row 1 from 5 on with a repeat: gaps and equal positions are allowed.
    std::vector<int64_t> pos(B * T);
    for (int64_t t = 0; t < T; ++t) pos[t] = 3 * t, pos[T + t] = 5 + t - (t == 4);
    for (const Case& x : cases) {
        kvfold_cache* cache = create(c, x.opts, x.rule);
        CHECK(cache != nullptr);
        if (!cache) continue;
        kvfold::MemoryCache ref(to_cpp(c, x.opts), x.rule.spec());
        kvfold_options got;
        kvfold_options_init(&got, sizeof got);
        CHECK(kvfold_get_options(cache, &got) == KVFOLD_OK);
        CHECK(got.rope_theta == x.opts.rope_theta && got.rope_dim == x.opts.rope_dim &&
              got.rope_layout == x.opts.rope_layout && got.retain == x.opts.retain && got.recent == x.opts.recent);
        std::vector<float> out(B * Hq * T * dv), want(out.size());
        CHECK(kvfold_forward_at(cache, q.data(), k.data(), v.data(), T, out.data(), nullptr, pos.data()) == KVFOLD_OK);
        ref.forward(q.data(), k.data(), v.data(), T, want.data(), {}, pos.data());
        CHECK(out == want);
        // One token by step at given positions, then T more by update, then attend.
        std::vector<float> q1(q.begin(), q.begin() + B * Hq * dk), o1(B * Hq * dv), w1(o1.size());
        const int64_t step_pos[2] = {30, 14};
        CHECK(kvfold_step_at(cache, q1.data(), k.data(), v.data(), o1.data(), nullptr, step_pos) == KVFOLD_OK);
        ref.step(q1.data(), k.data(), v.data(), w1.data(), {}, step_pos);
        CHECK(o1 == w1);
        std::vector<int64_t> later(pos);
        for (int64_t& p : later) p += 40;
        CHECK(kvfold_update_at(cache, v.data(), k.data(), 2, nullptr, later.data()) == KVFOLD_OK);
        ref.update(v.data(), k.data(), 2, {}, later.data());
        CHECK(kvfold_attend(cache, q1.data(), o1.data()) == KVFOLD_OK);
        ref.attend(q1.data(), w1.data());
        CHECK(o1 == w1);
        int64_t last[2] = {-1, -1};
        CHECK(kvfold_last_positions(cache, last, 2) == KVFOLD_OK);
        CHECK(last[0] == ref.last_positions()[0] && last[1] == ref.last_positions()[1] && last[0] == later[1]);
        size_t nk = 0, nv = 0;
        CHECK(kvfold_memory_size(cache, &nk, &nv) == KVFOLD_OK);
        std::vector<float> mk(nk + 1), mv(nv + 1), rk(nk + 1), rv(nv + 1);
        CHECK(kvfold_memory(cache, mk.data(), nk, mv.data(), nv) == KVFOLD_OK);
        ref.memory(rk.data(), rv.data());
        CHECK(mk == rk && mv == rv);
        // The options and positions travel with the state.
        const auto bytes = bytes_of(cache);
        kvfold_cache* copy = nullptr;
        CHECK(kvfold_from_bytes(bytes.data(), bytes.size(), &copy) == KVFOLD_OK);
        if (copy) {
            kvfold_options back;
            kvfold_options_init(&back, sizeof back);
            CHECK(kvfold_get_options(copy, &back) == KVFOLD_OK);
            CHECK(std::memcmp(&back, &got, sizeof got) == 0);
            int64_t copied[2] = {-1, -1};
            CHECK(kvfold_last_positions(copy, copied, 2) == KVFOLD_OK && copied[0] == last[0] && copied[1] == last[1]);
            kvfold_free(copy);
        }
        kvfold_free(cache);
    }
}

TEST(c_api_positions_turn_the_keys_of_a_rope_cache) {
    // The same tokens at other positions give another answer with a RoPE, the same without one; and
    // null positions are the tokens each row has seen.
    const kvfold_config c = rope_config();
    const CRule merge("merge", {{"slots", {2}}});
    const int64_t T = 8, B = 2, H = 2, Hq = 4, dk = 6, dv = 3;
    auto q = normal(B * Hq * T * dk, 24), k = normal(B * H * T * dk, 25), v = normal(B * H * T * dv, 26);
    std::vector<int64_t> seen(B * T), spread(B * T);
    for (int64_t i = 0; i < B * T; ++i) seen[i] = i % T, spread[i] = 7 * (i % T);
    for (double theta : {0.0, 100.0}) {
        std::vector<float> plain(B * Hq * T * dv), at_seen(plain.size()), at_spread(plain.size());
        const kvfold_options o = options(theta, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO);
        kvfold_cache* a = create(c, o, merge);
        kvfold_cache* b = create(c, o, merge);
        kvfold_cache* d = create(c, o, merge);
        CHECK(a && b && d);
        if (a && b && d) {
            CHECK(kvfold_forward(a, q.data(), k.data(), v.data(), T, plain.data(), nullptr) == KVFOLD_OK);
            CHECK(kvfold_forward_at(b, q.data(), k.data(), v.data(), T, at_seen.data(), nullptr, seen.data()) ==
                  KVFOLD_OK);
            CHECK(kvfold_forward_at(d, q.data(), k.data(), v.data(), T, at_spread.data(), nullptr, spread.data()) ==
                  KVFOLD_OK);
            CHECK(plain == at_seen);
            CHECK((plain == at_spread) == (theta == 0));
        }
        kvfold_free(a), kvfold_free(b), kvfold_free(d);
    }
}

TEST(c_api_bad_options_and_positions_are_errors_that_change_nothing) {
    const kvfold_config c = rope_config();
    const CRule merge("merge", {{"slots", {2}}});
    kvfold_options o;
    std::memset(&o, 0x5A, sizeof o);
    const kvfold_options untouched = o;
    CHECK(kvfold_options_init(&o, sizeof o - 8) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "size") && contains(kvfold_last_error(nullptr), "kvfold_options"));
    CHECK(kvfold_options_init(&o, sizeof o + 8) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(nullptr), "newer kvfold.h"));
    CHECK(std::memcmp(&o, &untouched, sizeof o) == 0);
    CHECK(kvfold_options_init(nullptr, sizeof o) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_options_init(&o, sizeof o) == KVFOLD_OK);
    CHECK(o.size == sizeof o && o.rope_theta == 0 && o.rope_dim == 0 && o.rope_layout == KVFOLD_ROPE_HALF &&
          o.retain == KVFOLD_RETAIN_FIFO && o.recent == -1);

    struct Bad {
        kvfold_options opts;
        const char* rule;
        const char* named;
    };
    kvfold_options wrong_size = options(0, 0, 0, 0);
    wrong_size.size = 8;
    const Bad bad[] = {
        {options(-1, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO), "merge", "theta"},
        {options(100, 8, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO), "merge", "dim"},
        {options(100, 3, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO), "merge", "even"},
        {options(100, 0, 5, KVFOLD_RETAIN_FIFO), "merge", "options.rope_layout"},
        {options(0, 0, KVFOLD_ROPE_HALF, 9), "merge", "options.retain"},
        {options(0, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO, 2), "merge", "recent"},
        {options(0, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_H2O, 4), "merge", "recent"},
        {options(100, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO), "linear", "rope"},
        {options(0, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_TOVA), "linear", "retain"},
        {wrong_size, "merge", "options.size"},
    };
    for (const Bad& x : bad) {
        const CRule r = std::string(x.rule) == "merge" ? merge : CRule("linear", {});
        kvfold_cache* cache = reinterpret_cast<kvfold_cache*>(&o);  // must be reset to null on failure
        CHECK(kvfold_create_with_options(&c, &x.opts, &r.rule, &cache) == KVFOLD_VALUE_ERROR);
        CHECK(cache == nullptr);
        CHECK(contains(kvfold_last_error(nullptr), x.named));
        if (!contains(kvfold_last_error(nullptr), x.named)) std::printf("  got: %s\n", kvfold_last_error(nullptr));
    }
    // Null options are the defaults: the cache kvfold_create makes.
    kvfold_cache* plain = nullptr;
    CHECK(kvfold_create_with_options(&c, nullptr, &merge.rule, &plain) == KVFOLD_OK && plain != nullptr);
    kvfold_options got;
    kvfold_options_init(&got, sizeof got);
    CHECK(kvfold_get_options(plain, &got) == KVFOLD_OK && got.rope_theta == 0 && got.retain == KVFOLD_RETAIN_FIFO);
    kvfold_free(plain);
    CHECK(kvfold_create_with_options(&c, nullptr, &merge.rule, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_create_with_options(nullptr, nullptr, &merge.rule, &plain) == KVFOLD_VALUE_ERROR);
    CHECK(plain == nullptr);

    // Positions that go backwards, within a call or against the row's last: an error, nothing changed.
    kvfold_cache* cache = create(c, options(100, 0, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_TOVA), merge);
    CHECK(cache != nullptr);
    if (!cache) return;
    const int64_t T = 3, B = 2, H = 2, Hq = 4, dk = 6, dv = 3;
    auto q = normal(B * Hq * T * dk, 27), k = normal(B * H * T * dk, 28), v = normal(B * H * T * dv, 29);
    const int64_t first[6] = {10, 11, 12, 0, 1, 2};
    CHECK(kvfold_update_at(cache, k.data(), v.data(), T, nullptr, first) == KVFOLD_OK);
    const auto before = bytes_of(cache);
    const int64_t backwards[6] = {13, 12, 14, 3, 4, 5};
    CHECK(kvfold_update_at(cache, k.data(), v.data(), T, nullptr, backwards) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "positions"));
    const int64_t behind[2] = {11, 3};
    std::vector<float> out(B * Hq * T * dv);
    CHECK(kvfold_step_at(cache, q.data(), k.data(), v.data(), out.data(), nullptr, behind) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "positions"));
    const int64_t negative[6] = {13, 14, 15, -1, 4, 5};
    CHECK(kvfold_forward_at(cache, q.data(), k.data(), v.data(), T, out.data(), nullptr, negative) ==
          KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "positions"));
    int64_t last[2];
    CHECK(kvfold_last_positions(cache, last, 1) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "capacity"));
    CHECK(kvfold_last_positions(cache, nullptr, 2) == KVFOLD_VALUE_ERROR);
    got.size = 12;
    CHECK(kvfold_get_options(cache, &got) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(cache), "out->size"));
    CHECK(kvfold_get_options(cache, nullptr) == KVFOLD_VALUE_ERROR);
    CHECK(bytes_of(cache) == before);
    CHECK(kvfold_last_positions(cache, last, 2) == KVFOLD_OK && last[0] == 12 && last[1] == 2);
    // Null handles.
    CHECK(kvfold_update_at(nullptr, k.data(), v.data(), 1, nullptr, first) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_step_at(nullptr, q.data(), k.data(), v.data(), out.data(), nullptr, first) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_forward_at(nullptr, q.data(), k.data(), v.data(), 1, out.data(), nullptr, first) ==
          KVFOLD_VALUE_ERROR);
    CHECK(kvfold_last_positions(nullptr, last, 2) == KVFOLD_VALUE_ERROR);
    CHECK(kvfold_get_options(nullptr, &got) == KVFOLD_VALUE_ERROR);
    kvfold_free(cache);
}

extern "C" int kvfold_c_header_smoke(void);

TEST(c_api_from_a_c_translation_unit) { CHECK(kvfold_c_header_smoke() == 0); }
