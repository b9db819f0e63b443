// Softmax attention of one query over a visible set made of segments: [sinks | slots | window].
#pragma once

#include <cstdint>

#include "kvfold/kvfold.hpp"

namespace kvfold {

// n rows of keys (d_k) and values (d_v), stored as `dtype`.
struct Segment {
    const void* keys;
    const void* values;
    int64_t rows;
    DType dtype;
};

// out (d_v) = softmax(scale * q.K) V over all segments, in one pass (online softmax).
// A visible set with no rows yields zeros.
void attend_segments(const float* q, const Segment* segments, int count, int64_t dk, int64_t dv,
                     float scale, float* out);

// Rows of a buffer in storage precision, converted to and from float32.
void store_row(void* dst, const float* src, int64_t d, DType dtype);
void load_row(float* dst, const void* src, int64_t d, DType dtype);

}  // namespace kvfold
