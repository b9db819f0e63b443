// x86 AVX-512 (F, DQ, BW, VL) kernels. Tails are masked loads and stores, so no kernel has a scalar
// remainder loop. The target region keeps the rest of the build baseline x86-64.
//
// bfloat16 rounding uses integer arithmetic, not AVX512_BF16's vcvtneps2bf16: that instruction
// flushes subnormals to zero, and every table must round exactly like the scalar one.
#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 flags the deliberately undefined registers inside its own AVX-512 intrinsics (GCC bug
// 105593); the warning is about the header, not this code. It also finds a constant trip count
// of 2^62 for the row loop of a masked solve_tile inlined into its dispatch: no such path exists
// (the loop runs i0 < m times).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"
#endif
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "../half.hpp"
#include "../platform.hpp"
#include "kernels.hpp"
#include "target.hpp"

// Headers stay outside the target region so no inline function of theirs is emitted with AVX-512.
KVFOLD_TARGET_BEGIN("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")

namespace kvfold {
namespace avx512 {
namespace {

inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }  // 0 <= n < 16
inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xffff : first(n); }             // 1 <= n
inline __mmask8 first8(int64_t n) { return static_cast<__mmask8>((1u << n) - 1); }   // 0 <= n < 8

// The vector traits simd-inl.hpp is written over: 16 floats; the masked loads read only the lanes
// in m (the others are 0).
struct V {
    using F = __m512;
    static constexpr int kLanes = 16;
    static F zero() { return _mm512_setzero_ps(); }
    static F set1(float x) { return _mm512_set1_ps(x); }
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static F load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
    static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
    static F load_f16(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static F load_f16(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
    static F widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static F load_bf16(const uint16_t* p) {
        return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static F load_bf16(const uint16_t* p, __mmask16 m) { return widen_bf16(_mm256_maskz_loadu_epi16(m, p)); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F min(F a, F b) { return _mm512_min_ps(a, b); }
    static F max(F a, F b) { return _mm512_max_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
    static F round(F x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static F pow2(F p, F n) { return _mm512_scalef_ps(p, n); }  // exact, down to subnormals and zero
    static float sum(F x) { return _mm512_reduce_add_ps(x); }
    static constexpr bool kRequestNext = true;  // see update_tile
};

#include "simd-inl.hpp"

// exp(x) for x <= 0 (softmax after the max shift); exp underflows to 0 below -104 anyway.
inline F exp_neg(F x) { return exp_clamped<false>(V::max(x, V::set1(-104.0f))); }

// exp(x) over the whole float range: beyond 89, +Inf.
inline F exp_any(F x) { return exp_neg(V::min(x, V::set1(89.0f))); }

template <class E>
float dot(const float* a, const typename E::T* b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), E::load(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), E::load(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), E::load(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), E::load(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), E::load(b + i), s0);
    if (i < n) {
        __mmask16 m = first(n - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), E::load(b + i, m), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

template <class E>
void axpy(float* y, float a, const typename E::T* x, int64_t n) {
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, E::load(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = first(n - i);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, E::load(x + i, m), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

template <class E>
void widen(float* y, const typename E::T* x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, E::load(x + i));
    if (i < n) _mm512_mask_storeu_ps(y + i, first(n - i), E::load(x + i, first(n - i)));
}

inline __m256i to_f16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// Round to nearest even on the bit pattern, NaN kept quiet: the scalar float_to_bf16, 16 at a time.
inline __m256i to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, nan);
    return _mm512_cvtepi32_epi16(r);
}

template <__m256i (*Narrow)(__m512)>
void narrow(uint16_t* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), Narrow(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = first(n - i);
        _mm256_mask_storeu_epi16(y + i, m, Narrow(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
void f32_to_f16(uint16_t* y, const float* x, int64_t n) { narrow<to_f16>(y, x, n); }
void f32_to_bf16(uint16_t* y, const float* x, int64_t n) { narrow<to_bf16>(y, x, n); }

void scale(float* y, float a, int64_t n) {
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(va, _mm512_loadu_ps(y + i)));
    if (i < n)
        _mm512_mask_storeu_ps(y + i, first(n - i), _mm512_mul_ps(va, _mm512_maskz_loadu_ps(first(n - i), y + i)));
}

float max(const float* x, int64_t n) {
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    __m512 m = lowest;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    if (i < n) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(lowest, first(n - i), x + i));
    return _mm512_reduce_max_ps(m);
}

float exp_sum(float* x, float shift, int64_t n) {
    __m512 vs = _mm512_set1_ps(shift), acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(x + i), vs));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 m = first(n - i);
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vs));
        _mm512_mask_storeu_ps(x + i, m, e);
        acc = _mm512_mask_add_ps(acc, m, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}

// A float is finite when its exponent bits are not all ones: the largest exponent field of the
// values tells, kept in four registers so that the loop is no chain of dependent steps.
bool all_finite(const float* x, int64_t n) {
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    __m512i e0 = _mm512_setzero_si512(), e1 = e0, e2 = e0, e3 = e0;
    auto field = [&](const float* p) { return _mm512_and_si512(_mm512_loadu_si512(p), exponent); };
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        e0 = _mm512_max_epu32(e0, field(x + i));
        e1 = _mm512_max_epu32(e1, field(x + i + 16));
        e2 = _mm512_max_epu32(e2, field(x + i + 32));
        e3 = _mm512_max_epu32(e3, field(x + i + 48));
    }
    for (; i + 16 <= n; i += 16) e0 = _mm512_max_epu32(e0, field(x + i));
    if (i < n) e1 = _mm512_max_epu32(e1, _mm512_and_si512(_mm512_maskz_loadu_epi32(first(n - i), x + i), exponent));
    const __m512i e = _mm512_max_epu32(_mm512_max_epu32(e0, e1), _mm512_max_epu32(e2, e3));
    return _mm512_cmpeq_epi32_mask(e, exponent) == 0;
}

// float64 accumulators: 8 at a time, s op= x.
template <__m512d (*Op)(__m512d, __m512d)>
void update_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm512_storeu_pd(s + i, Op(_mm512_loadu_pd(s + i), _mm512_cvtps_pd(_mm256_loadu_ps(x + i))));
    if (i < n) {
        __mmask8 m = first8(n - i);
        _mm512_mask_storeu_pd(s + i, m,
                              Op(_mm512_maskz_loadu_pd(m, s + i), _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + i))));
    }
}
inline __m512d plus(__m512d s, __m512d x) { return _mm512_add_pd(s, x); }
inline __m512d minus(__m512d s, __m512d x) { return _mm512_sub_pd(s, x); }

