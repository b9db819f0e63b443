// The C API's error plumbing: the status of a call and its message, for the thread and the handle,
// and the pointer checks every call makes.
#include <mutex>
#include <string>

#include "c_api_support.hpp"

namespace {

thread_local std::string thread_error;

}  // namespace

namespace kvfold::capi {

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

void fail(const std::string& message) { throw kvfold::ValueError(message); }

void require(const void* p, const char* name) {
    if (!p) fail(std::string(name) + ": expected a pointer, got null");
}

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

}  // namespace kvfold::capi

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

}  // extern "C"
