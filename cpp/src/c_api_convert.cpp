// The C API's conversions between the C structs of kvfold.h (configuration, options, rule, gates)
// and the C++ ones; each names the member it rejects.
#include <cstddef>
#include <string>
#include <vector>

#include "c_api_support.hpp"

namespace kvfold::capi {

kvfold::TokenGates token_gates(const kvfold_gates* gates) {
    kvfold::TokenGates g;
    if (gates) {
        g.decay = gates->decay;
        g.decay_per_key = gates->decay_per_key != 0;
        g.beta = gates->beta;
    }
    return g;
}

// The C form of a configuration (kvfold_dtype values are DType's).
void to_c(const kvfold::Config& g, kvfold_config* out) {
    out->batch_size = g.batch_size;
    out->num_heads = g.num_heads;
    out->head_dim = g.head_dim;
    out->value_dim = g.value_dim;
    out->num_query_heads = g.num_query_heads;
    out->window = g.window;
    out->sinks = g.sinks;
    out->scale = g.scale;
    out->dtype = static_cast<int>(g.dtype);
    out->check_finite = g.check_finite ? 1 : 0;
}

kvfold::Config to_cpp(const kvfold_config& c) {
    kvfold::Config g;
    g.batch_size = c.batch_size;
    g.num_heads = c.num_heads;
    g.head_dim = c.head_dim;
    g.value_dim = c.value_dim;
    g.num_query_heads = c.num_query_heads;
    g.window = c.window;
    g.sinks = c.sinks;
    g.scale = c.scale;
    switch (c.dtype) {
        case KVFOLD_FLOAT32: g.dtype = kvfold::DType::float32; break;
        case KVFOLD_FLOAT16: g.dtype = kvfold::DType::float16; break;
        case KVFOLD_BFLOAT16: g.dtype = kvfold::DType::bfloat16; break;
        case KVFOLD_INT8: g.dtype = kvfold::DType::int8; break;
        default:
            fail(
                "config.dtype: expected KVFOLD_FLOAT32 (0), KVFOLD_FLOAT16 (1), KVFOLD_BFLOAT16 (2) or KVFOLD_INT8 "
                "(3), got " +
                std::to_string(c.dtype));
    }
    g.check_finite = c.check_finite != 0;
    return g;
}

// The sizes of kvfold_options callers pass: the first one (every member through `recent`) and this
// header's, which adds the RoPE's frequencies.
constexpr size_t kFirstOptionsSize = offsetof(kvfold_options, rope_frequencies);
constexpr size_t kOptionsSize = sizeof(kvfold_options);

void check_options_size(size_t size, const char* name) {
    if (size != kOptionsSize && size != kFirstOptionsSize)
        fail(std::string(name) + ": expected sizeof(kvfold_options) = " + std::to_string(kOptionsSize) + " (or " +
             std::to_string(kFirstOptionsSize) + ", an older kvfold.h's) bytes, set by kvfold_options_init, got " +
             std::to_string(size) +
             (size > kOptionsSize ? " (the program was built against a newer kvfold.h than this library)" : ""));
}

bool has_frequencies(const kvfold_options& o) { return o.size >= kOptionsSize; }

// The C form of the options of a configuration.
void to_c(const kvfold::Config& g, kvfold_options* out) {
    const std::vector<double>& frequencies = g.rope.frequencies;
    if (!frequencies.empty() && !has_frequencies(*out))
        fail("out->size: this cache's RoPE has frequencies of its own, which a kvfold_options of " +
             std::to_string(out->size) + " bytes (an older kvfold.h's) cannot hold; expected " +
             std::to_string(kOptionsSize));
    out->rope_theta = g.rope.theta;
    out->rope_dim = g.rope.dim;
    out->rope_layout = g.rope.interleaved ? KVFOLD_ROPE_INTERLEAVED : KVFOLD_ROPE_HALF;
    out->retain = static_cast<int>(g.retain);
    out->recent = g.recent;
    if (has_frequencies(*out)) {
        out->rope_frequencies = frequencies.empty() ? nullptr : frequencies.data();
        out->rope_frequency_count = static_cast<int64_t>(frequencies.size());
    }
}

// Sets the options on a configuration; the C++ constructor checks their values.
void apply(const kvfold_options& o, kvfold::Config* g) {
    check_options_size(o.size, "options.size");
    g->rope.theta = o.rope_theta;
    g->rope.dim = o.rope_dim;
    switch (o.rope_layout) {
        case KVFOLD_ROPE_HALF: g->rope.interleaved = false; break;
        case KVFOLD_ROPE_INTERLEAVED: g->rope.interleaved = true; break;
        default:
            fail("options.rope_layout: expected KVFOLD_ROPE_HALF (0) or KVFOLD_ROPE_INTERLEAVED (1), got " +
                 std::to_string(o.rope_layout));
    }
    switch (o.retain) {
        case KVFOLD_RETAIN_FIFO: g->retain = kvfold::Retain::fifo; break;
        case KVFOLD_RETAIN_TOVA: g->retain = kvfold::Retain::tova; break;
        case KVFOLD_RETAIN_H2O: g->retain = kvfold::Retain::h2o; break;
        default:
            fail(
                "options.retain: expected KVFOLD_RETAIN_FIFO (0), KVFOLD_RETAIN_TOVA (1) or KVFOLD_RETAIN_H2O (2), "
                "got " +
                std::to_string(o.retain));
    }
    g->recent = o.recent;
    if (!has_frequencies(o) || o.rope_frequency_count == 0) return;
    if (o.rope_frequency_count < 0 || o.rope_frequency_count > g->head_dim / 2)
        fail(
            "options.rope_frequency_count: expected 0 (theta's) or the rotated dimensions / 2, at most head_dim / 2 "
            "= " +
            std::to_string(g->head_dim / 2) + ", got " + std::to_string(o.rope_frequency_count));
    if (!o.rope_frequencies)
        fail("options.rope_frequencies: expected " + std::to_string(o.rope_frequency_count) + " values, got NULL");
    g->rope.frequencies.assign(o.rope_frequencies, o.rope_frequencies + o.rope_frequency_count);
}

kvfold::RuleSpec to_cpp(const kvfold_rule& r) {
    kvfold::RuleSpec s;
    require(r.kind, "rule.kind");
    s.kind = r.kind;
    if (s.kind == "custom")
        throw kvfold::TypeError("rule.kind: 'custom' rules fold with a Python function and are not available from C");
    if (r.num_params) require(r.params, "rule.params");
    for (size_t i = 0; i < r.num_params; ++i) {
        const kvfold_param& p = r.params[i];
        const std::string where = "rule.params[" + std::to_string(i) + "]";
        require(p.name, (where + ".name").c_str());
        if (s.arrays.count(p.name)) fail(where + ".name: parameter '" + p.name + "' is given twice");
        if (p.ndim < 0 || p.ndim > 8) fail(where + ".ndim: expected 0 to 8, got " + std::to_string(p.ndim));
        if (p.ndim) require(p.shape, (where + ".shape").c_str());
        kvfold::Array a;
        size_t n = 1;
        for (int d = 0; d < p.ndim; ++d) {
            if (p.shape[d] < 0 || p.shape[d] > (int64_t(1) << 32))
                fail(where + ".shape[" + std::to_string(d) + "]: expected a size in [0, 2^32], got " +
                     std::to_string(p.shape[d]));
            a.shape.push_back(p.shape[d]);
            n *= static_cast<size_t>(p.shape[d]);
            if (n > (size_t(1) << 32)) fail(where + ".shape: expected at most 2^32 values");
        }
        if (n) require(p.data, (where + ".data").c_str());
        a.data.assign(p.data, p.data + n);
        s.arrays[p.name] = std::move(a);
    }
    if (r.num_options) require(r.options, "rule.options");
    for (size_t i = 0; i < r.num_options; ++i) {
        const kvfold_option& o = r.options[i];
        const std::string where = "rule.options[" + std::to_string(i) + "]";
        require(o.name, (where + ".name").c_str());
        require(o.value, (where + ".value").c_str());
        if (s.options.count(o.name)) fail(where + ".name: option '" + o.name + "' is given twice");
        s.options[o.name] = o.value;
    }
    return s;
}

}  // namespace kvfold::capi
