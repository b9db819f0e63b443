// x86 AVX2 + FMA + F16C kernels. The target region keeps the rest of the build baseline x86-64.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <type_traits>

#include "../half.hpp"
#include "../platform.hpp"
#include "kernels.hpp"
#include "target.hpp"

// Headers stay outside the target region so no inline function of theirs is emitted with AVX2.
KVFOLD_TARGET_BEGIN("avx2,fma,f16c")

namespace kvfold {
namespace avx2 {
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The vector traits simd-inl.hpp is written over: 8 floats.
struct V {
    using F = __m256;
    static constexpr int kLanes = 8;
    static F zero() { return _mm256_setzero_ps(); }
    static F set1(float x) { return _mm256_set1_ps(x); }
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
    static F load_f16(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static F load_bf16(const uint16_t* p) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F min(F a, F b) { return _mm256_min_ps(a, b); }
    static F max(F a, F b) { return _mm256_max_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
    static F round(F x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static F pow2(F p, F n) {  // 2^n built in the exponent bits: n within [-126, 127]
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    }
    static float sum(F x) { return hsum(x); }
    // y[i] = scale * (the sum of x[i]'s lanes) for i < 4, the four at once.
    static void sum4(float* y, const F* x, float scale) {
        const F h = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(y, _mm_mul_ps(_mm_set1_ps(scale), s));
    }
    static float reduce_max(F x) {
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        return _mm_cvtss_f32(h);
    }
    static constexpr int kDotChains = 2;
    static constexpr bool kRequestNext = false;  // see update_tile
};

#include "simd-inl.hpp"

// exp(x) for x <= 0 (softmax after the max shift): 2^n stays a normal float down to -87.3.
inline F exp_neg(F x) { return exp_clamped<false>(V::max(x, V::set1(-87.33654f))); }

// exp(x) over the whole float range: the input is clamped to [-87.3, 88.72] so 2^n stays a
// normal float (results below 1e-38 become 1.2e-38, above FLT_MAX stay just below it).
inline F exp_any(F x) { return exp_clamped<true>(V::min(V::max(x, V::set1(-87.33654f)), V::set1(88.72283f))); }

#include "unmasked-inl.hpp"

void f32_to_f16(uint16_t* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) y[i] = float_to_half(x[i]);
}
// Round to nearest even on the bit pattern, NaN kept quiet: the scalar float_to_bf16, 8 at a time.
void f32_to_bf16(uint16_t* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256i u = _mm256_castps_si256(v);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
        __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), packed);
    }
    for (; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

// A float is finite when its exponent bits are not all ones: the largest exponent field of the
// values tells, kept in four registers so that the loop is no chain of dependent steps.
bool all_finite(const float* x, int64_t n) {
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    __m256i e0 = _mm256_setzero_si256(), e1 = e0, e2 = e0, e3 = e0;
    auto field = [&](const float* p) {
        return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), exponent);
    };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        e0 = _mm256_max_epu32(e0, field(x + i));
        e1 = _mm256_max_epu32(e1, field(x + i + 8));
        e2 = _mm256_max_epu32(e2, field(x + i + 16));
        e3 = _mm256_max_epu32(e3, field(x + i + 24));
    }
    for (; i + 8 <= n; i += 8) e0 = _mm256_max_epu32(e0, field(x + i));
    const __m256i e = _mm256_max_epu32(_mm256_max_epu32(e0, e1), _mm256_max_epu32(e2, e3));
    if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(e, exponent))) return false;
    for (; i < n; ++i)
        if (!std::isfinite(x[i])) return false;
    return true;
}

void add_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        _mm256_storeu_pd(s + i, _mm256_add_pd(_mm256_loadu_pd(s + i), _mm256_cvtps_pd(_mm_loadu_ps(x + i))));
    for (; i < n; ++i) s[i] += x[i];
}
void sub_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        _mm256_storeu_pd(s + i, _mm256_sub_pd(_mm256_loadu_pd(s + i), _mm256_cvtps_pd(_mm_loadu_ps(x + i))));
    for (; i < n; ++i) s[i] -= x[i];
}
void set_f64(double* s, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(s + i, _mm256_cvtps_pd(_mm_loadu_ps(x + i)));
    for (; i < n; ++i) s[i] = x[i];
}
void add_sums_f64(double* s, const double* t, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(s + i, _mm256_add_pd(_mm256_loadu_pd(s + i), _mm256_loadu_pd(t + i)));
    for (; i < n; ++i) s[i] += t[i];
}
void mul_f64(float* y, const double* s, double a, int64_t n) {
    __m256d va = _mm256_set1_pd(a);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_loadu_pd(s + i), va)));
    for (; i < n; ++i) y[i] = static_cast<float>(s[i] * a);
}
// s = a s + b x, y = c s (y null: not wanted). Cumulative has a = b = 1 and EMA c = 1: the
// multiplications by 1 are left out (they are exact, so the result is the same).
template <bool Keep, bool Scale, bool Read>
void axpby_f64_as(double* s, double a, const float* x, double b, float* y, double c, int64_t n) {
    const __m256d va = _mm256_set1_pd(a), vb = _mm256_set1_pd(b), vc = _mm256_set1_pd(c);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const __m256d vx = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), vs = _mm256_loadu_pd(s + i);
        const __m256d r = Keep ? _mm256_fmadd_pd(va, vs, _mm256_mul_pd(vb, vx)) : _mm256_add_pd(vs, vx);
        _mm256_storeu_pd(s + i, r);
        if (Read) _mm_storeu_ps(y + i, _mm256_cvtpd_ps(Scale ? _mm256_mul_pd(vc, r) : r));
    }
    for (; i < n; ++i) {
        s[i] = a * s[i] + b * x[i];
        if (Read) y[i] = static_cast<float>(c * s[i]);
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
void max_f32(float* y, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_max_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] = x[i] > y[i] ? x[i] : y[i];
}

