// Portable kernels: the reference every SIMD table is tested against, and the fallback.
#include <cmath>

#include "../half.hpp"
#include "kernels.hpp"

namespace kvfold {
namespace {

float dot_f32(const float* a, const float* b, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}
float dot_f16(const float* a, const uint16_t* b, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * half_to_float(b[i]);
    return s;
}
float dot_bf16(const float* a, const uint16_t* b, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * bf16_to_float(b[i]);
    return s;
}
void axpy_f32(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
void axpy_f16(float* y, float a, const uint16_t* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * half_to_float(x[i]);
}
void axpy_bf16(float* y, float a, const uint16_t* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * bf16_to_float(x[i]);
}
void f32_to_f16(uint16_t* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_half(x[i]);
}
void f16_to_f32(float* y, const uint16_t* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = half_to_float(x[i]);
}
void f32_to_bf16(uint16_t* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
}
void bf16_to_f32(float* y, const uint16_t* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
}
void scale(float* y, float a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] *= a;
}
float max(const float* x, int64_t n) {
    float m = x[0];
    for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}
float exp_sum(float* x, float shift, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - shift);
        s += x[i];
    }
    return s;
}
bool all_finite(const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(x[i])) return false;
    return true;
}
void add_f64(double* s, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) s[i] += x[i];
}
void sub_f64(double* s, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) s[i] -= x[i];
}
void mul_f64(float* y, const double* s, double a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(s[i] * a);
}
void lerp_f64(double* s, const float* x, double a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) s[i] += a * (x[i] - s[i]);
}
void max_f32(float* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] > y[i] ? x[i] : y[i];
}

const Kernels table = {
    "scalar",  dot_f32,    dot_f16,    dot_bf16, axpy_f32, axpy_f16, axpy_bf16,
    f32_to_f16, f16_to_f32, f32_to_bf16, bf16_to_f32, scale,   max,      exp_sum,
    all_finite, add_f64,   sub_f64,    mul_f64,  lerp_f64, max_f32,
};

}  // namespace

const Kernels* scalar_kernels() { return &table; }

}  // namespace kvfold
