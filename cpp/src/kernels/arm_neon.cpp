// ARM NEON (AdvSIMD) kernels for aarch64, where NEON is the baseline: the target region only
// states it (GCC spells it "+simd", Clang "neon").
// float16 rows convert with the native fcvtl / fcvtn instructions (round to nearest even).
#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>
#include <type_traits>

#include "../half.hpp"
#include "../platform.hpp"
#include "kernels.hpp"
#include "target.hpp"

// Headers stay outside the target region, as in the x86 files.
#if defined(__clang__)
KVFOLD_TARGET_BEGIN("neon")
#else
KVFOLD_TARGET_BEGIN("+simd")
#endif

namespace kvfold {
namespace neon {
namespace {

// The vector traits simd-inl.hpp is written over: 4 floats.
struct V {
    using F = float32x4_t;
    static constexpr int kLanes = 4;
    static F zero() { return vdupq_n_f32(0); }
    static F set1(float x) { return vdupq_n_f32(x); }
    static F load(const float* p) { return vld1q_f32(p); }
    static void store(float* p, F x) { vst1q_f32(p, x); }
    static F load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
    static F load_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
    static F add(F a, F b) { return vaddq_f32(a, b); }
    static F sub(F a, F b) { return vsubq_f32(a, b); }
    static F mul(F a, F b) { return vmulq_f32(a, b); }
    static F min(F a, F b) { return vminq_f32(a, b); }
    static F max(F a, F b) { return vmaxq_f32(a, b); }
    static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
    static F fnma(F a, F b, F c) { return vfmsq_f32(c, a, b); }
    static F round(F x) { return vrndnq_f32(x); }
    static F pow2(F p, F n) {  // 2^n built in the exponent bits: n within [-126, 127]
        int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
        return vmulq_f32(p, vreinterpretq_f32_s32(e));
    }
    static float sum(F x) { return vaddvq_f32(x); }
    // y[i] = scale * (the sum of x[i]'s lanes) for i < 4, the four at once.
    static void sum4(float* y, const F* x, float scale) {
        vst1q_f32(y, vmulq_n_f32(vpaddq_f32(vpaddq_f32(x[0], x[1]), vpaddq_f32(x[2], x[3])), scale));
    }
    static float reduce_max(F x) { return vmaxvq_f32(x); }
    static constexpr int kDotChains = 4;
    static constexpr bool kRequestNext = false;  // see update_tile
};

#include "simd-inl.hpp"

// exp(x) for x <= 88.7 (softmax calls it after the max shift, x <= 0): inputs are clamped so that
// 2^n stays a normal float.
inline F exp_neg(F x) { return exp_clamped<true>(V::max(x, V::set1(-87.33654f))); }

// exp(x) over the whole float range, as on AVX2.
inline F exp_any(F x) { return exp_neg(V::min(x, V::set1(88.72283f))); }

#include "unmasked-inl.hpp"

void f32_to_f16(uint16_t* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; ++i) y[i] = float_to_half(x[i]);
}

// Round to nearest even on the bit pattern, NaN kept quiet: the scalar float_to_bf16, 4 at a time.
void f32_to_bf16(uint16_t* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        uint32x4_t u = vreinterpretq_u32_f32(v), high = vshrq_n_u32(u, 16);
        uint32x4_t odd = vandq_u32(high, vdupq_n_u32(1));
        uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7fff))), 16);
        uint32x4_t nan = vorrq_u32(high, vdupq_n_u32(0x40));
        r = vbslq_u32(vmvnq_u32(vceqq_f32(v, v)), nan, r);
        vst1_u16(y + i, vmovn_u32(r));
    }
    for (; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

bool all_finite(const float* x, int64_t n) {
    // A float is finite when its exponent bits are not all ones.
    const uint32x4_t mask = vdupq_n_u32(0x7f800000);
    uint32x4_t bad = vdupq_n_u32(0);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        bad = vorrq_u32(bad, vceqq_u32(vandq_u32(vld1q_u32(reinterpret_cast<const uint32_t*>(x + i)), mask), mask));
    if (vmaxvq_u32(bad)) return false;
    for (; i < n; ++i)
        if (!std::isfinite(x[i])) return false;
    return true;
}

// float64 accumulators, 4 at a time (two registers of 2): s op= x.
template <float64x2_t (*Op)(float64x2_t, float64x2_t)>
void update_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t x4 = vld1q_f32(x + i);
        vst1q_f64(s + i, Op(vld1q_f64(s + i), vcvt_f64_f32(vget_low_f32(x4))));
        vst1q_f64(s + i + 2, Op(vld1q_f64(s + i + 2), vcvt_high_f64_f32(x4)));
    }
    for (; i < n; ++i) vst1q_lane_f64(s + i, Op(vdupq_n_f64(s[i]), vdupq_n_f64(x[i])), 0);
}
inline float64x2_t plus(float64x2_t s, float64x2_t x) { return vaddq_f64(s, x); }
inline float64x2_t minus(float64x2_t s, float64x2_t x) { return vsubq_f64(s, x); }

