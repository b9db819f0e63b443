// The C API (kvfold/kvfold.h) over the public C++ API: every call checks its pointers, runs the C++
// call inside one try block and turns what it throws into a status code and a message.
#include "kvfold/kvfold.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "kvfold/kvfold.hpp"

struct kvfold_cache {
    std::unique_ptr<kvfold::MemoryCache> cache;
    mutable std::mutex error_mu;
    mutable std::string error;
};

struct kvfold_checkpoint {
    kvfold::Checkpoint checkpoint;
};

namespace {

thread_local std::string thread_error;

// A failure: its code and message, recorded for the thread and, when there is one, the handle.
struct Failure {
    kvfold_status status;
    std::string message;
};

kvfold_status record(const kvfold_cache* cache, const Failure& f) {
    try {
        thread_error = f.message;
        if (cache) {
            std::lock_guard<std::mutex> lock(cache->error_mu);
            cache->error = f.message;
        }
    } catch (...) {  // no memory left for the message: the code still says what happened
    }
    return f.status;
}

// Runs fn, which returns normally or throws; nothing escapes.
template <class F>
kvfold_status guarded(const kvfold_cache* cache, F&& fn) {
    try {
        fn();
        return KVFOLD_OK;
    } catch (const kvfold::ValueError& e) {
        return record(cache, {KVFOLD_VALUE_ERROR, e.what()});
    } catch (const kvfold::TypeError& e) {
        return record(cache, {KVFOLD_TYPE_ERROR, e.what()});
    } catch (const std::bad_alloc&) {
        return record(cache, {KVFOLD_OUT_OF_MEMORY, "out of memory"});
    } catch (const std::length_error& e) {
        return record(cache, {KVFOLD_OUT_OF_MEMORY, std::string("out of memory: ") + e.what()});
    } catch (const std::invalid_argument& e) {
        return record(cache, {KVFOLD_VALUE_ERROR, e.what()});
    } catch (const std::exception& e) {
        return record(cache, {KVFOLD_INTERNAL_ERROR, std::string("internal error: ") + e.what()});
    } catch (...) {
        return record(cache, {KVFOLD_INTERNAL_ERROR, "internal error: an unknown exception"});
    }
}

// Thrown by the checks below; guarded() reports it as a value error.
[[noreturn]] void fail(const std::string& message) { throw kvfold::ValueError(message); }

void require(const void* p, const char* name) {
    if (!p) fail(std::string(name) + ": expected a pointer, got null");
}

// The arrays of a step or a forward, none of them null.
void require_step(const float* q, const float* k, const float* v, const float* out) {
    require(q, "q");
    require(k, "k");
    require(v, "v");
    require(out, "out");
}

kvfold::MemoryCache& live(kvfold_cache* cache) {
    if (!cache) fail("cache: expected a kvfold_cache, got null");
    return *cache->cache;
}
const kvfold::MemoryCache& live(const kvfold_cache* cache) {
    if (!cache) fail("cache: expected a kvfold_cache, got null");
    return *cache->cache;
}

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
        default:
            fail("config.dtype: expected KVFOLD_FLOAT32 (0), KVFOLD_FLOAT16 (1) or KVFOLD_BFLOAT16 (2), got " +
                 std::to_string(c.dtype));
    }
    g.check_finite = c.check_finite != 0;
    return g;
}

// The first kvfold_options (every member through `recent`): the size callers of this version pass.
constexpr size_t kOptionsSize = sizeof(kvfold_options);

void check_options_size(size_t size, const char* name) {
    if (size != kOptionsSize)
        fail(std::string(name) + ": expected sizeof(kvfold_options) = " + std::to_string(kOptionsSize) +
             " bytes (set by kvfold_options_init), got " + std::to_string(size) +
             (size > kOptionsSize ? " (the program was built against a newer kvfold.h than this library)" : ""));
}

// The C form of the options of a configuration.
void to_c(const kvfold::Config& g, kvfold_options* out) {
    out->rope_theta = g.rope.theta;
    out->rope_dim = g.rope.dim;
    out->rope_layout = g.rope.interleaved ? KVFOLD_ROPE_INTERLEAVED : KVFOLD_ROPE_HALF;
    out->retain = static_cast<int>(g.retain);
    out->recent = g.recent;
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

// Float counts memory() writes for keys and values.
void memory_floats(const kvfold::MemoryCache& c, size_t* keys, size_t* values) {
    const kvfold::Config& g = c.config();
    const size_t lanes = static_cast<size_t>(g.batch_size * g.num_heads);
    const size_t dk = static_cast<size_t>(g.head_dim), dv = static_cast<size_t>(g.value_dim);
    if (c.matrix_memory()) {
        *keys = lanes * dk * dv;
        *values = c.matrix_normalized() ? lanes * dk : 0;
    } else {
        const size_t slots = static_cast<size_t>(c.memory_slots());
        *keys = lanes * slots * dk;
        *values = lanes * slots * dv;
    }
}

// Copies one value per row into out[0..capacity).
void per_row(const std::vector<int64_t>& values, int64_t* out, int64_t capacity) {
    require(out, "out");
    if (capacity < static_cast<int64_t>(values.size()))
        fail("capacity: expected at least batch_size = " + std::to_string(values.size()) + " values, got " +
             std::to_string(capacity));
    std::copy(values.begin(), values.end(), out);
}

kvfold_cache* wrap(std::unique_ptr<kvfold::MemoryCache> c) {
    auto handle = std::make_unique<kvfold_cache>();
    handle->cache = std::move(c);
    return handle.release();
}

}  // namespace