void add_f64(double* s, const float* x, int64_t n) { update_f64<plus>(s, x, n); }
void sub_f64(double* s, const float* x, int64_t n) { update_f64<minus>(s, x, n); }
void set_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(s + i, _mm512_cvtps_pd(_mm256_loadu_ps(x + i)));
    if (i < n) {
        __mmask8 m = first8(n - i);
        _mm512_mask_storeu_pd(s + i, m, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + i)));
    }
}
void add_sums_f64(double* s, const double* t, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(s + i, _mm512_add_pd(_mm512_loadu_pd(s + i), _mm512_loadu_pd(t + i)));
    if (i < n) {
        __mmask8 m = first8(n - i);
        _mm512_mask_storeu_pd(s + i, m,
                              _mm512_add_pd(_mm512_maskz_loadu_pd(m, s + i), _mm512_maskz_loadu_pd(m, t + i)));
    }
}

// s = a s + b x, y = c s (y null: not wanted). Cumulative has a = b = 1 and EMA c = 1: the
// multiplications by 1 are left out (they are exact, so the result is the same).
template <bool Keep, bool Scale, bool Read>
void axpby_f64_as(double* s, double a, const float* x, double b, float* y, double c, int64_t n) {
    const __m512d va = _mm512_set1_pd(a), vb = _mm512_set1_pd(b), vc = _mm512_set1_pd(c);
    auto step = [&](__m512d vs, __m512d vx) {
        return Keep ? _mm512_fmadd_pd(va, vs, _mm512_mul_pd(vb, vx)) : _mm512_add_pd(vs, vx);
    };
    auto read = [&](__m512d vs) { return _mm512_cvtpd_ps(Scale ? _mm512_mul_pd(vc, vs) : vs); };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m512d vs = step(_mm512_loadu_pd(s + i), _mm512_cvtps_pd(_mm256_loadu_ps(x + i)));
        _mm512_storeu_pd(s + i, vs);
        if (Read) _mm256_storeu_ps(y + i, read(vs));
    }
    if (i < n) {
        const __mmask8 m = first8(n - i);
        const __m512d vs = step(_mm512_maskz_loadu_pd(m, s + i), _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + i)));
        _mm512_mask_storeu_pd(s + i, m, vs);
        if (Read) _mm256_mask_storeu_ps(y + i, m, read(vs));
    }
}

void axpby_f64(double* s, double a, const float* x, double b, float* y, double c, int64_t n) {
    const bool keep = a != 1 || b != 1, scale = c != 1;
    if (!y)
        return keep ? axpby_f64_as<true, false, false>(s, a, x, b, y, c, n)
                    : axpby_f64_as<false, false, false>(s, a, x, b, y, c, n);
    if (keep)
        return scale ? axpby_f64_as<true, true, true>(s, a, x, b, y, c, n)
                     : axpby_f64_as<true, false, true>(s, a, x, b, y, c, n);
    return scale ? axpby_f64_as<false, true, true>(s, a, x, b, y, c, n)
                 : axpby_f64_as<false, false, true>(s, a, x, b, y, c, n);
}

void mul_f64(float* y, const double* s, double a, int64_t n) {
    __m512d va = _mm512_set1_pd(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_loadu_pd(s + i), va)));
    if (i < n) {
        __mmask8 m = first8(n - i);
        _mm256_mask_storeu_ps(y + i, m, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_maskz_loadu_pd(m, s + i), va)));
    }
}

