// Scalar float16 / bfloat16 conversions (round to nearest even), used by the scalar kernels and
// for tails.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvfold {

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        // zero or subnormal: man * 2^-24
        float f = static_cast<float>(man) * 5.9604644775390625e-8f;
        return bits_float(float_bits(f) | sign);
    }
    if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));
    return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
    uint32_t u = float_bits(f);
    uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // overflow to Inf (>= 65520)
    if (a < 0x38800000u) {                        // subnormal or zero in half
        // a / 2^-24, rounded to nearest even by the float adder
        float v = bits_float(a) * 16777216.0f;  // exact scaling by 2^24
        uint32_t m = static_cast<uint32_t>(v);
        float rem = v - static_cast<float>(m);
        if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
        return sign | static_cast<uint16_t>(m);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even
    return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);
}

}  // namespace kvfold