// Tiles for the chunked prefill: the last vector of a tile is masked when it is partial (masked
// moves are slower, so full vectors use plain ones).
template <int NV>
struct Tile {
    static constexpr int kVectors = NV;
    static constexpr bool kMasks = true;
    __m256i mask;
    bool partial;
    explicit Tile(int64_t last) : partial(last < 8) {  // 1 <= last <= 8 columns in the last vector
        mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    __m256 load(const float* p, int t) const {
        return t + 1 == NV && partial ? _mm256_maskload_ps(p + 8 * t, mask) : _mm256_loadu_ps(p + 8 * t);
    }
    void store(float* p, int t, __m256 x) const {
        if (t + 1 == NV && partial)
            _mm256_maskstore_ps(p + 8 * t, mask, x);
        else
            _mm256_storeu_ps(p + 8 * t, x);
    }
};

// The matrix sweep: tiles of 16 columns, 32 with a single query; columns past the last whole
// vector go to the scalar table.
void matrix_step(const MatrixPass& m) { tiled_matrix_step<Whole, 2, 4>(m); }
void matrix_read(const MatrixPass& m) { tiled_matrix_read<Whole, 2>(m); }

// The chunked prefill: tiles of 6 rows x 16 columns (12 accumulators).
void gemm(const Gemm& g) { tiled_gemm<Tile, 6, 2>(g); }
void solve_unit_lower(const float* a, int64_t lda, float* x, int64_t ldx, int64_t m, int64_t n) {
    tiled_solve_unit_lower<Tile, 6, 2>(a, lda, x, ldx, m, n);
}

// bfloat16 rows of whole 16-value blocks are widened in pairs: a 32-bit lane holds two values, the
// even one becomes a float by a shift and the odd one by a mask, in place, where widening them in
// order takes a shuffle that bounds the step. Sums run over the even and the odd elements apart:
// queries are split the same way, weighted sums interleaved back at the end.
inline __m256 even_bf16(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
inline __m256 odd_bf16(__m256i x) {
    return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xffff0000u))));
}
inline __m256i load_block(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
constexpr int64_t kQueryBlocks = 32;  // the split query holds rows of up to 512 values

// The scores of R (4 or 1) rows of nb blocks against the split query (qe, qo): two chains a row,
// the lane sums of the four at once. One row is summed in all four places, so that a row's score
// does not depend on R.
template <int R>
inline void bf16_rows(const __m256* qe, const __m256* qo, const uint16_t* k, int64_t d, int64_t nb, float scale,
                      float* s) {
    __m256 e[4], o[4];
    KVFOLD_UNROLL(4)
    for (int r = 0; r < R; ++r) e[r] = o[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        KVFOLD_UNROLL(4)
        for (int r = 0; r < R; ++r) {
            const __m256i x = load_block(k + r * d + 16 * b);
            e[r] = _mm256_fmadd_ps(qe[b], even_bf16(x), e[r]);
            o[r] = _mm256_fmadd_ps(qo[b], odd_bf16(x), o[r]);
        }
    }
    KVFOLD_UNROLL(4)
    for (int r = 0; r < 4; ++r) e[r] = r < R ? _mm256_add_ps(e[r], o[r]) : e[0];
    float y[4];
    V::sum4(R == 4 ? s : y, e, scale);
    if (R == 1) s[0] = y[0];
}

void scores_bf16(const float* q, int64_t q_stride, int64_t nq, const uint16_t* k, int64_t rows, int64_t d, float scale,
                 float* s, int64_t s_stride) {
    if (d % 16 || d > 16 * kQueryBlocks) return scores<BF16>(q, q_stride, nq, k, rows, d, scale, s, s_stride);
    const int64_t nb = d / 16;
    __m256 qe[kQueryBlocks], qo[kQueryBlocks];
    for (int64_t i = 0; i < nq; ++i, s += s_stride) {
        const float* qi = q + i * q_stride;
        for (int64_t b = 0; b < nb; ++b) {  // [q0 q2 q8 q10 q4 q6 q12 q14] -> [q0 q2 q4 ... q14]
            const __m256 lo = _mm256_loadu_ps(qi + 16 * b), hi = _mm256_loadu_ps(qi + 16 * b + 8);
            qe[b] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xd8));
            qo[b] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xdd)), 0xd8));
        }
        int64_t j = 0;
        for (; j + 4 <= rows; j += 4) bf16_rows<4>(qe, qo, k + j * d, d, nb, scale, s + j);
        for (; j < rows; ++j) bf16_rows<1>(qe, qo, k + j * d, d, nb, scale, s + j);
    }
}

