// The model end to end through the public API.
#include <cmath>
#include <cstring>
#include <random>

#include "check.hpp"
#include "fixtures.hpp"
#include "kvfold/kvfold.hpp"

using namespace kvfold;

namespace {

using fixtures::normal;
using fixtures::rule;

Config config(int64_t B, int64_t H, int64_t d, int64_t window, int64_t sinks) {
    return fixtures::config(B, H, H, d, d, window, sinks);
}

}  // namespace

TEST(cumulative_is_the_mean) {
    const int64_t d = 7, T = 50;
    MemoryCache cache(config(1, 1, d, 0, 0), rule("cumulative"));
    auto k = normal(T * d, 1), v = normal(T * d, 2);
    cache.update(k.data(), v.data(), T);
    std::vector<float> mk(d), mv(d);
    cache.memory(mk.data(), mv.data());
    for (int64_t i = 0; i < d; ++i) {
        double sk = 0, sv = 0;
        for (int64_t t = 0; t < T; ++t) sk += k[t * d + i], sv += v[t * d + i];
        CHECK_NEAR(mk[i], sk / T, 1e-6);
        CHECK_NEAR(mv[i], sv / T, 1e-6);
    }
}

TEST(one_slot_attention_returns_its_value) {
    const int64_t d = 17;
    MemoryCache cache(config(1, 1, d, 0, 0), rule("ema", {{"alpha", 0.5}}));
    auto k = normal(d, 3), v = normal(d, 4), q = normal(d, 5);
    std::vector<float> out(d);
    cache.step(q.data(), k.data(), v.data(), out.data());
    for (int64_t i = 0; i < d; ++i) CHECK_NEAR(out[i], v[i], 1e-6);
}

TEST(empty_cache_attends_to_zeros) {
    MemoryCache cache(config(2, 3, 5, 4, 1), rule("drop"));
    auto q = normal(2 * 3 * 5, 6);
    std::vector<float> out(2 * 3 * 5, 1.0f);
    cache.attend(q.data(), out.data());
    for (float x : out) CHECK(x == 0.0f);
}

TEST(window_longer_than_stream_is_full_attention) {
    const int64_t d = 33, T = 70;
    MemoryCache cache(config(1, 1, d, 128, 0), rule("drop"));
    auto q = normal(T * d, 7), k = normal(T * d, 8), v = normal(T * d, 9);
    std::vector<float> out(T * d);
    cache.forward(q.data(), k.data(), v.data(), T, out.data());
    float scale = 1.0f / std::sqrt(float(d));
    for (int64_t t = 0; t < T; t += 13) {
        std::vector<double> w(t + 1);
        double m = -1e300, z = 0;
        for (int64_t j = 0; j <= t; ++j) {
            double s = 0;
            for (int64_t i = 0; i < d; ++i) s += double(q[t * d + i]) * k[j * d + i];
            w[j] = s * scale;
            m = std::max(m, w[j]);
        }
        for (auto& x : w) z += (x = std::exp(x - m));
        for (int64_t i = 0; i < d; ++i) {
            double o = 0;
            for (int64_t j = 0; j <= t; ++j) o += w[j] / z * v[j * d + i];
            CHECK_NEAR(out[t * d + i], o, 1e-5);
        }
    }
}

TEST(state_round_trip_is_bit_exact) {
    const int64_t d = 9, T = 40;
    RuleSpec spec = rule("compressive", {{"slots", 3}, {"rate", 4}});
    spec.options["pool"] = "max";
    Config c = config(2, 2, d, 5, 2);
    c.dtype = kvfold::DType::float16;
    MemoryCache cache(c, spec);
    auto k = normal(2 * 2 * T * d, 10), v = normal(2 * 2 * T * d, 11);
    cache.update(k.data(), v.data(), T);
    std::string bytes = cache.to_bytes();
    auto loaded = MemoryCache::from_bytes(bytes.data(), bytes.size());
    CHECK(loaded->to_bytes() == bytes);
    CHECK(loaded->nbytes() == cache.nbytes());
    auto q = normal(2 * 2 * d, 12);
    std::vector<float> a(2 * 2 * d), b(2 * 2 * d);
    cache.attend(q.data(), a.data());
    loaded->attend(q.data(), b.data());
    CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
    // Every single-byte corruption is caught.
    for (size_t i = 0; i < bytes.size(); i += 7) {
        std::string bad = bytes;
        bad[i] = static_cast<char>(bad[i] ^ 0x5a);
        CHECK_THROWS(MemoryCache::from_bytes(bad.data(), bad.size()), kvfold::ValueError);
    }
    for (size_t n = 0; n < bytes.size(); n += 11)
        CHECK_THROWS(MemoryCache::from_bytes(bytes.data(), n), kvfold::ValueError);
}

