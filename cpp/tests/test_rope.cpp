// Rope's angles against libm: cos and sin of p * theta^(-2i / dim) in float64, rounded once.
#include <cmath>
#include <random>
#include <vector>

#include "../src/rope.hpp"
#include "check.hpp"

using namespace kvfold;

namespace {
// Positions whole and fractional, negative, near multiples of pi/2, and past the reduced range
// (|angle| > 2^19), where the angles come from libm.
std::vector<double> positions() {
    std::vector<double> p = {0, 1, -1, 0.5, 3.0 / 7, 1e5, -1e5, 524287.5, 524289, 3e6, 1e9};
    for (int k = 1; k < 2000; ++k) p.push_back(k * 1.5707963267948966);  // angle i = 0 near k pi/2
    std::mt19937_64 g(3);
    std::uniform_real_distribution<double> u(-2e5, 2e5);
    for (int i = 0; i < 2000; ++i) p.push_back(u(g));
    for (int i = 0; i < 2000; ++i) p.push_back(std::round(u(g)));
    for (int i = 0; i < 2000; ++i) p.push_back(std::round(u(g)) / 7);  // a merged slot's mean position
    return p;
}
}  // namespace

TEST(rope_angles_are_libm_rounded_once) {
    const int64_t d = 128;
    const Rope rope(RoPE{10000.0, 0, false}, d);
    const int64_t n = rope.pairs();
    std::vector<float> c(n), s(n);
    int64_t differ = 0, total = 0;
    for (double p : positions()) {
        rope.angles(p, c.data(), s.data());
        for (int64_t i = 0; i < n; ++i) {
            const double a = p * std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(d));
            const float wc = static_cast<float>(std::cos(a)), ws = static_cast<float>(std::sin(a));
            CHECK_NEAR(c[i], wc, 1.2e-7);
            CHECK_NEAR(s[i], ws, 1.2e-7);
            differ += (c[i] != wc) + (s[i] != ws);
            total += 2;
        }
    }
    // Within about a float64 ulp, the rounding to float32 differs from libm's only by rare chance.
    CHECK(differ * 10000 <= total);
}
