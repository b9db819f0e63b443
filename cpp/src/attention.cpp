#include "attention.hpp"

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/kernels.hpp"

namespace kvfold {
namespace {

constexpr int64_t kBlock = 64;  // scores computed, exponentiated and applied per block of rows

float dot_row(const Kernels& K, const float* q, const void* row, int64_t d, DType t) {
    switch (t) {
        case DType::float16: return K.dot_f16(q, static_cast<const uint16_t*>(row), d);
        case DType::bfloat16: return K.dot_bf16(q, static_cast<const uint16_t*>(row), d);
        default: return K.dot_f32(q, static_cast<const float*>(row), d);
    }
}

void axpy_row(const Kernels& K, float* y, float a, const void* row, int64_t d, DType t) {
    switch (t) {
        case DType::float16: return K.axpy_f16(y, a, static_cast<const uint16_t*>(row), d);
        case DType::bfloat16: return K.axpy_bf16(y, a, static_cast<const uint16_t*>(row), d);
        default: return K.axpy_f32(y, a, static_cast<const float*>(row), d);
    }
}

}  // namespace

void attend_segments(const float* q, const Segment* segments, int count, int64_t dk, int64_t dv,
                     float scale, float* out) {
    const Kernels& K = kernels();
    float scores[kBlock];
    float running_max = -std::numeric_limits<float>::infinity();
    float total = 0;
    std::memset(out, 0, sizeof(float) * dv);
    for (int s = 0; s < count; ++s) {
        const Segment& seg = segments[s];
        const size_t esize = dtype_size(seg.dtype);
        const auto* keys = static_cast<const uint8_t*>(seg.keys);
        const auto* values = static_cast<const uint8_t*>(seg.values);
        for (int64_t start = 0; start < seg.rows; start += kBlock) {
            int64_t n = seg.rows - start < kBlock ? seg.rows - start : kBlock;
            for (int64_t j = 0; j < n; ++j)
                scores[j] = scale * dot_row(K, q, keys + (start + j) * dk * esize, dk, seg.dtype);
            float block_max = K.max(scores, n);
            if (block_max > running_max) {
                if (total > 0) {
                    float shrink = std::exp(running_max - block_max);
                    K.scale(out, shrink, dv);
                    total *= shrink;
                }
                running_max = block_max;
            }
            total += K.exp_sum(scores, running_max, n);
            for (int64_t j = 0; j < n; ++j)
                axpy_row(K, out, scores[j], values + (start + j) * dv * esize, dv, seg.dtype);
        }
    }
    if (total > 0) K.scale(out, 1.0f / total, dv);
}

void store_row(void* dst, const float* src, int64_t d, DType dtype) {
    switch (dtype) {
        case DType::float16: return kernels().f32_to_f16(static_cast<uint16_t*>(dst), src, d);
        case DType::bfloat16: return kernels().f32_to_bf16(static_cast<uint16_t*>(dst), src, d);
        default: std::memcpy(dst, src, sizeof(float) * d);
    }
}

void load_row(float* dst, const void* src, int64_t d, DType dtype) {
    switch (dtype) {
        case DType::float16: return kernels().f16_to_f32(dst, static_cast<const uint16_t*>(src), d);
        case DType::bfloat16: return kernels().bf16_to_f32(dst, static_cast<const uint16_t*>(src), d);
        default: std::memcpy(dst, src, sizeof(float) * d);
    }
}

}  // namespace kvfold