void max_f32(float* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_max_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = first(n - i);
        _mm512_mask_storeu_ps(y + i, m,
                              _mm512_max_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
}

// The lane sums of four vectors, reduced together: halves, then quarters of all four are added
// across registers, and the last four lanes of each within its quarter (16 instructions where four
// separate reductions take 40).
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 b0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 b1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, 0x88), _mm512_shuffle_f32x4(b0, b1, 0xDD));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4E));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));
    return _mm512_castps512_ps128(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), c));
}

// Four rows, `stride` apart, against one query: four independent FMA chains keep both FMA pipes
// busy. (Stride 0 scores one row, the same way.)
template <class E>
inline void dot4(const float* q, const typename E::T* k, int64_t stride, int64_t d, float scale, float* s) {
    const typename E::T* k1 = k + stride;
    const typename E::T* k2 = k + 2 * stride;
    const typename E::T* k3 = k + 3 * stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        __m512 x = _mm512_loadu_ps(q + i);
        a0 = _mm512_fmadd_ps(x, E::load(k + i), a0);
        a1 = _mm512_fmadd_ps(x, E::load(k1 + i), a1);
        a2 = _mm512_fmadd_ps(x, E::load(k2 + i), a2);
        a3 = _mm512_fmadd_ps(x, E::load(k3 + i), a3);
    }
    if (i < d) {
        __mmask16 m = first(d - i);
        __m512 x = _mm512_maskz_loadu_ps(m, q + i);
        a0 = _mm512_fmadd_ps(x, E::load(k + i, m), a0);
        a1 = _mm512_fmadd_ps(x, E::load(k1 + i, m), a1);
        a2 = _mm512_fmadd_ps(x, E::load(k2 + i, m), a2);
        a3 = _mm512_fmadd_ps(x, E::load(k3 + i, m), a3);
    }
    _mm_storeu_ps(s, _mm_mul_ps(_mm_set1_ps(scale), sum4(a0, a1, a2, a3)));
}

// Keys streamed from L3 or DRAM are read faster with their lines requested ahead: 16 rows ahead on
// AMD cores; 2 KB ahead on Intel cores, where a request that reaches DRAM before the L2's own
// prefetcher does holds a line fill buffer for its whole trip. There, 16 rows ahead, a window of
// 4096 float32 rows took 12% longer to read from DRAM, and 8% less time from a large L3: the
// windows of a model's many layers come from DRAM. (Values: see accumulate.)
const bool kKeysAheadShort = cpu_is_intel();
// Runs of at most kStreamRows rows (Merge's directions, a lane's slots) are in cache already or too
// short for requests to arrive in time: for them the requests only cost (Merge(32)'s fold took 9%
// less time without them).
constexpr int64_t kStreamRows = 64;

template <class E>
void scores(const float* q, int64_t q_stride, int64_t nq, const typename E::T* k, int64_t rows, int64_t d, float scale,
            float* s, int64_t s_stride) {
    const int64_t row_bytes = d * int64_t(sizeof(*k));
    const char* ahead = reinterpret_cast<const char*>(k) + (kKeysAheadShort ? 2048 : 16 * row_bytes);
    int64_t j = 0;
    for (; j + 4 <= rows; j += 4, k += 4 * d, ahead += 4 * row_bytes) {
        if (rows > kStreamRows)
            for (int64_t r = 0; r < 4 * row_bytes; r += 64) _mm_prefetch(ahead + r, _MM_HINT_T0);
        for (int64_t i = 0; i < nq; ++i) dot4<E>(q + i * q_stride, k, d, d, scale, s + i * s_stride + j);
    }
    // The last rows as in a group of four, so that a row's score does not depend on its place.
    for (float y[4]; j < rows; ++j, k += d)
        for (int64_t i = 0; i < nq; ++i) {
            dot4<E>(q + i * q_stride, k, 0, d, scale, y);
            s[i * s_stride + j] = y[0];
        }
}

