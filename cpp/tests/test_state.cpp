// Checkpoints, batch operations and the state format, through the public API. The from_bytes fuzz
// here is what the sanitizer and valgrind runs of .ci/run check for memory errors.
#include <cstdlib>
#include <cstring>
#include <random>

#include "check.hpp"
#include "fixtures.hpp"
#include "kvfold/kvfold.hpp"

using kvfold::Array;
using kvfold::Config;
using kvfold::MemoryCache;
using kvfold::RuleSpec;

namespace {

RuleSpec spec(const char* kind, std::map<std::string, std::vector<double>> params = {},
              std::map<std::string, std::string> options = {}) {
    RuleSpec s;
    s.kind = kind;
    for (auto& [name, values] : params)
        s.arrays[name] = values.size() == 1 ? Array{{}, values} : Array{{int64_t(values.size())}, values};
    s.options = options;
    return s;
}

// A GRU over concat(k, v), D = 5 + 3, one weight set shared by the heads.
RuleSpec gru() {
    std::mt19937 g(9);
    std::normal_distribution<double> d(0.0, 0.3);
    RuleSpec s;
    s.kind = "gru";
    for (const char* name : {"weight_ih", "weight_hh"}) {
        Array a{{24, 8}, std::vector<double>(24 * 8)};
        for (double& x : a.data) x = d(g);
        s.arrays[name] = a;
    }
    return s;
}

std::vector<RuleSpec> all_rules() {
    return {spec("drop"),
            spec("cumulative"),
            spec("moving", {{"n", {3}}}),
            spec("weighted", {{"betas", {0.5, 0.0, 2.0}}}),
            spec("ema", {{"alpha", {0.3}}}),
            spec("compressive", {{"slots", {2}}, {"rate", {3}}}),
            spec("compressive", {{"slots", {3}}, {"rate", {2}}}, {{"pool", "max"}}),
            spec("merge", {{"slots", {3}}}, {{"bias", "log_count"}}),
            spec("merge", {{"slots", {2}}}, {{"bias", "none"}}),
            gru(),
            spec("linear", {{"eps", {1e-6}}, {"mix", {0.5}}}, {{"feature_map", "elu1"}, {"normalize", "true"}}),
            spec("gated_delta", {{"decay", {-0.1, -0.4}}, {"beta", {0.5}}, {"mix", {0.0}}})};
}

Config config(int64_t B, kvfold::DType dtype = kvfold::DType::float16) {
    return fixtures::config(B, 2, 4, 5, 3, 4, 1, dtype);
}

// Random tokens for rows fed in `order`: row r of the result gets the tokens of source row order[r].
struct Tokens {
    int64_t T;
    std::vector<float> k, v;  // (3 source rows, H=2, T, d)
    Tokens(int64_t T, unsigned seed) : T(T), k(3 * 2 * T * 5), v(3 * 2 * T * 3) {
        std::mt19937 g(seed);
        std::normal_distribution<float> d;
        for (float& x : k) x = d(g);
        for (float& x : v) x = d(g);
    }
    void feed(MemoryCache& c, const std::vector<int64_t>& order) const {
        std::vector<float> ko, vo;
        for (int64_t r : order) {
            ko.insert(ko.end(), k.begin() + r * 2 * T * 5, k.begin() + (r + 1) * 2 * T * 5);
            vo.insert(vo.end(), v.begin() + r * 2 * T * 3, v.begin() + (r + 1) * 2 * T * 3);
        }
        c.update(ko.data(), vo.data(), T);
    }
};

std::string fed(const RuleSpec& rule, const Tokens& t, const std::vector<int64_t>& order) {
    MemoryCache c(config(int64_t(order.size())), rule);
    t.feed(c, order);
    return c.to_bytes();
}

uint32_t crc32(const std::string& s) {  // zlib's, bit by bit: independent of the library's table
    uint32_t c = 0xFFFFFFFFu;
    for (unsigned char byte : s) {
        c ^= byte;
        for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    }
    return c ^ 0xFFFFFFFFu;
}

// The state without its CRC, resealed: total size and CRC32 recomputed so the parser reads it.
std::string reseal(std::string body) {
    uint64_t total = body.size() + 4;
    std::memcpy(&body[16], &total, 8);
    uint32_t crc = crc32(body);
    body.append(reinterpret_cast<const char*>(&crc), 4);
    return body;
}

}  // namespace

