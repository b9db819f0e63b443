// What the C API's files share: the handles behind kvfold.h's opaque types, the try block that turns
// a C++ exception into a status code and a message, the pointer checks and the conversions between
// the C structs and the C++ configuration.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "kvfold/kvfold.h"
#include "kvfold/kvfold.hpp"

struct kvfold_cache {
    std::unique_ptr<kvfold::MemoryCache> cache;
    mutable std::mutex error_mu;
    mutable std::string error;
};

struct kvfold_checkpoint {
    kvfold::Checkpoint checkpoint;
};

namespace kvfold::capi {

// A failure: its code and message, recorded for the thread and, when there is one, the handle.
struct Failure {
    kvfold_status status;
    std::string message;
};

// Records the failure's message for the thread and the handle (when not null); returns its code.
kvfold_status record(const kvfold_cache* cache, const Failure& f);

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
[[noreturn]] void fail(const std::string& message);
void require(const void* p, const char* name);
// The arrays of a step or a forward, none of them null.
void require_step(const float* q, const float* k, const float* v, const float* out);
kvfold::MemoryCache& live(kvfold_cache* cache);
const kvfold::MemoryCache& live(const kvfold_cache* cache);

kvfold::TokenGates token_gates(const kvfold_gates* gates);
// The C form of a configuration (kvfold_dtype values are DType's).
void to_c(const kvfold::Config& g, kvfold_config* out);
kvfold::Config to_cpp(const kvfold_config& c);
// The size check of a kvfold_options (callers pass sizeof(kvfold_options) of their kvfold.h).
void check_options_size(size_t size, const char* name);
// The C form of the options of a configuration.
void to_c(const kvfold::Config& g, kvfold_options* out);
// Sets the options on a configuration; the C++ constructor checks their values.
void apply(const kvfold_options& o, kvfold::Config* g);
kvfold::RuleSpec to_cpp(const kvfold_rule& r);

}  // namespace kvfold::capi
