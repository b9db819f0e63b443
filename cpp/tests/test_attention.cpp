// attend() against a float64 softmax, over visible sets that cross block boundaries, mix storage
// precisions, leave segments empty, and come in batches of problems with grouped query heads.
#include <cmath>
#include <random>
#include <vector>

#include "../src/attention.hpp"
#include "../src/half.hpp"
#include "../src/kernels/kernels.hpp"
#include "check.hpp"

using namespace kvfold;

namespace {

struct Stored {  // rows of keys and values in one storage precision, and their float32 values
    DType dtype;
    int64_t rows;
    std::vector<float> k, v;         // as stored (rounded), float32
    std::vector<float> k32, v32;     // float32 storage
    std::vector<uint16_t> k16, v16;  // float16 / bfloat16 storage
    Segment segment() const {
        if (dtype == DType::float32) return {k32.data(), v32.data(), rows, dtype};
        return {k16.data(), v16.data(), rows, dtype};
    }
};

Stored make_rows(int64_t rows, int64_t dk, int64_t dv, DType dtype, unsigned seed) {
    std::mt19937 g(seed);
    std::normal_distribution<float> n;
    Stored s{dtype, rows, {}, {}, {}, {}, {}, {}};
    s.k32.resize(rows * dk);
    s.v32.resize(rows * dv);
    for (float& x : s.k32) x = n(g);
    for (float& x : s.v32) x = n(g);
    s.k = s.k32;
    s.v = s.v32;
    if (dtype != DType::float32) {
        const Kernels& S = *scalar_kernels();
        auto narrow = dtype == DType::float16 ? S.f32_to_f16 : S.f32_to_bf16;
        auto widen = dtype == DType::float16 ? S.f16_to_f32 : S.bf16_to_f32;
        s.k16.resize(rows * dk);
        s.v16.resize(rows * dv);
        narrow(s.k16.data(), s.k32.data(), rows * dk);
        narrow(s.v16.data(), s.v32.data(), rows * dv);
        widen(s.k.data(), s.k16.data(), rows * dk);
        widen(s.v.data(), s.v16.data(), rows * dv);
    }
    return s;
}

// float64 softmax attention of one query over the concatenated rows; bias[p], when not empty, holds
// a logit per row of part p. Rows stored as bfloat16 meet the query as the active table's bfloat16
// scores read it (rounded to bfloat16 on avx512bf16).
std::vector<double> expected(const float* q, const std::vector<Stored>& parts, int64_t dk, int64_t dv, float scale,
                             const std::vector<std::vector<float>>& bias = {}) {
    std::vector<double> scores, out(dv, 0.0);
    std::vector<const float*> values;
    std::vector<float> q_bf16(q, q + dk);
    if (kernels().bf16_scores_round_query)
        for (float& x : q_bf16) x = bf16_to_float(float_to_bf16(x));
    for (size_t p = 0; p < parts.size(); ++p)
        for (int64_t j = 0; j < parts[p].rows; ++j) {
            const float* qp = parts[p].dtype == DType::bfloat16 ? q_bf16.data() : q;
            double s = 0;
            for (int64_t i = 0; i < dk; ++i) s += double(qp[i]) * parts[p].k[j * dk + i];
            scores.push_back(s * scale + (p < bias.size() && !bias[p].empty() ? bias[p][j] : 0.0));
            values.push_back(&parts[p].v[j * dv]);
        }
    if (scores.empty()) return out;
    double m = scores[0], total = 0;
    for (double s : scores) m = std::max(m, s);
    for (double& s : scores) total += (s = std::exp(s - m));
    for (size_t j = 0; j < scores.size(); ++j)
        for (int64_t c = 0; c < dv; ++c) out[c] += scores[j] / total * values[j][c];
    return out;
}

}  // namespace

