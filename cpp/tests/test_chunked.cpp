// The chunked fold of a matrix memory (chunked.cpp) against the same rule folding pair after pair
// (MatrixRule::fold_read_run's definition), for every rule, gate shape and chunk size.
#include <cmath>
#include <memory>
#include <random>
#include <stdexcept>

#include "../src/rule.hpp"
#include "check.hpp"
#include "fixtures.hpp"

using namespace kvfold;

namespace {

using fixtures::normal;
using fixtures::rule;

std::unique_ptr<MatrixRule> planned(const RuleSpec& spec, const Dims& dims) {
    std::unique_ptr<Rule> any = make_rule(spec);
    if (!dynamic_cast<MatrixRule*>(any.get())) throw std::logic_error(spec.kind + " is not a matrix rule");
    std::unique_ptr<MatrixRule> rule(static_cast<MatrixRule*>(any.release()));
    rule->plan(dims);
    for (LaneBuffer* b : rule->buffers()) b->allocate();
    return rule;
}

// One lane folds n pairs with its gates, two query heads reading after each; both ways agree.
void check_run(const RuleSpec& spec, bool decay, bool per_key, bool beta, unsigned seed) {
    const int64_t H = 2, dk = 17, dv = 9, n = 45, nq = 2, lane = 1;
    const Dims dims{H, H, dk, dv, DType::float32, H * nq};
    auto k = normal(n * dk, seed), v = normal(n * dv, seed + 1), q = normal(nq * n * dk, seed + 2);
    for (int64_t t = 0; t < n; ++t) {  // unit keys, as the delta rules want them
        double norm = 0;
        for (int64_t i = 0; i < dk; ++i) norm += k[t * dk + i] * k[t * dk + i];
        for (int64_t i = 0; i < dk; ++i) k[t * dk + i] /= static_cast<float>(std::sqrt(norm));
    }
    auto g = normal(n * dk, seed + 3), b = normal(n, seed + 4);
    for (float& x : g) x = -0.4f * std::fabs(x);
    for (float& x : b) x = 0.5f + 0.4f * std::tanh(x);
    std::vector<const float*> kr(n), vr(n);
    std::vector<TokenGate> gates(n);
    for (int64_t t = 0; t < n; ++t) {
        kr[t] = &k[t * dk], vr[t] = &v[t * dv];
        if (decay) gates[t].decay = &g[t * (per_key ? dk : 1)], gates[t].decay_per_key = per_key;
        if (beta) gates[t].beta = &b[t];
    }
    auto S0 = normal(dk * dv, seed + 5, 0.3f);
    std::vector<float> want(nq * n * dv), got(nq * n * dv);
    auto one_by_one = planned(spec, dims);
    std::copy(S0.begin(), S0.end(), one_by_one->matrix_state(lane));
    FoldRun run{
        n,  kr.data(), vr.data(), gates.data(), LaneQueries{q.data(), nq, n * dk, want.data(), n * dv, 0.25f, 2},
        dk, dv};
    one_by_one->MatrixRule::fold_read_run(lane, run);
    for (int64_t chunk : {int64_t(1), int64_t(5), int64_t(32)}) {
        set_chunk_size(chunk);
        auto chunked = planned(spec, dims);
        std::copy(S0.begin(), S0.end(), chunked->matrix_state(lane));
        run.qs.out = got.data();
        chunked->fold_read_run(lane, run);
        for (size_t i = 0; i < got.size(); ++i) CHECK_NEAR(got[i], want[i], 2e-5);
        for (int64_t i = 0; i < dk * dv; ++i)
            CHECK_NEAR(chunked->matrix_state(lane)[i], one_by_one->matrix_state(lane)[i], 2e-5);
        if (float* z = chunked->normalizer(lane))
            for (int64_t i = 0; i < dk; ++i) CHECK_NEAR(z[i], one_by_one->normalizer(lane)[i], 2e-5);
        CHECK(chunked->matrix_state(0)[0] == 0.0f);  // the other lane untouched
    }
    set_chunk_size(32);
}

}  // namespace

TEST(chunked_fold_equals_the_pair_by_pair_fold) {
    check_run(rule("linear"), false, false, false, 1);
    RuleSpec normalized = rule("linear");
    normalized.options = {{"feature_map", "elu1"}, {"normalize", "true"}};
    check_run(normalized, false, false, false, 2);
    RuleSpec relu = rule("linear");
    relu.options = {{"feature_map", "relu"}};
    check_run(relu, false, false, false, 3);
    check_run(rule("gated"), true, false, false, 4);
    check_run(rule("gated"), true, true, false, 5);
    check_run(rule("delta"), false, false, true, 6);
    check_run(rule("gated_delta"), true, false, true, 7);
    check_run(rule("gated_delta"), true, true, true, 8);
    RuleSpec constants = rule("gated_delta");  // the rule's own gates: one decay per key, one beta per head
    constants.arrays["decay"] = Array{{2, 17}, std::vector<double>(34, -0.2)};
    constants.arrays["beta"] = Array{{2}, {0.3, 0.7}};
    check_run(constants, false, false, false, 9);
}