// o (16 R floats, the last register masked by `last`) += sum_j p_j v_j[0 : 16 R]: the output stays
// in registers while the rows stream by. On Intel cores a long run's rows are requested 2 KB ahead,
// as keys are (scores): a window of 4096 float32 or float16 rows then took 0.95x the time. (AMD
// cores are left to their own prefetcher: not measured.)
template <class E, int R>
void accumulate(const float* p, const typename E::T* v, int64_t rows, int64_t d, float* o, __mmask16 last, bool add) {
    __m512 acc[R];
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R - 1; ++r) acc[r] = add ? _mm512_loadu_ps(o + 16 * r) : _mm512_setzero_ps();
    acc[R - 1] = add ? _mm512_maskz_loadu_ps(last, o + 16 * (R - 1)) : _mm512_setzero_ps();
    const bool request = kKeysAheadShort && rows > kStreamRows;
    const int64_t slice_bytes = 16 * R * int64_t(sizeof(*v));  // of each row, this call's columns
    for (int64_t j = 0; j < rows; ++j, v += d) {
        if (request)
            for (int64_t b = 0; b < slice_bytes; b += 64)
                _mm_prefetch(reinterpret_cast<const char*>(v) + 2048 + b, _MM_HINT_T0);
        __m512 w = _mm512_set1_ps(p[j]);
        KVFOLD_UNROLL(8)
        for (int r = 0; r < R - 1; ++r) acc[r] = _mm512_fmadd_ps(w, E::load(v + 16 * r), acc[r]);
        acc[R - 1] = _mm512_fmadd_ps(w, E::load(v + 16 * (R - 1), last), acc[R - 1]);
    }
    KVFOLD_UNROLL(8)
    for (int r = 0; r < R - 1; ++r) _mm512_storeu_ps(o + 16 * r, acc[r]);
    _mm512_mask_storeu_ps(o + 16 * (R - 1), last, acc[R - 1]);
}

template <class E>
void weighted_sum(const float* p, int64_t p_stride, int64_t nq, const typename E::T* v, int64_t rows, int64_t d,
                  float* out, int64_t out_stride, bool add) {
    using Acc = void (*)(const float*, const typename E::T*, int64_t, int64_t, float*, __mmask16, bool);
    static constexpr Acc by_registers[9] = {nullptr,          accumulate<E, 1>, accumulate<E, 2>,
                                            accumulate<E, 3>, accumulate<E, 4>, accumulate<E, 5>,
                                            accumulate<E, 6>, accumulate<E, 7>, accumulate<E, 8>};
    for (int64_t i = 0; i < nq; ++i) {
        const float* pi = p + i * p_stride;
        float* o = out + i * out_stride;
        int64_t c = 0;
        for (; c + 128 <= d; c += 128) accumulate<E, 8>(pi, v + c, rows, d, o + c, 0xffff, add);
        if (c < d) {
            int64_t rest = d - c, regs = (rest + 15) / 16;
            __mmask16 last = rest % 16 ? first(rest % 16) : 0xffff;
            by_registers[regs](pi, v + c, rows, d, o + c, last, add);
        }
    }
}

// bfloat16 rows are widened in pairs: a 32-bit lane holds two values, the even one becomes a float
// by a shift and the odd one by a mask, in place. That is one cheap operation per 16 values where
// widening them in order takes a lane-crossing shuffle, which bounds the step. Sums then run over
// the even and the odd elements apart: queries are split the same way, and weighted sums are
// interleaved back at the end.
inline __m512 even_bf16(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 odd_bf16(__m512i x) {
    return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u))));
}
inline __mmask32 first32(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }  // 0 <= n
// Block b of a row of nb blocks (32 values each; the last one holds what `last` selects).
inline __m512i load_block(const uint16_t* row, int64_t b, int64_t nb, __mmask32 last) {
    return b + 1 < nb || last == ~__mmask32(0) ? _mm512_loadu_si512(row + 32 * b)
                                               : _mm512_maskz_loadu_epi16(last, row + 32 * b);
}

// Scores of the rows against one query of d = 32 (NB - 1) + (values in `last`), split into NB
// blocks of even and odd values held in registers; two rows at a time keep four FMA chains going.
template <int NB>
void scores_split_bf16(const float* q, const uint16_t* k, int64_t rows, int64_t d, float scale, float* s) {
    const __mmask32 last = first32(d - 32 * (NB - 1));
    const __m512i even_idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd_idx = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    __m512 qe[NB], qo[NB];
    KVFOLD_UNROLL(4)
    for (int b = 0; b < NB; ++b) {
        const int64_t n = d - 32 * b;
        const __m512 lo = _mm512_maskz_loadu_ps(tail(n), q + 32 * b);
        const __m512 hi = n > 16 ? _mm512_maskz_loadu_ps(tail(n - 16), q + 32 * b + 16) : _mm512_setzero_ps();
        qe[b] = _mm512_permutex2var_ps(lo, even_idx, hi);
        qo[b] = _mm512_permutex2var_ps(lo, odd_idx, hi);
    }
    int64_t j = 0;
    for (; j + 2 <= rows; j += 2, k += 2 * d) {
        __m512 e0 = _mm512_setzero_ps(), o0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps();
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const __m512i x0 = load_block(k, b, NB, last), x1 = load_block(k + d, b, NB, last);
            e0 = _mm512_fmadd_ps(qe[b], even_bf16(x0), e0);
            o0 = _mm512_fmadd_ps(qo[b], odd_bf16(x0), o0);
            e1 = _mm512_fmadd_ps(qe[b], even_bf16(x1), e1);
            o1 = _mm512_fmadd_ps(qo[b], odd_bf16(x1), o1);
        }
        s[j] = scale * _mm512_reduce_add_ps(_mm512_add_ps(e0, o0));
        s[j + 1] = scale * _mm512_reduce_add_ps(_mm512_add_ps(e1, o1));
    }
    if (j < rows) {
        __m512 e0 = _mm512_setzero_ps(), o0 = _mm512_setzero_ps();
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const __m512i x0 = load_block(k, b, NB, last);
            e0 = _mm512_fmadd_ps(qe[b], even_bf16(x0), e0);
            o0 = _mm512_fmadd_ps(qo[b], odd_bf16(x0), o0);
        }
        s[j] = scale * _mm512_reduce_add_ps(_mm512_add_ps(e0, o0));
    }
}