extern "C" {

const char* kvfold_last_error(const kvfold_cache* cache) {
    if (!cache) return thread_error.c_str();
    std::lock_guard<std::mutex> lock(cache->error_mu);
    return cache->error.c_str();
}

const char* kvfold_status_name(int status) {
    switch (status) {
        case KVFOLD_OK: return "ok";
        case KVFOLD_VALUE_ERROR: return "value error";
        case KVFOLD_TYPE_ERROR: return "type error";
        case KVFOLD_OUT_OF_MEMORY: return "out of memory";
        case KVFOLD_INTERNAL_ERROR: return "internal error";
        default: return "unknown status";
    }
}

const char* kvfold_version(void) { return kvfold::version(); }

const char* kvfold_simd_backend(void) { return kvfold::simd_backend(); }

kvfold_status kvfold_set_simd_backend(const char* name) {
    return guarded(nullptr, [&] {
        require(name, "name");
        kvfold::set_simd_backend(name);
    });
}

kvfold_status kvfold_set_num_threads(int64_t n) {
    return guarded(nullptr, [&] { kvfold::set_num_threads(n); });
}

int kvfold_get_num_threads(void) { return kvfold::get_num_threads(); }

void kvfold_config_init(kvfold_config* config) {
    if (config) to_c(kvfold::Config{}, config);
}

kvfold_status kvfold_create(const kvfold_config* config, const kvfold_rule* rule, kvfold_cache** out) {
    if (out) *out = nullptr;
    return guarded(nullptr, [&] {
        require(out, "out");
        require(config, "config");
        require(rule, "rule");
        *out = wrap(std::make_unique<kvfold::MemoryCache>(to_cpp(*config), to_cpp(*rule)));
    });
}

kvfold_status kvfold_options_init(kvfold_options* options, size_t size) {
    return guarded(nullptr, [&] {
        require(options, "options");
        check_options_size(size, "size");
        options->size = size;
        to_c(kvfold::Config{}, options);
    });
}

kvfold_status kvfold_create_with_options(const kvfold_config* config, const kvfold_options* options,
                                         const kvfold_rule* rule, kvfold_cache** out) {
    if (out) *out = nullptr;
    return guarded(nullptr, [&] {
        require(out, "out");
        require(config, "config");
        require(rule, "rule");
        kvfold::Config g = to_cpp(*config);
        if (options) apply(*options, &g);
        *out = wrap(std::make_unique<kvfold::MemoryCache>(g, to_cpp(*rule)));
    });
}

void kvfold_free(kvfold_cache* cache) { delete cache; }

kvfold_status kvfold_get_config(const kvfold_cache* cache, kvfold_config* out) {
    return guarded(cache, [&] {
        const kvfold::Config& g = live(cache).config();
        require(out, "out");
        to_c(g, out);
    });
}

kvfold_status kvfold_get_options(const kvfold_cache* cache, kvfold_options* out) {
    return guarded(cache, [&] {
        const kvfold::Config& g = live(cache).config();
        require(out, "out");
        check_options_size(out->size, "out->size");
        to_c(g, out);
    });
}

kvfold_status kvfold_update(kvfold_cache* cache, const float* k, const float* v, int64_t T, const kvfold_gates* gates) {
    return kvfold_update_at(cache, k, v, T, gates, nullptr);
}

kvfold_status kvfold_update_at(kvfold_cache* cache, const float* k, const float* v, int64_t T,
                               const kvfold_gates* gates, const int64_t* positions) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        require(k, "k");
        require(v, "v");
        c.update(k, v, T, token_gates(gates), positions);
    });
}

kvfold_status kvfold_attend(kvfold_cache* cache, const float* q, float* out) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        require(q, "q");
        require(out, "out");
        c.attend(q, out);
    });
}

kvfold_status kvfold_step(kvfold_cache* cache, const float* q, const float* k, const float* v, float* out,
                          const kvfold_gates* gates) {
    return kvfold_step_at(cache, q, k, v, out, gates, nullptr);
}

kvfold_status kvfold_step_at(kvfold_cache* cache, const float* q, const float* k, const float* v, float* out,
                             const kvfold_gates* gates, const int64_t* positions) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        require_step(q, k, v, out);
        c.step(q, k, v, out, token_gates(gates), positions);
    });
}

kvfold_status kvfold_forward(kvfold_cache* cache, const float* q, const float* k, const float* v, int64_t T, float* out,
                             const kvfold_gates* gates) {
    return kvfold_forward_at(cache, q, k, v, T, out, gates, nullptr);
}

