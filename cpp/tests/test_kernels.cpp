// Every SIMD table agrees with the scalar one, at odd sizes that exercise the tails.
#include <cstring>
#include <random>

#include "../src/half.hpp"
#include "../src/kernels/kernels.hpp"
#include "check.hpp"

using namespace kvfold;

namespace {
std::vector<float> random_floats(size_t n, unsigned seed) {
    std::mt19937 g(seed);
    std::normal_distribution<float> d;
    std::vector<float> x(n);
    for (float& f : x) f = d(g);
    return x;
}
const int64_t kSizes[] = {1, 3, 7, 8, 16, 17, 33, 127, 128, 300};
}  // namespace

TEST(kernels_match_scalar) {
    const Kernels& S = *scalar_kernels();
    const Kernels& K = kernels();
    for (int64_t n : kSizes) {
        auto a = random_floats(n, 1), b = random_floats(n, 2);
        std::vector<uint16_t> h(n), bf(n);
        S.f32_to_f16(h.data(), b.data(), n);
        S.f32_to_bf16(bf.data(), b.data(), n);
        CHECK_NEAR(K.dot_f32(a.data(), b.data(), n), S.dot_f32(a.data(), b.data(), n), 1e-5);
        CHECK_NEAR(K.dot_f16(a.data(), h.data(), n), S.dot_f16(a.data(), h.data(), n), 1e-5);
        CHECK_NEAR(K.dot_bf16(a.data(), bf.data(), n), S.dot_bf16(a.data(), bf.data(), n), 1e-5);
        std::vector<uint16_t> h2(n), bf2(n);
        K.f32_to_f16(h2.data(), b.data(), n);
        K.f32_to_bf16(bf2.data(), b.data(), n);
        CHECK(h == h2);
        CHECK(bf == bf2);
        std::vector<float> y1 = a, y2 = a;
        S.axpy_f16(y1.data(), 0.5f, h.data(), n);
        K.axpy_f16(y2.data(), 0.5f, h.data(), n);
        for (int64_t i = 0; i < n; ++i) CHECK_NEAR(y1[i], y2[i], 1e-6);
        std::vector<float> e1 = a, e2 = a;
        float m = S.max(a.data(), n);
        CHECK(K.max(a.data(), n) == m);
        CHECK_NEAR(K.exp_sum(e2.data(), m, n), S.exp_sum(e1.data(), m, n), 1e-6);
        for (int64_t i = 0; i < n; ++i) CHECK_NEAR(e1[i], e2[i], 1e-6);
        CHECK(K.all_finite(a.data(), n));
        a[n - 1] = INFINITY;
        CHECK(!K.all_finite(a.data(), n));
        a[n / 2] = NAN;
        CHECK(!K.all_finite(a.data(), n));
        std::vector<double> s1(n, 1.0), s2(n, 1.0);
        S.lerp_f64(s1.data(), b.data(), 0.25, n);
        K.lerp_f64(s2.data(), b.data(), 0.25, n);
        for (int64_t i = 0; i < n; ++i) CHECK_NEAR(s1[i], s2[i], 1e-12);
    }
}

TEST(half_conversions_round_to_nearest_even) {
    CHECK(float_to_half(1.0f) == 0x3c00);
    CHECK(float_to_half(65504.0f) == 0x7bff);
    CHECK(float_to_half(65520.0f) == 0x7c00);
    CHECK(float_to_half(5.9604644775390625e-8f) == 0x0001);  // smallest subnormal
    CHECK(float_to_half(2.98023223876953125e-8f) == 0x0000); // halfway to it: ties to even (0)
    CHECK(half_to_float(0x3555) == 0.333251953125f);
    CHECK(float_to_bf16(1.0f) == 0x3f80);
    CHECK(float_to_bf16(bits_float(0x3f808000u)) == 0x3f80);  // tie rounds to even
    CHECK(float_to_bf16(bits_float(0x3f818000u)) == 0x3f82);
    for (uint32_t h = 0; h < 0x7c00; ++h) CHECK(float_to_half(half_to_float(static_cast<uint16_t>(h))) == h);
}