void scores_bf16(const float* q, int64_t q_stride, int64_t nq, const uint16_t* k, int64_t rows, int64_t d, float scale,
                 float* s, int64_t s_stride) {
    using Split = void (*)(const float*, const uint16_t*, int64_t, int64_t, float, float*);
    static constexpr Split by_blocks[5] = {nullptr, scores_split_bf16<1>, scores_split_bf16<2>, scores_split_bf16<3>,
                                           scores_split_bf16<4>};
    const int64_t nb = (d + 31) / 32;
    if (nb > 4) return scores<BF16>(q, q_stride, nq, k, rows, d, scale, s, s_stride);  // the split needs registers
    for (int64_t i = 0; i < nq; ++i) by_blocks[nb](q + i * q_stride, k, rows, d, scale, s + i * s_stride);
}

// o[0 : n] (+)= sum_j p_j v_j[0 : n] for n = 32 (NB - 1) + (values in `last`), kept in 2 NB registers.
template <int NB>
void accumulate_bf16(const float* p, const uint16_t* v, int64_t rows, int64_t d, float* o, int64_t n, bool add) {
    const __mmask32 last = first32(n - 32 * (NB - 1));
    __m512 even[NB], odd[NB];
    KVFOLD_UNROLL(4)
    for (int b = 0; b < NB; ++b) even[b] = odd[b] = _mm512_setzero_ps();
    for (int64_t j = 0; j < rows; ++j, v += d) {
        const __m512 w = _mm512_set1_ps(p[j]);
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const __m512i x = load_block(v, b, NB, last);
            even[b] = _mm512_fmadd_ps(w, even_bf16(x), even[b]);
            odd[b] = _mm512_fmadd_ps(w, odd_bf16(x), odd[b]);
        }
    }
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    KVFOLD_UNROLL(4)
    for (int b = 0; b < NB; ++b) {
        const int64_t count = n - 32 * b;  // values of o this block holds: 32, or fewer in the last
        const __mmask16 lo_mask = tail(count), hi_mask = count > 16 ? tail(count - 16) : 0;
        __m512 lo = _mm512_permutex2var_ps(even[b], lo_idx, odd[b]),
               hi = _mm512_permutex2var_ps(even[b], hi_idx, odd[b]);
        if (add) {
            lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(lo_mask, o + 32 * b));
            hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(hi_mask, o + 32 * b + 16));
        }
        _mm512_mask_storeu_ps(o + 32 * b, lo_mask, lo);
        _mm512_mask_storeu_ps(o + 32 * b + 16, hi_mask, hi);
    }
}

void weighted_sum_bf16(const float* p, int64_t p_stride, int64_t nq, const uint16_t* v, int64_t rows, int64_t d,
                       float* out, int64_t out_stride, bool add) {
    using Acc = void (*)(const float*, const uint16_t*, int64_t, int64_t, float*, int64_t, bool);
    static constexpr Acc by_blocks[5] = {nullptr, accumulate_bf16<1>, accumulate_bf16<2>, accumulate_bf16<3>,
                                         accumulate_bf16<4>};
    for (int64_t i = 0; i < nq; ++i) {
        const float* pi = p + i * p_stride;
        float* o = out + i * out_stride;
        int64_t c = 0;
        for (; c + 128 <= d; c += 128) accumulate_bf16<4>(pi, v + c, rows, d, o + c, 128, add);
        if (c < d) by_blocks[(d - c + 31) / 32](pi, v + c, rows, d, o + c, d - c, add);
    }
}

#include "softmax-inl.hpp"

// Short blocks (n < 16) come from scores that were just stored one by one: a vector load would
// wait until those stores reach the cache, so they move in and out of a register one at a time.
// Longer ones take the shared softmax above.
inline __m512 gather_short(const float* s, int64_t n) {
    __m512 x = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; ++j)
        x = _mm512_mask_broadcastss_ps(x, static_cast<__mmask16>(1u << j), _mm_load_ss(s + j));
    return x;
}
inline void scatter_short(float* s, int64_t n, __m512 x) {
    alignas(64) float w[16];
    _mm512_store_ps(w, x);
    for (int64_t j = 0; j < n; ++j) s[j] = w[j];
}
// exp(x - m) in the first n lanes, 0 in the others.
inline __m512 exp_short(__m512 x, float m, int64_t n) {
    return _mm512_maskz_mov_ps(first(n), exp_neg(_mm512_sub_ps(x, _mm512_set1_ps(m))));
}

