// The C API (kvfold/kvfold.h) over the public C++ API: every call checks its pointers, runs the C++
// call inside one try block and turns what it throws into a status code and a message (the handles,
// the try block and the checks: c_api_support.hpp; the struct conversions: c_api_convert.cpp).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "c_api_support.hpp"
#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

using namespace kvfold::capi;

namespace {

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