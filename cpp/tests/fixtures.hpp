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

// A rule of the given kind with scalar parameters.
inline kvfold::RuleSpec rule(const char* kind, std::map<std::string, double> scalars = {}) {
    kvfold::RuleSpec s;
    s.kind = kind;
    for (auto& [k, v] : scalars) s.arrays[k] = kvfold::Array{{}, {v}};
    return s;
}

}  // namespace fixtures
