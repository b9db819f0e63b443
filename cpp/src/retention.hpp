// Which window pair is folded when the window is full (Config::retain), and the weights tova and
// h2o record to choose it.
//
// fifo: non-sink pair j sits in window row j % window, and the oldest pair is folded. tova, h2o: the
// rows fill in order; once the window is full, of its pairs and the new one (the candidates, oldest
// first) the one with the lowest recorded weight is folded (unscored pairs rank above every scored
// one; among equals the oldest; h2o never folds its `recent` newest candidates), and the new pair
// takes its row. Each attend records, for every window pair it reads, its softmax weight averaged over
// the query heads of the KV head: tova keeps the latest, h2o the sum over every attend.
#pragma once

#include <cstdint>

#include "cache_impl.hpp"

namespace kvfold {

// Checks retain and recent against the window and resolves recent (h2o: -1 means window / 2).
int64_t checked_recent(const Config& config);
// ValueError when the rule cannot take the cache's RoPE or retention: a RoPE needs slots that
// average pairs; tova and h2o need a rule that folds pair by pair (not the matrix rules nor Custom).
void check_memory_options(const MemoryCache::Impl& c);

struct WindowPlace {
    int64_t row;  // the window row the new pair takes
    bool evicts;  // whether the pair in that row is folded first
};
// Where non-sink pair j of a lane goes; the window's order and scores are updated for it.
WindowPlace enter_window(MemoryCache::Impl& c, int64_t lane, int64_t j);

// The window row holding a lane's i-th oldest pair, of `held`; first: the non-sink index of the oldest.
int64_t window_row(const MemoryCache::Impl& c, int64_t lane, int64_t first, int64_t i);

// Before attention reads a lane's `held` window rows: the weights it adds to, made ready (tova: zeros,
// h2o: unscored rows to 0); null when the cache records none.
float* window_weights(MemoryCache::Impl& c, int64_t lane, int64_t held);

// A state read from bytes: ValueError unless each lane's window order is a permutation of its rows.
void check_window_order(const MemoryCache::Impl& c);

}  // namespace kvfold