TEST(rollback_restores_every_rule_bit_exactly) {
    Tokens a(13, 1), b(6, 2);
    for (const RuleSpec& rule : all_rules()) {
        MemoryCache c(config(3), rule);
        a.feed(c, {0, 1, 2});
        std::string before = c.to_bytes();
        kvfold::Checkpoint cp = c.checkpoint();
        CHECK(cp.nbytes() == c.nbytes() && cp.lengths() == c.lengths());
        b.feed(c, {2, 1, 0});
        CHECK(c.to_bytes() != before);
        c.rollback(cp);
        CHECK(c.to_bytes() == before);
        // Some rows: row 1 goes back, rows 0 and 2 keep the new tokens.
        b.feed(c, {0, 1, 2});
        std::string after = c.to_bytes();
        int64_t row = 1;
        c.rollback_rows(cp, &row, 1);
        auto lengths = c.lengths();
        CHECK(lengths[0] == 19 && lengths[1] == 13 && lengths[2] == 19);
        std::unique_ptr<MemoryCache> got = c.select(&row, 1);
        MemoryCache restored(config(3), rule);
        restored.rollback(cp);
        CHECK(got->to_bytes() == restored.select(&row, 1)->to_bytes());
    }
}

TEST(rollback_refuses_another_configuration) {
    MemoryCache c(config(2), spec("ema", {{"alpha", {0.3}}}));
    kvfold::Checkpoint cp = c.checkpoint();
    Config other = config(2);
    other.window = 5;
    MemoryCache d(other, spec("ema", {{"alpha", {0.3}}}));
    CHECK_THROWS(d.rollback(cp), kvfold::ValueError);
    MemoryCache e(config(2), spec("ema", {{"alpha", {0.5}}}));
    CHECK_THROWS(e.rollback(cp), kvfold::ValueError);
    MemoryCache f(config(3), spec("ema", {{"alpha", {0.3}}}));
    CHECK_THROWS(f.rollback(cp), kvfold::ValueError);
    int64_t bad = 2;
    CHECK_THROWS(c.rollback_rows(cp, &bad, 1), kvfold::ValueError);
    CHECK_THROWS(c.rollback(kvfold::Checkpoint{}), kvfold::ValueError);
}

TEST(reorder_select_concat_equal_caches_fed_in_that_order) {
    Tokens t(11, 3);
    for (const RuleSpec& rule : all_rules()) {
        MemoryCache c(config(3), rule);
        t.feed(c, {0, 1, 2});
        std::vector<int64_t> order{2, 2, 0, 1};
        CHECK(c.select(order.data(), 4)->to_bytes() == fed(rule, t, order));
        std::unique_ptr<MemoryCache> tail = c.select(order.data() + 2, 2);
        std::unique_ptr<MemoryCache> joined = MemoryCache::concat({&c, tail.get(), &c});
        CHECK(joined->to_bytes() == fed(rule, t, {0, 1, 2, 0, 1, 0, 1, 2}));
        c.reorder(order.data(), 4);
        CHECK(c.config().batch_size == 4 && c.to_bytes() == fed(rule, t, order));
        int64_t one = 3;
        c.reorder(&one, 1);
        CHECK(c.to_bytes() == fed(rule, t, {1}));
        // The reordered cache goes on like a fresh one.
        MemoryCache fresh(config(1), rule);
        t.feed(fresh, {1});
        Tokens more(5, 4);
        more.feed(c, {2});
        more.feed(fresh, {2});
        CHECK(c.to_bytes() == fresh.to_bytes());
    }
}

TEST(batch_operation_errors_change_nothing) {
    MemoryCache c(config(2), spec("moving", {{"n", {2}}}));
    Tokens(7, 5).feed(c, {0, 1});
    std::string before = c.to_bytes();
    std::vector<int64_t> bad{0, 2};
    CHECK_THROWS(c.reorder(bad.data(), 2), kvfold::ValueError);
    CHECK_THROWS(c.reorder(bad.data(), 0), kvfold::ValueError);
    CHECK_THROWS(c.select(bad.data(), 2), kvfold::ValueError);
    Config other = config(1);
    other.sinks = 0;
    MemoryCache d(other, spec("moving", {{"n", {2}}}));
    CHECK_THROWS(MemoryCache::concat({&c, &d}), kvfold::ValueError);
    CHECK_THROWS(MemoryCache::concat({}), kvfold::ValueError);
    CHECK_THROWS(MemoryCache::concat({&c, nullptr}), kvfold::ValueError);
    CHECK(c.to_bytes() == before);
}

TEST(from_bytes_rejects_bad_headers) {
    MemoryCache c(config(2), spec("cumulative"));
    std::string s = c.to_bytes();
    auto rejects = [](const std::string& bad) {
        CHECK_THROWS(MemoryCache::from_bytes(bad.data(), bad.size()), kvfold::ValueError);
    };
    rejects("");
    rejects("KVFOLD");
    rejects("not a kvfold state at all");
    rejects(s.substr(0, s.size() - 1));
    rejects(s + "x");
    std::string future = s;
    future[8] = 4;  // newer than this build reads
    rejects(future);
    std::string body = s.substr(0, s.size() - 4);
    std::string huge = body;
    int64_t batch = int64_t(1) << 40;
    std::memcpy(&huge[24], &batch, 8);
    rejects(reseal(huge));
    CHECK(reseal(body) == s);
}