void softmax_short(float* s, int64_t n) {
    if (n >= 16) return softmax(s, n);
    __m512 x = gather_short(s, n);
    __m512 e = exp_short(x, _mm512_reduce_max_ps(x), n);
    scatter_short(s, n, _mm512_div_ps(e, _mm512_set1_ps(_mm512_reduce_add_ps(e))));
}

void softmax_block_short(float* s, int64_t n, float* running_max, float* total, float* acc, int64_t d) {
    if (n >= 16) return softmax_block(s, n, running_max, total, acc, d);
    __m512 x = gather_short(s, n);
    raise_max(_mm512_reduce_max_ps(x), running_max, total, acc, d);
    __m512 e = exp_short(x, *running_max, n);
    *total += _mm512_reduce_add_ps(e);
    scatter_short(s, n, e);
}

// exp over the whole float range (the GRU cell's gates, the matrix rules' decays).
void exp_f32(float* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp_any(_mm512_loadu_ps(x + i)));
    if (i < n) _mm512_mask_storeu_ps(y + i, first(n - i), exp_any(_mm512_maskz_loadu_ps(first(n - i), x + i)));
}

// Tiles of NV vectors, the last one masked (`last`). Full vectors move unmasked: a masked store
// holds back the loads that follow it.
template <int NV>
struct Tile {
    static constexpr int kVectors = NV;
    static constexpr bool kMasks = true;
    __mmask16 last;
    explicit Tile(int64_t values) : last(tail(values)) {}  // 1 <= values in the last vector
    __m512 load(const float* p, int t) const {
        return t + 1 < NV || last == 0xffff ? _mm512_loadu_ps(p + 16 * t) : _mm512_maskz_loadu_ps(last, p + 16 * t);
    }
    void store(float* p, int t, __m512 x) const {
        if (t + 1 < NV || last == 0xffff)
            _mm512_storeu_ps(p + 16 * t, x);
        else
            _mm512_mask_storeu_ps(p + 16 * t, last, x);
    }
};

// The matrix sweep. One query: whole rows of 128 columns, so that S streams through in order. More
// queries: tiles of 32 columns (16 KB of S at d_k = 128, so the second pass finds the tile in L1).
// The last tile takes what is left, masked.
void matrix_step(const MatrixPass& m) { tiled_matrix_step<Tile, 2, 8>(m); }
void matrix_read(const MatrixPass& m) { tiled_matrix_read<Tile, 2>(m); }

// The chunked prefill: tiles of 8 rows x 32 columns (16 accumulators); a panel of b, 16 KB at
// k = 128, stays in L1.
void gemm(const Gemm& g) { tiled_gemm<Tile, 8, 2>(g); }
void solve_unit_lower(const float* a, int64_t lda, float* x, int64_t ldx, int64_t m, int64_t n) {
    tiled_solve_unit_lower<Tile, 8, 2>(a, lda, x, ldx, m, n);
}

#include "table-inl.hpp"

// Two blocks of codes, or one (Half: the rest of the register zero). Plain loads: rows streamed
// from memory by masked loads were read several times slower on an AMD CPU.
inline __m512i load_pair(const void* p, bool half) {
    return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                : _mm512_loadu_si512(p);
}

// int8 rows (q8-inl.hpp). Two blocks of codes are one register: vpmaddubsw multiplies |q| by k with
// q's sign (llama.cpp's trick; codes are in [-127, 127], so no pair of products saturates 16 bits),
// vpmaddwd sums them into 16 int32, exact, 8 per block; each block's 8 take the product of its two
// scales. A last single block is a half register.
inline float q8_row_dot_avx512(const int8_t* qc, const float* qs, const int8_t* kc, const uint8_t* row, int64_t d,
                               int64_t first, int64_t n) {
    const float* ks = q8_scales(row, d) + first;
    const __m512i ones = _mm512_set1_epi16(1);
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n; b += 2) {
        const bool two = b + 1 < n;
        const __mmask64 m = two ? ~__mmask64(0) : __mmask64(0xffffffffu);
        const __m512i q = _mm512_maskz_loadu_epi8(m, qc + kQ8Block * b);
        const __m512i k = load_pair(kc + kQ8Block * b, !two);
        const __m512i signed_k = _mm512_mask_sub_epi8(k, _mm512_movepi8_mask(q), _mm512_setzero_si512(), k);
        const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(q), signed_k), ones);
        const __mmask8 m2 = two ? 3 : 1;
        const __m128 scales = _mm_mul_ps(_mm_maskz_loadu_ps(m2, qs + b), _mm_maskz_loadu_ps(m2, ks + b));
        acc =
            _mm512_fmadd_ps(_mm512_permutexvar_ps(pair, _mm512_castps128_ps512(scales)), _mm512_cvtepi32_ps(dot), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// q8_quantize_block (q8.hpp) 32 values at a time, to the same bits: the largest magnitude by its
// bit pattern, the same float32 divisions, and products rounded to nearest even as nearbyint does.
inline float q8_quantize_block_avx512(const float* x, int64_t n, int8_t* codes) {
    const __mmask16 m0 = tail(n), m1 = n > 16 ? tail(n - 16) : 0;
    const __m512 a = _mm512_maskz_loadu_ps(m0, x), b = _mm512_maskz_loadu_ps(m1, x + 16);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const uint32_t largest = _mm512_reduce_max_epu32(_mm512_max_epu32(
        _mm512_and_si512(_mm512_castps_si512(a), magnitude), _mm512_and_si512(_mm512_castps_si512(b), magnitude)));
    const float amax = bits_float(largest);
    if (largest >= 0x7f800000u || amax < kQ8Smallest) {
        std::memset(codes, 0, kQ8Block);
        return largest >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
    }
    const float scale = amax / 127.0f;
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inverse))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 16),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inverse))));
    return scale;
}