TEST(attention_matches_float64_softmax) {
    const float scale = 0.3f;
    // (sinks, slots, window) rows, storage of sinks/window, head sizes, query heads
    struct Case {
        int64_t rows[3];
        DType dtype;
        int64_t dk, dv, nq;
    };
    const Case cases[] = {
        {{0, 1, 0}, DType::float32, 128, 128, 1},  {{4, 1, 0}, DType::float16, 17, 33, 3},
        {{4, 1, 60}, DType::float32, 33, 17, 1},   {{3, 2, 130}, DType::bfloat16, 64, 64, 2},
        {{0, 0, 0}, DType::float32, 8, 8, 4},      {{1, 0, 200}, DType::float16, 7, 5, 11},
        {{0, 8, 63}, DType::float32, 130, 1, 9},   {{2, 0, 1}, DType::bfloat16, 1, 3, 1},
        {{4, 1, 1100}, DType::float32, 33, 17, 2}, {{3, 2, 600}, DType::bfloat16, 16, 16, 9},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); ++c) {
        const Case& k = cases[c];
        std::vector<Stored> parts;
        std::vector<Segment> segs;
        for (int s = 0; s < 3; ++s)
            parts.push_back(make_rows(k.rows[s], k.dk, k.dv, s == 1 ? DType::float32 : k.dtype, 10 * c + s));
        for (const Stored& p : parts) segs.push_back(p.segment());
        std::mt19937 g(100 + c);
        std::normal_distribution<float> n;
        std::vector<float> q(k.nq * k.dk), out(k.nq * k.dv, NAN);
        for (float& x : q) x = n(g);
        Attention problem{q.data(), k.dk, k.nq, segs.data(), 3, out.data(), k.dv};
        attend(&problem, 1, k.dk, k.dv, scale);
        for (int64_t i = 0; i < k.nq; ++i) {
            auto want = expected(q.data() + i * k.dk, parts, k.dk, k.dv, scale);
            for (int64_t j = 0; j < k.dv; ++j) CHECK_NEAR(out[i * k.dv + j], want[j], 2e-5);
        }
    }
}

// Problems of one size in one call: more than are taken together, each with its own visible set.
TEST(batched_problems_are_independent) {
    const int64_t dk = 33, dv = 20, nq = 2, count = 7;
    const float scale = 0.2f;
    std::vector<std::vector<Stored>> stored;
    std::vector<std::vector<Segment>> segments(count);
    std::vector<std::vector<float>> queries, outs;
    std::vector<Attention> problems;
    for (int64_t c = 0; c < count; ++c) {
        std::vector<Stored> parts;
        const int64_t rows[3] = {c % 3, c % 2, c * 13 + (c == 5) * 600};  // some empty, some beyond one block
        for (int s = 0; s < 3; ++s)
            parts.push_back(make_rows(rows[s], dk, dv, s == 2 ? DType::float16 : DType::float32, 7 * c + s));
        stored.push_back(parts);
        std::mt19937 g(200 + c);
        std::normal_distribution<float> n;
        std::vector<float> q(nq * dk);
        for (float& x : q) x = n(g);
        queries.push_back(q);
        outs.emplace_back(nq * dv, NAN);
    }
    for (int64_t c = 0; c < count; ++c) {
        for (const Stored& p : stored[c]) segments[c].push_back(p.segment());
        problems.push_back({queries[c].data(), dk, nq, segments[c].data(), 3, outs[c].data(), dv});
    }
    attend(problems.data(), static_cast<int>(count), dk, dv, scale);
    for (int64_t c = 0; c < count; ++c)
        for (int64_t i = 0; i < nq; ++i) {
            auto want = expected(queries[c].data() + i * dk, stored[c], dk, dv, scale);
            for (int64_t j = 0; j < dv; ++j) CHECK_NEAR(outs[c][i * dv + j], want[j], 2e-5);
        }
}

// A segment's per-row logit bias (memory slots that stand for several pairs) shifts its rows' scores,
// in the one-block softmax and in the online softmax of long visible sets alike.
TEST(row_bias_is_added_to_the_scores) {
    const float scale = 0.25f;
    const int64_t cases[][3] = {{2, 5, 9}, {0, 70, 3}, {4, 3, 100}, {0, 1, 0}, {2, 600, 450}};  // sinks, slots, window
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); ++c) {
        const int64_t dk = 19, dv = 11, nq = 3;
        std::vector<Stored> parts;
        for (int s = 0; s < 3; ++s)
            parts.push_back(make_rows(cases[c][s], dk, dv, s == 2 ? DType::float16 : DType::float32, 31 * c + s));
        std::vector<std::vector<float>> bias(3);
        for (int64_t j = 0; j < cases[c][1]; ++j) bias[1].push_back(std::log(1.0f + static_cast<float>(j % 7)));
        std::vector<Segment> segs;
        for (const Stored& p : parts) segs.push_back(p.segment());
        segs[1].bias = bias[1].data();
        std::mt19937 g(300 + c);
        std::normal_distribution<float> n;
        std::vector<float> q(nq * dk), out(nq * dv, NAN);
        for (float& x : q) x = n(g);
        Attention problem{q.data(), dk, nq, segs.data(), 3, out.data(), dv};
        attend(&problem, 1, dk, dv, scale);
        for (int64_t i = 0; i < nq; ++i) {
            auto want = expected(q.data() + i * dk, parts, dk, dv, scale, bias);
            for (int64_t j = 0; j < dv; ++j) CHECK_NEAR(out[i * dv + j], want[j], 2e-5);
        }
    }
}