// o[0 : 16 NB] (+)= sum_j p_j v_j[0 : 16 NB], in 2 NB registers.
template <int NB>
void accumulate_bf16(const float* p, const uint16_t* v, int64_t rows, int64_t d, float* o, bool add) {
    __m256 even[NB], odd[NB];
    KVFOLD_UNROLL(4)
    for (int b = 0; b < NB; ++b) even[b] = odd[b] = _mm256_setzero_ps();
    for (int64_t j = 0; j < rows; ++j, v += d) {
        const __m256 w = _mm256_set1_ps(p[j]);
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const __m256i x = load_block(v + 16 * b);
            even[b] = _mm256_fmadd_ps(w, even_bf16(x), even[b]);
            odd[b] = _mm256_fmadd_ps(w, odd_bf16(x), odd[b]);
        }
    }
    KVFOLD_UNROLL(4)
    for (int b = 0; b < NB; ++b) {  // [e0 o0 e1 o1 e4 o4 e5 o5], [e2 o2 e3 o3 e6 o6 e7 o7] -> in order
        const __m256 lo = _mm256_unpacklo_ps(even[b], odd[b]), hi = _mm256_unpackhi_ps(even[b], odd[b]);
        __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20), second = _mm256_permute2f128_ps(lo, hi, 0x31);
        if (add) {
            first = _mm256_add_ps(first, _mm256_loadu_ps(o + 16 * b));
            second = _mm256_add_ps(second, _mm256_loadu_ps(o + 16 * b + 8));
        }
        _mm256_storeu_ps(o + 16 * b, first);
        _mm256_storeu_ps(o + 16 * b + 8, second);
    }
}

void weighted_sum_bf16(const float* p, int64_t p_stride, int64_t nq, const uint16_t* v, int64_t rows, int64_t d,
                       float* out, int64_t out_stride, bool add) {
    if (d % 16) return weighted_sum<BF16>(p, p_stride, nq, v, rows, d, out, out_stride, add);
    using Acc = void (*)(const float*, const uint16_t*, int64_t, int64_t, float*, bool);
    static constexpr Acc by_blocks[4] = {nullptr, accumulate_bf16<1>, accumulate_bf16<2>, accumulate_bf16<3>};
    for_row_blocks(rows, add, [&](int64_t j0, int64_t n, bool add_block) {  // as weighted_sum does
        const uint16_t* v0 = v + j0 * d;
        for (int64_t i = 0; i < nq; ++i) {
            const float* pi = p + i * p_stride + j0;
            float* o = out + i * out_stride;
            int64_t c = 0;
            for (; c + 64 <= d; c += 64) accumulate_bf16<4>(pi, v0 + c, n, d, o + c, add_block);
            if (c < d) by_blocks[(d - c) / 16](pi, v0 + c, n, d, o + c, add_block);
        }
    });
}

#include "softmax-inl.hpp"

#include "table-inl.hpp"

// int8 rows (q8-inl.hpp). A block of codes is one register. vpmaddubsw multiplies unsigned by signed
// bytes: |q| times k with q's sign (llama.cpp's trick; codes are in [-127, 127], so no pair of
// products saturates 16 bits), vpmaddwd sums them into 8 int32, exact.
inline float q8_row_dot_avx2(const int8_t* qc, const float* qs, const int8_t* kc, const uint8_t* row, int64_t d,
                             int64_t first, int64_t n) {
    const float* ks = q8_scales(row, d) + first;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n; ++b) {
        const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(qc + kQ8Block * b));
        const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kc + kQ8Block * b));
        const __m256i dot =
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(k, q)), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(qs[b] * ks[b]), _mm256_cvtepi32_ps(dot), acc);
    }
    return hsum(acc);
}

void scores_q8_avx2(const float* q, int64_t q_stride, int64_t nq, const uint8_t* k, int64_t rows, int64_t d,
                    float scale, float* s, int64_t s_stride) {
    q8_scores_with(q8_row_dot_avx2, q, q_stride, nq, k, rows, d, scale, s, s_stride);
}

// The weighted sum (q8-inl.hpp) reads 8 codes at a time, widened to float32.
struct Q8 : V {
    static F load_i8(const int8_t* p) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
};

constexpr Kernels make_table() {
    Kernels k = filled_table("avx2");
    k.scores_bf16 = scores_bf16;  // even and odd values apart, see above
    k.weighted_sum_bf16 = weighted_sum_bf16;
    k.scores_q8 = scores_q8_avx2;
    k.weighted_sum_q8 = q8_weighted_sum_vectors<Q8, 2>;
    return k;
}

constexpr Kernels table = make_table();

}  // namespace
}  // namespace avx2

const Kernels* avx2_kernels() { return &avx2::table; }

}  // namespace kvfold
KVFOLD_TARGET_END
#endif
