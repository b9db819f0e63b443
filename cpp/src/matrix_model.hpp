// Matrix memories (the linear-attention family): the rule's S is read linearly, mixed with softmax
// attention over [sinks | window] when the cache keeps either.
#pragma once

#include <cstdint>

#include "cache_impl.hpp"

namespace kvfold {

// T tokens into every row; with q (B, Hq, T, d_k) and out (B, Hq, T, d_v) each token's queries
// are answered right after it (step and forward), else the memory is only updated.
void matrix_run(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                const float* q, float* out);
// A long block into a matrix memory without sinks or window, in float32: its k, v and q are better
// checked for finite values a chunk at a time as they are folded (from cache) than in a pass of
// their own over the whole block first (from memory), when the state is small enough to keep a copy.
bool matrix_checks_as_it_folds(const MemoryCache::Impl& c, int64_t T);
// matrix_run with queries for such a block, whose k, v and q are not checked yet: each chunk's rows are
// checked before they are folded. Returns false, with the state as it was before the call, when a value
// is NaN or Inf (out is then partly written).
bool matrix_run_checked(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                        const float* q, float* out);
// The queries q (B, Hq, d_k) read every lane's memory (out: B, Hq, d_v); nothing changes.
void matrix_attend(const MemoryCache::Impl& c, const float* q, float* out);

}  // namespace kvfold