kvfold_status kvfold_forward_at(kvfold_cache* cache, const float* q, const float* k, const float* v, int64_t T,
                                float* out, const kvfold_gates* gates, const int64_t* positions) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        require_step(q, k, v, out);
        c.forward(q, k, v, T, out, token_gates(gates), positions);
    });
}

kvfold_status kvfold_reset(kvfold_cache* cache) {
    return guarded(cache, [&] { live(cache).reset(); });
}

kvfold_status kvfold_reset_rows(kvfold_cache* cache, const int64_t* rows, int64_t count) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        if (count > 0) require(rows, "rows");
        c.reset_rows(rows, count);
    });
}

kvfold_status kvfold_lengths(const kvfold_cache* cache, int64_t* out, int64_t capacity) {
    return guarded(cache, [&] { per_row(live(cache).lengths(), out, capacity); });
}

kvfold_status kvfold_last_positions(const kvfold_cache* cache, int64_t* out, int64_t capacity) {
    return guarded(cache, [&] { per_row(live(cache).last_positions(), out, capacity); });
}

kvfold_status kvfold_nbytes(const kvfold_cache* cache, size_t* out) {
    return guarded(cache, [&] {
        const size_t n = live(cache).nbytes();
        require(out, "out");
        *out = n;
    });
}

kvfold_status kvfold_memory_size(const kvfold_cache* cache, size_t* key_floats, size_t* value_floats) {
    return guarded(cache, [&] {
        const kvfold::MemoryCache& c = live(cache);
        require(key_floats, "key_floats");
        require(value_floats, "value_floats");
        memory_floats(c, key_floats, value_floats);
    });
}

kvfold_status kvfold_memory(const kvfold_cache* cache, float* keys, size_t key_capacity, float* values,
                            size_t value_capacity) {
    return guarded(cache, [&] {
        const kvfold::MemoryCache& c = live(cache);
        size_t nk, nv;
        memory_floats(c, &nk, &nv);
        if (key_capacity < nk)
            fail("key_capacity: expected at least " + std::to_string(nk) + " floats, got " +
                 std::to_string(key_capacity));
        if (value_capacity < nv)
            fail("value_capacity: expected at least " + std::to_string(nv) + " floats, got " +
                 std::to_string(value_capacity));
        if (nk) require(keys, "keys");
        if (nv) require(values, "values");
        if (nk) c.memory(keys, nv ? values : nullptr);
    });
}

kvfold_status kvfold_to_bytes(const kvfold_cache* cache, void* buffer, size_t capacity, size_t* size) {
    return guarded(cache, [&] {
        const kvfold::MemoryCache& c = live(cache);
        require(size, "size");
        const std::string bytes = c.to_bytes();
        *size = bytes.size();
        if (!buffer) return;
        if (capacity < bytes.size())
            fail("capacity: expected at least " + std::to_string(bytes.size()) + " bytes, got " +
                 std::to_string(capacity));
        std::memcpy(buffer, bytes.data(), bytes.size());
    });
}

kvfold_status kvfold_to_bytes_alloc(const kvfold_cache* cache, void** data, size_t* size) {
    if (data) *data = nullptr;
    return guarded(cache, [&] {
        const kvfold::MemoryCache& c = live(cache);
        require(data, "data");
        require(size, "size");
        const std::string bytes = c.to_bytes();
        void* p = std::malloc(bytes.size() ? bytes.size() : 1);
        if (!p) throw std::bad_alloc();
        std::memcpy(p, bytes.data(), bytes.size());
        *data = p;
        *size = bytes.size();
    });
}

void kvfold_free_bytes(void* data) { std::free(data); }

kvfold_status kvfold_from_bytes(const void* data, size_t size, kvfold_cache** out) {
    if (out) *out = nullptr;
    return guarded(nullptr, [&] {
        require(out, "out");
        require(data, "data");
        *out = wrap(kvfold::MemoryCache::from_bytes(data, size));
    });
}

kvfold_status kvfold_checkpoint_new(const kvfold_cache* cache, kvfold_checkpoint** out) {
    if (out) *out = nullptr;
    return guarded(cache, [&] {
        const kvfold::MemoryCache& c = live(cache);
        require(out, "out");
        *out = new kvfold_checkpoint{c.checkpoint()};
    });
}

kvfold_status kvfold_rollback(kvfold_cache* cache, const kvfold_checkpoint* checkpoint) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        require(checkpoint, "checkpoint");
        c.rollback(checkpoint->checkpoint);
    });
}

kvfold_status kvfold_rollback_rows(kvfold_cache* cache, const kvfold_checkpoint* checkpoint, const int64_t* rows,
                                   int64_t count) {
    return guarded(cache, [&] {
        kvfold::MemoryCache& c = live(cache);
        require(checkpoint, "checkpoint");
        if (count > 0) require(rows, "rows");
        c.rollback_rows(checkpoint->checkpoint, rows, count);
    });
}

void kvfold_checkpoint_free(kvfold_checkpoint* checkpoint) { delete checkpoint; }

}  // extern "C"