TEST(bad_configuration_is_a_value_error) {
    CHECK_THROWS(MemoryCache(config(0, 1, 4, 0, 0), rule("drop")), kvfold::ValueError);
    CHECK_THROWS(MemoryCache(config(1, 1, 4, -1, 0), rule("drop")), kvfold::ValueError);
    CHECK_THROWS(MemoryCache(config(1, 1, 4, int64_t(1) << 32, 0), rule("drop")), kvfold::ValueError);
    CHECK_THROWS(MemoryCache(config(1, 1, 4, 0, 0), rule("ema", {{"alpha", 0}})), kvfold::ValueError);
    CHECK_THROWS(MemoryCache(config(1, 1, 4, 0, 0), rule("nonsense")), kvfold::ValueError);
    Config c = config(1, 2, 4, 0, 0);
    c.num_query_heads = 3;
    CHECK_THROWS(MemoryCache(c, rule("drop")), kvfold::ValueError);
}

TEST(non_finite_input_is_rejected_and_changes_nothing) {
    const int64_t d = 4;
    MemoryCache cache(config(1, 1, d, 2, 0), rule("cumulative"));
    auto k = normal(d, 13), v = normal(d, 14);
    cache.update(k.data(), v.data(), 1);
    std::string before = cache.to_bytes();
    k[2] = NAN;
    CHECK_THROWS(cache.update(k.data(), v.data(), 1), kvfold::ValueError);
    CHECK(cache.to_bytes() == before);
}

TEST(gated_delta_matches_the_recurrence) {
    // window = 0: every token folds at once; o_t = scale q_t^T S_t with per-key decay and beta.
    const int64_t dk = 7, dv = 5, T = 20;
    Config c = config(1, 1, dk, 0, 0);
    c.value_dim = dv;
    MemoryCache cache(c, rule("gated_delta"));
    CHECK(cache.matrix_memory() && cache.memory_slots() == 0);
    auto q = normal(T * dk, 20), k = normal(T * dk, 21), v = normal(T * dv, 22), g = normal(T * dk, 23),
         beta = normal(T, 24);
    for (auto& x : k) x *= 0.3f;
    for (auto& x : g) x = -std::fabs(x) * 0.2f;
    for (auto& x : beta) x = std::fabs(x) * 0.5f;
    std::vector<float> out(T * dv);
    kvfold::TokenGates gates;
    gates.decay = g.data();
    gates.decay_per_key = true;
    gates.beta = beta.data();
    cache.forward(q.data(), k.data(), v.data(), T, out.data(), gates);
    std::vector<double> S(dk * dv, 0.0);
    const double scale = 1 / std::sqrt(double(dk));
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) S[i * dv + j] *= std::exp(double(g[t * dk + i]));
        for (int64_t j = 0; j < dv; ++j) {
            double r = 0;
            for (int64_t i = 0; i < dk; ++i) r += S[i * dv + j] * k[t * dk + i];
            double u = beta[t] * (v[t * dv + j] - r);
            for (int64_t i = 0; i < dk; ++i) S[i * dv + j] += k[t * dk + i] * u;
        }
        for (int64_t j = 0; j < dv; ++j) {
            double o = 0;
            for (int64_t i = 0; i < dk; ++i) o += q[t * dk + i] * S[i * dv + j];
            CHECK_NEAR(out[t * dv + j], scale * o, 1e-5);
        }
    }
    std::vector<float> state(dk * dv);
    cache.memory(state.data(), nullptr);
    for (int64_t i = 0; i < dk * dv; ++i) CHECK_NEAR(state[i], S[i], 1e-5);
}

