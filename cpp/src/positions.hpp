// Token positions: given with each block, or the tokens each row has seen. A RoPE turns keys by them;
// without one they are checked and otherwise unused.
#pragma once

#include <cstdint>

#include "cache_impl.hpp"

namespace kvfold {

// The positions of a block of T tokens per row: given (B, T), or the tokens each row had seen
// before the block (seen: lengths per row) plus t.
struct Positions {
    const int64_t* given = nullptr;
    int64_t T = 1;
    const int64_t* seen = nullptr;
    int64_t at(int64_t b, int64_t t) const { return given ? given[b * T + t] : seen[b] + t; }
};

// A row's latest position (0 before its first token, when any position >= 0 may follow).
int64_t last_position(const MemoryCache::Impl& c, int64_t b);
// ValueError unless the block's positions are >= 0 and never go backwards within a row.
void check_positions(const MemoryCache::Impl& c, const Positions& p);
// After a block of T tokens (lengths already counting it): each row's latest position, given (B, T)
// or the tokens the row has seen, minus one.
void record_positions(MemoryCache::Impl& c, const int64_t* given, int64_t T);

}  // namespace kvfold