void add_f64(double* s, const float* x, int64_t n) { update_f64<plus>(s, x, n); }
void sub_f64(double* s, const float* x, int64_t n) { update_f64<minus>(s, x, n); }
void set_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t x4 = vld1q_f32(x + i);
        vst1q_f64(s + i, vcvt_f64_f32(vget_low_f32(x4)));
        vst1q_f64(s + i + 2, vcvt_high_f64_f32(x4));
    }
    for (; i < n; ++i) s[i] = x[i];
}
void add_sums_f64(double* s, const double* t, int64_t n) {
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) vst1q_f64(s + i, vaddq_f64(vld1q_f64(s + i), vld1q_f64(t + i)));
    for (; i < n; ++i) s[i] += t[i];
}

void axpby_f64(double* s, double a, const float* x, double b, float* y, double c, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t x4 = vld1q_f32(x + i);
        float64x2_t lo = vfmaq_n_f64(vmulq_n_f64(vcvt_f64_f32(vget_low_f32(x4)), b), vld1q_f64(s + i), a);
        float64x2_t hi = vfmaq_n_f64(vmulq_n_f64(vcvt_high_f64_f32(x4), b), vld1q_f64(s + i + 2), a);
        vst1q_f64(s + i, lo);
        vst1q_f64(s + i + 2, hi);
        if (y) vst1q_f32(y + i, vcvt_high_f32_f64(vcvt_f32_f64(vmulq_n_f64(lo, c)), vmulq_n_f64(hi, c)));
    }
    for (; i < n; ++i) {
        s[i] = a * s[i] + b * x[i];
        if (y) y[i] = static_cast<float>(c * s[i]);
    }
}

void mul_f64(float* y, const double* s, double a, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x2_t lo = vcvt_f32_f64(vmulq_n_f64(vld1q_f64(s + i), a));
        vst1q_f32(y + i, vcvt_high_f32_f64(lo, vmulq_n_f64(vld1q_f64(s + i + 2), a)));
    }
    for (; i < n; ++i) y[i] = static_cast<float>(s[i] * a);
}

void max_f32(float* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t vx = vld1q_f32(x + i), vy = vld1q_f32(y + i);
        vst1q_f32(y + i, vbslq_f32(vcgtq_f32(vx, vy), vx, vy));  // x > y ? x : y, as the scalar table
    }
    for (; i < n; ++i) y[i] = x[i] > y[i] ? x[i] : y[i];
}

#include "softmax-inl.hpp"

// NEON has no masked moves: the tiled kernels take whole vectors, and the columns past the last
// whole vector go to the scalar table.
// The matrix sweep: tiles of 16 columns.
void matrix_step(const MatrixPass& m) { tiled_matrix_step<Whole, 4, 4>(m); }
void matrix_read(const MatrixPass& m) { tiled_matrix_read<Whole, 4>(m); }

// The chunked prefill: tiles of 4 rows x 16 columns (16 accumulators).
void gemm(const Gemm& g) { tiled_gemm<Whole, 4, 4>(g); }
void solve_unit_lower(const float* a, int64_t lda, float* x, int64_t ldx, int64_t m, int64_t n) {
    tiled_solve_unit_lower<Whole, 4, 4>(a, lda, x, ldx, m, n);
}

#include "table-inl.hpp"

// int8 rows (q8-inl.hpp): the codes of a block multiply into int16 (vmull_s8; two products of codes
// in [-127, 127] never overflow 16 bits) and add pairwise into 4 int32 (vpadalq_s16), exact.
inline float q8_row_dot_neon(const int8_t* qc, const float* qs, const int8_t* kc, const uint8_t* row, int64_t d,
                             int64_t first, int64_t n) {
    const float* ks = q8_scales(row, d) + first;
    float32x4_t acc = vdupq_n_f32(0);
    for (int64_t b = 0; b < n; ++b) {
        int32x4_t dot = vdupq_n_s32(0);
        for (int h = 0; h < 2; ++h) {
            const int8x16_t q = vld1q_s8(qc + kQ8Block * b + 16 * h), k = vld1q_s8(kc + kQ8Block * b + 16 * h);
            const int16x8_t p = vmlal_s8(vmull_s8(vget_low_s8(q), vget_low_s8(k)), vget_high_s8(q), vget_high_s8(k));
            dot = vpadalq_s16(dot, p);
        }
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dot), qs[b] * ks[b]);
    }
    return vaddvq_f32(acc);
}

void scores_q8_neon(const float* q, int64_t q_stride, int64_t nq, const uint8_t* k, int64_t rows, int64_t d,
                    float scale, float* s, int64_t s_stride) {
    q8_scores_with(q8_row_dot_neon, q, q_stride, nq, k, rows, d, scale, s, s_stride);
}

constexpr Kernels make_table() {
    Kernels k = filled_table("neon");
    k.scores_q8 = scores_q8_neon;
    return k;
}

constexpr Kernels table = make_table();

}  // namespace
}  // namespace neon

const Kernels* neon_kernels() { return &neon::table; }

}  // namespace kvfold
KVFOLD_TARGET_END
#endif