TEST(matrix_state_with_windowed_gates_round_trips) {
    const int64_t d = 6, T = 30;
    Config c = config(2, 2, d, 4, 1);
    c.num_query_heads = 4;
    MemoryCache cache(c, rule("gated"));
    auto k = normal(2 * 2 * T * d, 30), v = normal(2 * 2 * T * d, 31), g = normal(2 * 2 * T, 32);
    for (auto& x : g) x = -std::fabs(x);
    kvfold::TokenGates gates;
    gates.decay = g.data();
    cache.update(k.data(), v.data(), T, gates);
    std::string bytes = cache.to_bytes();
    auto loaded = MemoryCache::from_bytes(bytes.data(), bytes.size());
    CHECK(loaded->to_bytes() == bytes);
    // The window's gates were saved: both fold the same pairs with the same decays from here on.
    auto k2 = normal(2 * 2 * d, 33), q = normal(2 * 4 * d, 34);
    float g2[4] = {-0.1f, -0.2f, -0.3f, -0.4f};
    gates.decay = g2;
    std::vector<float> a(2 * 4 * d), b(2 * 4 * d);
    cache.step(q.data(), k2.data(), k2.data(), a.data(), gates);
    loaded->step(q.data(), k2.data(), k2.data(), b.data(), gates);
    CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
    CHECK(cache.to_bytes() == loaded->to_bytes());
    // A per-token decay the rule needs cannot be left out, and a failed call changes nothing.
    CHECK_THROWS(cache.update(k2.data(), k2.data(), 1), kvfold::ValueError);
    CHECK(cache.to_bytes() == loaded->to_bytes());
}

TEST(matrix_forward_in_chunks_is_a_loop_of_step) {
    // Sinks, a window of float16 pairs, grouped queries and two rows: the block runs chunked (its
    // folds in chunks of 4 pairs, some from the window) and the steps token by token.
    const int64_t B = 2, H = 2, Hq = 4, dk = 9, dv = 5, T = 25;
    Config c = config(B, H, dk, 3, 2);
    c.num_query_heads = Hq;
    c.value_dim = dv;
    c.dtype = kvfold::DType::float16;
    MemoryCache blocks(c, rule("gated_delta")), steps(c, rule("gated_delta"));
    auto q = normal(B * Hq * T * dk, 40), k = normal(B * H * T * dk, 41), v = normal(B * H * T * dv, 42),
         g = normal(B * H * T, 43), beta = normal(B * H * T, 44);
    for (auto& x : k) x *= 0.3f;
    for (auto& x : g) x = -std::fabs(x) * 0.3f;
    for (auto& x : beta) x = std::fabs(x) * 0.5f;
    kvfold::TokenGates gates;
    gates.decay = g.data();
    gates.beta = beta.data();
    kvfold::set_chunk_size(4);
    std::vector<float> out(B * Hq * T * dv);
    blocks.forward(q.data(), k.data(), v.data(), T, out.data(), gates);
    kvfold::set_chunk_size(32);
    std::vector<float> qt(B * Hq * dk), kt(B * H * dk), vt(B * H * dv), gt(B * H), bt(B * H), ot(B * Hq * dv);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t r = 0; r < B * Hq; ++r) std::memcpy(&qt[r * dk], &q[(r * T + t) * dk], sizeof(float) * dk);
        for (int64_t r = 0; r < B * H; ++r) {
            std::memcpy(&kt[r * dk], &k[(r * T + t) * dk], sizeof(float) * dk);
            std::memcpy(&vt[r * dv], &v[(r * T + t) * dv], sizeof(float) * dv);
            gt[r] = g[r * T + t], bt[r] = beta[r * T + t];
        }
        kvfold::TokenGates one;
        one.decay = gt.data();
        one.beta = bt.data();
        steps.step(qt.data(), kt.data(), vt.data(), ot.data(), one);
        for (int64_t r = 0; r < B * Hq; ++r)
            for (int64_t j = 0; j < dv; ++j) CHECK_NEAR(out[(r * T + t) * dv + j], ot[r * dv + j], 1e-4);
    }
    std::vector<float> S1(B * H * dk * dv), S2(S1.size());
    blocks.memory(S1.data(), nullptr);
    steps.memory(S2.data(), nullptr);
    for (size_t i = 0; i < S1.size(); ++i) CHECK_NEAR(S1[i], S2[i], 1e-4);
}