// s[j] = the sum of row_sum(row j)'s lanes, rows two at a time, their sums reduced together.
// Inlined into each caller, whose target region then holds row_sum too.
template <class RowSum>
KVFOLD_ALWAYS_INLINE void q8_score_rows(RowSum row_sum, const uint8_t* k, int64_t rows, int64_t row_bytes, float* s) {
    int64_t j = 0;
    for (; j + 2 <= rows; j += 2) {
        prefetch_l1(k + j * row_bytes + kQ8Ahead, 2 * row_bytes);
        const __m512 a0 = row_sum(k + j * row_bytes), a1 = row_sum(k + (j + 1) * row_bytes);
        // [a0 | a1] halves added, then each 128-bit quarter to its first lane: row 0 in lane 0, row 1 in lane 8
        __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xee));
        t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xb1));
        t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4e));
        t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xb1));
        s[j] = _mm512_cvtss_f32(t);
        s[j + 1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(t, 2));
    }
    if (j < rows) s[j] = _mm512_reduce_add_ps(row_sum(k + j * row_bytes));
}

// The query's block pair p: its codes, or the first block's and zeros (half).
KVFOLD_ALWAYS_INLINE __m512i q8_query_pair(const int8_t* qc, int p, bool half) {
    return _mm512_maskz_loadu_epi8(half ? __mmask64(0xffffffffu) : ~__mmask64(0), qc + 2 * kQ8Block * p);
}

// The lanes of block pair p's sums take scale 2p (first 8) and 2p + 1 (last 8) of q8_pair_scales.
KVFOLD_ALWAYS_INLINE __m512i q8_pick(int p) {
    return _mm512_set_epi32(2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1,
                            2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p);
}

// The products of the query's block scales and the row's (mask: its blocks), in the low 8 lanes.
KVFOLD_ALWAYS_INLINE __m512 q8_pair_scales(__m256 query_scales, __mmask8 mask, const uint8_t* row, int64_t d) {
    return _mm512_castps256_ps512(_mm256_mul_ps(query_scales, _mm256_maskz_loadu_ps(mask, q8_scales(row, d))));
}

// Rows of at most 8 blocks (d <= 256): the query's codes, signs and scales go to registers once for
// all rows, the rows' scales are multiplied by the query's in one register, and two rows' sums are
// reduced together. P: pairs of blocks.
template <int P, bool Half>
void q8_scores_pairs(const int8_t* qc, const float* qs, const uint8_t* k, int64_t rows, int64_t d, float* s) {
    const int64_t nb = q8_blocks(d), row_bytes = q8_row_bytes(d);
    const __mmask8 scale_mask = static_cast<__mmask8>((1u << nb) - 1);
    const __m256 query_scales = _mm256_maskz_loadu_ps(scale_mask, qs);
    const __m512i ones = _mm512_set1_epi16(1);
    __m512i aq[P], pick[P];
    __mmask64 neg[P];
    KVFOLD_UNROLL(4)
    for (int p = 0; p < P; ++p) {
        const __m512i q = q8_query_pair(qc, p, Half && p + 1 == P);
        aq[p] = _mm512_abs_epi8(q);
        neg[p] = _mm512_movepi8_mask(q);
        pick[p] = q8_pick(p);
    }
    auto row_sum = [&](const uint8_t* row) {
        const __m512 scales = q8_pair_scales(query_scales, scale_mask, row, d);
        __m512 acc = _mm512_setzero_ps();
        KVFOLD_UNROLL(4)
        for (int p = 0; p < P; ++p) {
            const __m512i x = load_pair(row + 2 * kQ8Block * p, Half && p + 1 == P);
            const __m512i signed_x = _mm512_mask_sub_epi8(x, neg[p], _mm512_setzero_si512(), x);
            const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(aq[p], signed_x), ones);
            acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick[p], scales), _mm512_cvtepi32_ps(dot), acc);
        }
        return acc;
    };
    q8_score_rows(row_sum, k, rows, row_bytes, s);
}

