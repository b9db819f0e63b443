// What the C API tests share: small configurations, a C rule spec that owns its arrays (and gives
// the same rule for the C++ API), and caches created through the C API.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "fixtures.hpp"
#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

namespace c_api_fixtures {

using fixtures::normal;

// B=2, H=2, Hq=4, d_k=5, d_v=3, a window of 3 and one sink.
inline kvfold_config small_config() {
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

inline kvfold::Config to_cpp(const kvfold_config& c) {
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

inline kvfold_cache* create(const kvfold_config& c, const CRule& r) {
    kvfold_cache* cache = nullptr;
    kvfold_status s = kvfold_create(&c, &r.rule, &cache);
    if (s != KVFOLD_OK) std::printf("  create failed: %s\n", kvfold_last_error(nullptr));
    return cache;
}

inline std::vector<uint8_t> bytes_of(const kvfold_cache* cache) {
    size_t n = 0;
    if (kvfold_to_bytes(cache, nullptr, 0, &n) != KVFOLD_OK) return {};
    std::vector<uint8_t> b(n);
    if (kvfold_to_bytes(cache, b.data(), b.size(), &n) != KVFOLD_OK) return {};
    return b;
}

inline bool contains(const char* message, const char* part) { return std::strstr(message, part) != nullptr; }

// B=2, H=2, Hq=4, d_k=6 (a RoPE rotates pairs of dimensions), d_v=3, a window of 3 and one sink.
inline kvfold_config rope_config() {
    kvfold_config c = small_config();
    c.head_dim = 6;
    return c;
}

inline kvfold_options options(double theta, int64_t dim, int layout, int retain, int64_t recent = -1) {
    kvfold_options o;
    kvfold_options_init(&o, sizeof o);
    o.rope_theta = theta, o.rope_dim = dim, o.rope_layout = layout, o.retain = retain, o.recent = recent;
    return o;
}

inline kvfold::Config to_cpp(const kvfold_config& c, const kvfold_options& o) {
    kvfold::Config g = to_cpp(c);
    g.rope = kvfold::RoPE{o.rope_theta, o.rope_dim, o.rope_layout == KVFOLD_ROPE_INTERLEAVED};
    if (o.rope_frequencies) g.rope.frequencies.assign(o.rope_frequencies, o.rope_frequencies + o.rope_frequency_count);
    g.retain = static_cast<kvfold::Retain>(o.retain);
    g.recent = o.recent;
    return g;
}

inline kvfold_cache* create(const kvfold_config& c, const kvfold_options& o, const CRule& r) {
    kvfold_cache* cache = nullptr;
    kvfold_status s = kvfold_create_with_options(&c, &o, &r.rule, &cache);
    if (s != KVFOLD_OK) std::printf("  create failed: %s\n", kvfold_last_error(nullptr));
    return cache;
}

}  // namespace c_api_fixtures
