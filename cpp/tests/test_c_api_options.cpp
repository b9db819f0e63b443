// The C API's options (RoPE, retention) and explicit positions: the same results as the C++ API,
// and bad options or positions reported as errors that leave the cache unchanged.
#include <cstddef>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "c_api_fixtures.hpp"
#include "check.hpp"
#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

using namespace c_api_fixtures;

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

TEST(c_api_a_rope_with_its_own_frequencies) {
    // A scaled RoPE's frequencies: the C++ API's results, through the state (format version 4) and
    // kvfold_get_options; a program built against the first kvfold_options (ending at `recent`) still
    // creates caches, and is told when a cache's options do not fit its struct.
    const kvfold_config c = rope_config();
    const CRule merge("merge", {{"slots", {2}}});
    const double frequencies[2] = {0.7, 0.004};
    kvfold_options o = options(100, 4, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO);
    o.rope_frequencies = frequencies, o.rope_frequency_count = 2;
    kvfold_cache* cache = create(c, o, merge);
    REQUIRE(cache != nullptr);
    kvfold::MemoryCache ref(to_cpp(c, o), merge.spec());
    const int64_t T = 8, B = 2, H = 2, Hq = 4, dk = 6, dv = 3;
    auto q = normal(B * Hq * T * dk, 30), k = normal(B * H * T * dk, 31), v = normal(B * H * T * dv, 32);
    std::vector<float> out(B * Hq * T * dv), want(out.size()), theta_out(out.size());
    CHECK(kvfold_forward(cache, q.data(), k.data(), v.data(), T, out.data(), nullptr) == KVFOLD_OK);
    ref.forward(q.data(), k.data(), v.data(), T, want.data());
    CHECK(out == want);
    kvfold_cache* by_theta = create(c, options(100, 4, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO), merge);
    REQUIRE(by_theta != nullptr);
    CHECK(kvfold_forward(by_theta, q.data(), k.data(), v.data(), T, theta_out.data(), nullptr) == KVFOLD_OK);
    CHECK(out != theta_out);
    const auto bytes = bytes_of(cache);
    CHECK(bytes.size() > 12 && bytes[8] == 4 && bytes_of(by_theta)[8] == 3);
    kvfold_cache* copy = nullptr;
    CHECK(kvfold_from_bytes(bytes.data(), bytes.size(), &copy) == KVFOLD_OK);
    REQUIRE(copy != nullptr);
    kvfold_options got;
    kvfold_options_init(&got, sizeof got);
    CHECK(kvfold_get_options(copy, &got) == KVFOLD_OK);
    CHECK(got.rope_frequency_count == 2 && got.rope_frequencies && got.rope_frequencies[0] == 0.7 &&
          got.rope_frequencies[1] == 0.004 && got.rope_dim == 4);
    CHECK(bytes_of(copy) == bytes);
    // The first options struct: taken for creating (theta's frequencies), refused for this cache's.
    const size_t first = offsetof(kvfold_options, rope_frequencies);
    kvfold_options small = options(100, 4, KVFOLD_ROPE_HALF, KVFOLD_RETAIN_FIFO);
    small.size = first;
    small.rope_frequencies = frequencies, small.rope_frequency_count = 2;  // beyond the size: not read
    kvfold_cache* old = nullptr;
    CHECK(kvfold_create_with_options(&c, &small, &merge.rule, &old) == KVFOLD_OK && old != nullptr);
    CHECK(old && bytes_of(old)[8] == 3);
    kvfold_options old_out = small;
    CHECK(kvfold_get_options(old, &old_out) == KVFOLD_OK && old_out.rope_theta == 100);
    CHECK(kvfold_get_options(copy, &old_out) == KVFOLD_VALUE_ERROR);
    CHECK(contains(kvfold_last_error(copy), "frequencies of its own"));
    // Bad frequencies: an error, no cache.
    struct Bad {
        int64_t count;
        const double* values;
        const char* named;
    };
    const double infinite[2] = {0.5, std::numeric_limits<double>::infinity()};
    const Bad bad[] = {{3, frequencies, "expected 2 values"},
                       {-1, frequencies, "options.rope_frequency_count"},
                       {4, frequencies, "options.rope_frequency_count"},
                       {2, nullptr, "options.rope_frequencies"},
                       {2, infinite, "frequencies[1] must be finite"}};
    for (const Bad& x : bad) {
        kvfold_options b = o;
        b.rope_frequency_count = x.count, b.rope_frequencies = x.values;
        kvfold_cache* none = nullptr;
        CHECK(kvfold_create_with_options(&c, &b, &merge.rule, &none) == KVFOLD_VALUE_ERROR && none == nullptr);
        CHECK(contains(kvfold_last_error(nullptr), x.named));
        if (!contains(kvfold_last_error(nullptr), x.named)) std::printf("  got: %s\n", kvfold_last_error(nullptr));
    }
    kvfold_free(cache), kvfold_free(by_theta), kvfold_free(copy), kvfold_free(old);
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
    REQUIRE(cache != nullptr);
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
