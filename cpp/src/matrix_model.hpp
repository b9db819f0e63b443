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
// The queries q (B, Hq, d_k) read every lane's memory (out: B, Hq, d_v); nothing changes.
void matrix_attend(const MemoryCache::Impl& c, const float* q, float* out);

}  // namespace kvfold
