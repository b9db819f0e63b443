// Inputs shared by the native tests and the native benchmark harness.
#pragma once

#include <map>
#include <random>
#include <string>
#include <vector>

#include "kvfold/kvfold.hpp"

namespace fixtures {

// n values drawn from a normal distribution of standard deviation `scale`.
inline std::vector<float> normal(size_t n, unsigned seed, float scale = 1.0f) {
    std::mt19937 g(seed);
    std::normal_distribution<float> d;
    std::vector<float> x(n);
    for (float& f : x) f = scale * d(g);
    return x;
}

// A cache of B rows, H KV heads and Hq query heads, d_k, d_v, a window and sinks (the order of the
// Python tests' shapes), stored as dtype.
inline kvfold::Config config(int64_t B, int64_t H, int64_t Hq, int64_t dk, int64_t dv, int64_t window, int64_t sinks,
                             kvfold::DType dtype = kvfold::DType::float32) {
    kvfold::Config c;
    c.batch_size = B, c.num_heads = H, c.num_query_heads = Hq, c.head_dim = dk, c.value_dim = dv;
    c.window = window, c.sinks = sinks, c.dtype = dtype;
    return c;
}

// A rule of the given kind with scalar parameters.
inline kvfold::RuleSpec rule(const char* kind, std::map<std::string, double> scalars = {}) {
    kvfold::RuleSpec s;
    s.kind = kind;
    for (auto& [k, v] : scalars) s.arrays[k] = kvfold::Array{{}, {v}};
    return s;
}

}  // namespace fixtures