// AVX512_VNNI (Cascade Lake, Ice Lake, Zen 4 on): not every AVX-512 CPU has it, so its kernels
// are a target region of their own, taken at run time when the CPU has it.
const bool kVnni = cpu_has_avx512vnni();

// A region of its own, not nested in the file's: Clang applies only the outer of two pushed
// target attributes.
KVFOLD_TARGET_END
KVFOLD_TARGET_BEGIN("avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

// q8_scores_pairs with vpdpbusd, which multiplies unsigned by signed bytes and adds each four
// products to a 32-bit lane: the key codes k become unsigned as k + 128 (their top bit flipped),
// and each lane starts from -128 times the sum of its four query codes, so the sum is exact.
template <int P, bool Half>
void q8_scores_pairs_vnni(const int8_t* qc, const float* qs, const uint8_t* k, int64_t rows, int64_t d, float* s) {
    const int64_t nb = q8_blocks(d), row_bytes = q8_row_bytes(d);
    const __mmask8 scale_mask = static_cast<__mmask8>((1u << nb) - 1);
    const __m256 query_scales = _mm256_maskz_loadu_ps(scale_mask, qs);
    const __m512i flip = _mm512_set1_epi8(-128);
    __m512i q[P], bias[P], pick[P];
    KVFOLD_UNROLL(4)
    for (int p = 0; p < P; ++p) {
        q[p] = q8_query_pair(qc, p, Half && p + 1 == P);
        bias[p] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, q[p]));
        pick[p] = q8_pick(p);
    }
    auto row_sum = [&](const uint8_t* row) {
        const __m512 scales = q8_pair_scales(query_scales, scale_mask, row, d);
        __m512 acc = _mm512_setzero_ps();
        KVFOLD_UNROLL(4)
        for (int p = 0; p < P; ++p) {
            const __m512i x = _mm512_xor_si512(load_pair(row + 2 * kQ8Block * p, Half && p + 1 == P), flip);
            const __m512i dot = _mm512_dpbusd_epi32(bias[p], x, q[p]);
            acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick[p], scales), _mm512_cvtepi32_ps(dot), acc);
        }
        return acc;
    };
    q8_score_rows(row_sum, k, rows, row_bytes, s);
}

KVFOLD_TARGET_END
KVFOLD_TARGET_BEGIN("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")

void scores_q8_avx512(const float* q, int64_t q_stride, int64_t nq, const uint8_t* k, int64_t rows, int64_t d,
                      float scale, float* s, int64_t s_stride) {
    const int64_t nb = q8_blocks(d);
    if (nb > 8) return q8_scores_with(q8_row_dot_avx512, q, q_stride, nq, k, rows, d, scale, s, s_stride);
    using Pairs = void (*)(const int8_t*, const float*, const uint8_t*, int64_t, int64_t, float*);
    static constexpr Pairs by_pairs[2][2][5] = {
        // [VNNI][a last single block][pairs]
        {{nullptr, q8_scores_pairs<1, false>, q8_scores_pairs<2, false>, q8_scores_pairs<3, false>,
          q8_scores_pairs<4, false>},
         {nullptr, q8_scores_pairs<1, true>, q8_scores_pairs<2, true>, q8_scores_pairs<3, true>,
          q8_scores_pairs<4, true>}},
        {{nullptr, q8_scores_pairs_vnni<1, false>, q8_scores_pairs_vnni<2, false>, q8_scores_pairs_vnni<3, false>,
          q8_scores_pairs_vnni<4, false>},
         {nullptr, q8_scores_pairs_vnni<1, true>, q8_scores_pairs_vnni<2, true>, q8_scores_pairs_vnni<3, true>,
          q8_scores_pairs_vnni<4, true>}}};
    alignas(64) int8_t qc[8 * kQ8Block];
    float qs[8];
    for (int64_t i = 0; i < nq; ++i) {
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t at = b * kQ8Block, n = d - at < kQ8Block ? d - at : kQ8Block;
            qs[b] = scale * q8_quantize_block_avx512(q + i * q_stride + at, n, qc + at);
        }
        by_pairs[kVnni][nb % 2][(nb + 1) / 2](qc, qs, k, rows, d, s + i * s_stride);
    }
}

// The weighted sum (q8-inl.hpp) reads 16 codes at a time, widened to float32.
struct Q8 : V {
    static F load_i8(const int8_t* p) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
};

constexpr Kernels make_table() {
    Kernels k = filled_table("avx512");
    k.scores_q8 = scores_q8_avx512;
    k.weighted_sum_q8 = q8_weighted_sum_vectors<Q8, 4>;
    k.scores_bf16 = scores_bf16;  // even and odd values apart, see above
    k.weighted_sum_bf16 = weighted_sum_bf16;
    k.softmax = softmax_short;  // short blocks in one register, see above
    k.softmax_block = softmax_block_short;
    return k;
}

constexpr Kernels table = make_table();

}  // namespace
}  // namespace avx512

const Kernels* avx512_kernels() { return &avx512::table; }

}  // namespace kvfold
KVFOLD_TARGET_END
#endif
