// int8 rows in the q8_0 layout: every 32 values of a row (a block) share one float32 scale,
//   scale = max |x| / 127,  code = round(x / scale) (to nearest even), x ~ code * scale.
// A row of d values is q8_blocks(d) blocks: first every block's 32 codes (the last block padded
// with zeros), then every block's scale, so that the codes of a row are one contiguous run.
//
// Every kernel table quantizes with q8_quantize_block, compiled once for the baseline ISA: rows
// and queries are the same bits whichever table stored them.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../half.hpp"

namespace kvfold {

constexpr int64_t kQ8Block = 32;
// Below this largest magnitude, 1 / scale would overflow: the block is stored as zeros.
constexpr float kQ8Smallest = 127 * FLT_MIN;

inline int64_t q8_blocks(int64_t d) { return (d + kQ8Block - 1) / kQ8Block; }
inline int64_t q8_row_bytes(int64_t d) { return q8_blocks(d) * (kQ8Block + int64_t(sizeof(float))); }
// Scale b of the row at `row` (d values); rows start at multiples of 4 bytes.
inline float q8_scale(const uint8_t* row, int64_t d, int64_t b) {
    float s;
    std::memcpy(&s, row + q8_blocks(d) * kQ8Block + b * int64_t(sizeof(float)), sizeof s);
    return s;
}
inline const float* q8_scales(const uint8_t* row, int64_t d) {
    return reinterpret_cast<const float*>(row + q8_blocks(d) * kQ8Block);
}

// The n <= 32 values x as one block: 32 codes (0 past n) and the returned scale. A block with a
// NaN or an Inf gets scale NaN (it reads as NaN, as a float32 row would not be finite either).
inline float q8_quantize_block(const float* x, int64_t n, int8_t* codes) {
    uint32_t largest = 0;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t a = float_bits(x[i]) & 0x7fffffffu;
        largest = a > largest ? a : largest;
    }
    std::memset(codes, 0, kQ8Block);
    if (largest >= 0x7f800000u) return std::numeric_limits<float>::quiet_NaN();
    const float amax = bits_float(largest);
    if (amax < kQ8Smallest) return 0;
    const float scale = amax / 127.0f, inverse = 1.0f / scale;
    for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<int8_t>(std::nearbyint(x[i] * inverse));
    return scale;
}

// A row of d values into its q8_row_bytes(d) bytes at y.
inline void q8_quantize_row(uint8_t* y, const float* x, int64_t d) {
    const int64_t nb = q8_blocks(d);
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t n = d - b * kQ8Block < kQ8Block ? d - b * kQ8Block : kQ8Block;
        const float s = q8_quantize_block(x + b * kQ8Block, n, reinterpret_cast<int8_t*>(y + b * kQ8Block));
        std::memcpy(y + nb * kQ8Block + b * int64_t(sizeof(float)), &s, sizeof s);
    }
}

}  // namespace kvfold