TEST(a_token_count_past_a_rows_limit_or_an_arrays_count_is_refused) {
    MemoryCache c(config(2), spec("cumulative"));
    Tokens t(3, 5);
    t.feed(c, {0, 1});
    const std::string before = c.to_bytes();
    // never read: the count is refused first
    CHECK_THROWS(c.update(t.k.data(), t.v.data(), int64_t(1) << 62), kvfold::ValueError);  // a row holds 2^62
    CHECK_THROWS(c.update(t.k.data(), t.v.data(), int64_t(1) << 61), kvfold::ValueError);  // B H T d_k > 2^63
    std::vector<float> out(1);
    CHECK_THROWS(c.forward(t.k.data(), t.k.data(), t.v.data(), int64_t(1) << 61, out.data()), kvfold::ValueError);
    const int64_t rows[] = {0};
    CHECK_THROWS(c.reset_rows(rows, -1), kvfold::ValueError);
    CHECK(c.to_bytes() == before);
}

TEST(a_stored_rule_array_may_be_empty_and_is_then_refused_by_the_rule) {
    MemoryCache c(config(1), spec("weighted", {{"betas", {0.5, 0.0, 2.0}}}));
    std::string body = c.to_bytes();
    body.resize(body.size() - 4);
    // the header (116 bytes), the kind "weighted", one array: its name "betas", rank 1, then its shape
    const size_t shape_at = 116 + 4 + 8 + 4 + 4 + 5 + 4;
    int64_t three;
    std::memcpy(&three, &body[shape_at], 8);
    REQUIRE(three == 3);
    const int64_t zero = 0;
    std::memcpy(&body[shape_at], &zero, 8);
    body.erase(shape_at + 8, 3 * sizeof(double));
    const std::string empty = reseal(body);
    CHECK_THROWS(MemoryCache::from_bytes(empty.data(), empty.size()), kvfold::ValueError);
}

TEST(from_bytes_fuzz) {
    // Mutations of valid states, resealed half of the time so they get past the CRC: each either
    // loads and then writes back the same bytes, or is a ValueError.
    const char* env = std::getenv("KVFOLD_FUZZ_ITERATIONS");
    const int iterations = env ? std::atoi(env) : 3000;
    std::vector<std::string> states;
    Tokens t(9, 6);
    for (const RuleSpec& rule : all_rules()) {
        MemoryCache c(config(2), rule);
        t.feed(c, {0, 1});
        states.push_back(c.to_bytes());
    }
    const int64_t interesting[] = {0,  1,         7,        255, int64_t(1) << 31, int64_t(1) << 32, int64_t(1) << 62,
                                   -1, INT64_MAX, INT64_MIN};
    std::mt19937 g(7);
    int loaded = 0;
    for (int i = 0; i < iterations; ++i) {
        std::string s = states[g() % states.size()];
        for (int m = 0, n = 1 + g() % 4; m < n && !s.empty(); ++m) {
            size_t at = g() % s.size();
            switch (g() % 5) {
                case 0: s[at] = static_cast<char>(s[at] ^ (1 << (g() % 8))); break;
                case 1: s[at] = static_cast<char>(g()); break;
                case 2: {
                    int64_t x = interesting[g() % 10];
                    s.replace(at, std::min<size_t>(8, s.size() - at), reinterpret_cast<const char*>(&x), 8);
                    break;
                }
                case 3: s.insert(at, std::string(1 + g() % 8, static_cast<char>(g()))); break;
                default: s.erase(at, 1 + g() % 16);
            }
        }
        if (s.size() >= 28 && g() % 2) s = reseal(s.substr(0, s.size() - 4));
        try {
            auto c = MemoryCache::from_bytes(s.data(), s.size());
            CHECK(c->to_bytes() == s);
            std::vector<float> q(c->config().batch_size * c->config().num_query_heads * c->config().head_dim, 0.5f);
            std::vector<float> out(c->config().batch_size * c->config().num_query_heads * c->config().value_dim);
            c->attend(q.data(), out.data());
            // and folds on without reading or writing out of bounds (or refuses, unchanged)
            const Config& g = c->config();
            std::vector<float> k(g.batch_size * g.num_heads * g.head_dim, 0.25f);
            std::vector<float> v(g.batch_size * g.num_heads * g.value_dim, -0.5f);
            try {
                for (int step = 0; step < 3; ++step) c->step(q.data(), k.data(), v.data(), out.data());
            } catch (const kvfold::ValueError&) {
            }
            ++loaded;
        } catch (const kvfold::ValueError&) {
        }
    }
    CHECK(iterations < 100 || loaded > 0);
}
