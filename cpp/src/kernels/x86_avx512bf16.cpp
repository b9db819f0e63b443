// x86 AVX-512 with AVX512_BF16: the avx512 table, except that bfloat16 key rows are scored by
// vdpbf16ps, which multiplies pairs of bfloat16 values and adds both products to a float32 lane
// (the products are exact, the sums float32, bfloat16 subnormals read as zero). Both operands are
// bfloat16, so the query is rounded to bfloat16 once per call (8 significant bits, as the keys
// have): a bfloat16 cache on this table differs from the float32 model on its rounded pairs by the
// query's rounding. Weighted sums stay avx512's (float32 weights: bfloat16 ones read no faster).
// dispatch.cpp runs this table only when it is named (docs/performance.md has the numbers).
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC bug 105593, see x86_avx512.cpp
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "kernels.hpp"
#include "target.hpp"

KVFOLD_TARGET_BEGIN("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")

namespace kvfold {
namespace avx512bf16 {
namespace {

inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }  // 0 <= n
inline __mmask32 tail32(int64_t n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }       // 0 <= n

// The 16 lane sums of a[0..15], in a[r]'s order: halves, quarters and pairs of lanes added in a
// tree where each step serves two or four rows at once (one reduction per row costs three times
// as many operations).
inline __m512 sum16(const __m512* a) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; ++i)  // rows 2i, 2i + 1: their two 256-bit halves added
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; ++i)  // 128-bit lane L of c[i]: row 4i + L
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; ++i)  // lane L: rows 8i + L (values 0, 1) and 8i + 4 + L (values 2, 3)
        e[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    // value m of lane L: row 4m + L
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), f);
}

constexpr int kRows = 16;  // rows in flight: 16 accumulators hide vdpbf16ps's latency

// Scores of n <= kRows rows (row r at k + r * ld) against one query of NB bfloat16 blocks of 32
// values, the last one masked by `last` when Masked (the query is zero past it); added to s when
// `add`. Each row is read in order, its blocks one after another.
template <int NB, bool Masked, bool Full>
KVFOLD_ALWAYS_INLINE void score_rows(const __m512bh* q, const uint16_t* k, int64_t ld, int64_t n, __mmask32 last,
                                     float scale, float* s, bool add) {
    __m512 acc[kRows];
    KVFOLD_UNROLL(16)
    for (int r = 0; r < kRows; ++r, k += ld) {
        acc[r] = _mm512_setzero_ps();
        if (!Full && r >= n) continue;
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const __m512i x =
                Masked && b + 1 == NB ? _mm512_maskz_loadu_epi16(last, k + 32 * b) : _mm512_loadu_si512(k + 32 * b);
            acc[r] = _mm512_dpbf16_ps(acc[r], q[b], (__m512bh)x);
        }
    }
    const __mmask16 m = tail(n);
    __m512 x = _mm512_mul_ps(_mm512_set1_ps(scale), sum16(acc));
    if (add) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, s));
    _mm512_mask_storeu_ps(s, m, x);
}

// Columns c .. c + w of the rows (w <= 32 NB; the query rounded to bfloat16 by vcvtne2ps2bf16, to
// nearest even), for every query; added to s after the first columns.
template <int NB, bool Masked>
void score_columns(const float* q, int64_t q_stride, int64_t nq, const uint16_t* k, int64_t rows, int64_t d, int64_t c,
                   int64_t w, float scale, float* s, int64_t s_stride) {
    const __mmask32 last = tail32(w - 32 * (NB - 1));
    for (int64_t i = 0; i < nq; ++i) {
        __m512bh qb[NB];
        KVFOLD_UNROLL(4)
        for (int b = 0; b < NB; ++b) {
            const float* x = q + i * q_stride + c + 32 * b;
            const int64_t n = w - 32 * b;
            const __m512 lo = _mm512_maskz_loadu_ps(tail(n), x);
            const __m512 hi = n > 16 ? _mm512_maskz_loadu_ps(tail(n - 16), x + 16) : _mm512_setzero_ps();
            qb[b] = _mm512_cvtne2ps_pbh(hi, lo);
        }
        float* si = s + i * s_stride;
        int64_t j = 0;
        for (; j + kRows <= rows; j += kRows)
            score_rows<NB, Masked, true>(qb, k + j * d + c, d, kRows, last, scale, si + j, c > 0);
        if (j < rows) score_rows<NB, Masked, false>(qb, k + j * d + c, d, rows - j, last, scale, si + j, c > 0);
    }
}

// Up to 128 columns at a time: the query's blocks stay in registers.
void scores_bf16(const float* q, int64_t q_stride, int64_t nq, const uint16_t* k, int64_t rows, int64_t d, float scale,
                 float* s, int64_t s_stride) {
    using Columns = void (*)(const float*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, int64_t, float,
                             float*, int64_t);
    static constexpr Columns whole[5] = {nullptr, score_columns<1, false>, score_columns<2, false>,
                                         score_columns<3, false>, score_columns<4, false>};
    static constexpr Columns masked[5] = {nullptr, score_columns<1, true>, score_columns<2, true>,
                                          score_columns<3, true>, score_columns<4, true>};
    for (int64_t c = 0; c < d; c += 128) {
        const int64_t w = d - c < 128 ? d - c : 128;
        (w % 32 ? masked : whole)[(w + 31) / 32](q, q_stride, nq, k, rows, d, c, w, scale, s, s_stride);
    }
}

Kernels make_table() {
    Kernels k = *avx512_kernels();
    k.name = "avx512bf16";
    k.scores_bf16 = scores_bf16;
    k.bf16_scores_round_query = true;
    return k;
}

}  // namespace
}  // namespace avx512bf16

const Kernels* avx512bf16_kernels() {
    static const Kernels table = avx512bf16::make_table();
    return &table;
}

}  // namespace kvfold
KVFOLD_TARGET_END
#endif
