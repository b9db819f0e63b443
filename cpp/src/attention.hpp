// Softmax attention of query heads over a visible set made of segments: [sinks | slots | window].
#pragma once

#include <cstdint>

#include "kernels/q8.hpp"
#include "kvfold/kvfold.hpp"

namespace kvfold {

// n rows of keys (d_k) and values (d_v), stored as `dtype`; bias, when given, holds a logit per row
// that is added to the row's scaled score (a memory slot that stands for several pairs). weights,
// when given, receives each row's softmax weight: weight_share times the sum over the query heads
// is added to it (the caller zeroes it, or keeps a sum).
struct Segment {
    const void* keys;
    const void* values;
    int64_t rows;
    DType dtype;
    const float* bias = nullptr;
    float* weights = nullptr;
};

// The nq query heads that read one KV head (a grouped-query attention group) and that head's visible
// set: query i at q + i * q_stride, its output (d_v) at out + i * out_stride.
struct Attention {
    const float* q;
    int64_t q_stride, nq;
    const Segment* segments;
    int count;
    float* out;
    int64_t out_stride;
    float weight_share = 1;  // see Segment::weights
};

// out_i = softmax(scale * q_i . K + bias) V over all segments, in one pass over the rows with an online
// softmax; each key and value row is read once for the whole group. A visible set with no rows
// yields zeros. Several problems at once (independent lanes) let their short dependency chains
// overlap, which is what decides the time of small visible sets.
void attend(const Attention* problems, int count, int64_t dk, int64_t dv, float scale);

// Bytes of a row of d values stored as dtype (an int8 row carries its blocks' scales, q8.hpp).
inline size_t row_bytes(DType dtype, int64_t d) {
    return dtype == DType::int8 ? static_cast<size_t>(q8_row_bytes(d)) : dtype_size(dtype) * static_cast<size_t>(d);
}

// Rows of a buffer in storage precision, converted to and from float32.
void store_row(void* dst, const float* src, int64_t d, DType dtype);
void load_row(float* dst, const void* src, int64_t d, DType dtype);

}  // namespace kvfold
