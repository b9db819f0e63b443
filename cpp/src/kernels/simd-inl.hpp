// What the SIMD kernel files share, written once over a small vector-traits type `V` (the pattern of
// Highway's -inl.h headers). x86_avx2.cpp, x86_avx512.cpp and arm_neon.cpp each define, in their own
// namespace and target region,
//   V::F         a vector of V::kLanes floats, and
//   V::zero, set1, load, store, load_f16, load_bf16 (widened to float32), add, sub, mul, min, max,
//   fma (a b + c, one rounding), fnma (c - a b, one rounding), round (to nearest even),
//   pow2 (p 2^n, n integral and in the range the file clamps to), sum (all lanes added),
// and then include this file there. No include guard: each kernel file includes it once. It
// includes nothing itself (<cmath>, half.hpp and kernels.hpp come first, outside the target region).

using F = V::F;
constexpr int kLanes = V::kLanes;

// Stored elements as float32: a whole vector, the first lanes under a mask (where V has masked
// loads), or one value (for scalar tails).
struct F32 {
    using T = float;
    static F load(const float* p) { return V::load(p); }
    template <class Mask>
    static F load(const float* p, Mask m) { return V::load(p, m); }
    static float one(float x) { return x; }
};
struct F16 {
    using T = uint16_t;
    static F load(const uint16_t* p) { return V::load_f16(p); }
    template <class Mask>
    static F load(const uint16_t* p, Mask m) { return V::load_f16(p, m); }
    static float one(uint16_t h) { return half_to_float(h); }
};
struct BF16 {
    using T = uint16_t;
    static F load(const uint16_t* p) { return V::load_bf16(p); }
    template <class Mask>
    static F load(const uint16_t* p, Mask m) { return V::load_bf16(p, m); }
    static float one(uint16_t h) { return bf16_to_float(h); }
};

// exp(x) = 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, so r is exact);
// e^r by the Cephes expf polynomial: about 1 ulp. The caller clamps x to where V::pow2 is exact;
// CapN keeps n <= 127 where the clamp lets x reach 88.7 (which rounds to n = 128).
template <bool CapN>
inline F exp_clamped(F x) {
    F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
    if (CapN) n = V::min(n, V::set1(127.0f));
    F r = V::fnma(n, V::set1(0.693359375f), x);
    r = V::fnma(n, V::set1(-2.12194440e-4f), r);
    F p = V::set1(1.9875691500e-4f);
    p = V::fma(p, r, V::set1(1.3981999507e-3f));
    p = V::fma(p, r, V::set1(8.3334519073e-3f));
    p = V::fma(p, r, V::set1(4.1665795894e-2f));
    p = V::fma(p, r, V::set1(1.6666665459e-1f));
    p = V::fma(p, r, V::set1(5.0000001201e-1f));
    p = V::fma(V::mul(p, r), r, V::add(r, V::set1(1.0f)));
    return V::pow2(p, n);
}
