// Every SIMD table agrees with the scalar one, at odd sizes that exercise the tails.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>

#include "../src/half.hpp"
#include "../src/kernels/kernels.hpp"
#include "check.hpp"
#include "fixtures.hpp"

using namespace kvfold;

namespace {
using fixtures::normal;
const int64_t kSizes[] = {1, 3, 7, 8, 16, 17, 33, 127, 128, 300};
void check_close(const std::vector<float>& a, const std::vector<float>& b, double tol) {
    CHECK(a.size() == b.size());
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) CHECK_NEAR(a[i], b[i], tol);
}
// n random floats a and b (seeds seed and seed + 1), and b in float16 (h) and bfloat16 (bf), as the
// scalar table rounds it.
struct Inputs {
    std::vector<float> a, b;
    std::vector<uint16_t> h, bf;
};
Inputs inputs(int64_t n, unsigned seed) {
    Inputs x{normal(n, seed), normal(n, seed + 1), std::vector<uint16_t>(n), std::vector<uint16_t>(n)};
    scalar_kernels()->f32_to_f16(x.h.data(), x.b.data(), n);
    scalar_kernels()->f32_to_bf16(x.bf.data(), x.b.data(), n);
    return x;
}
// A conversion of the tested table gives the scalar one's output, bit for bit.
template <class Out, class In>
void same_conversion(void (*Kernels::*convert)(Out*, const In*, int64_t), const std::vector<In>& x) {
    const int64_t n = static_cast<int64_t>(x.size());
    std::vector<Out> want(x.size()), got(x.size());
    (scalar_kernels()->*convert)(want.data(), x.data(), n);
    (kernels().*convert)(got.data(), x.data(), n);
    CHECK(std::memcmp(want.data(), got.data(), sizeof(Out) * x.size()) == 0);
}
}  // namespace

TEST(kernels_match_scalar) {
    const Kernels& S = *scalar_kernels();
    const Kernels& K = kernels();
    for (int64_t n : kSizes) {
        auto [a, b, h, bf] = inputs(n, 1);
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
        std::vector<float> f1(n), f2(n);
        S.axpby_f64(s1.data(), 0.75, b.data(), 0.25, f1.data(), 0.5, n);
        K.axpby_f64(s2.data(), 0.75, b.data(), 0.25, f2.data(), 0.5, n);
        for (int64_t i = 0; i < n; ++i) CHECK_NEAR(s1[i], s2[i], 1e-12);
        for (int64_t i = 0; i < n; ++i)
            CHECK(f1[i] == static_cast<float>(0.5 * s1[i]) && std::fabs(f1[i] - f2[i]) <= 1e-6f);
        // Without a slot to write (y null) the sums are the same, whichever multiplications by 1 are left out.
        for (double keep : {1.0, 0.75})
            for (double scale : {1.0, 0.5}) {
                std::vector<double> with(n, 1.0), without(n, 1.0);
                K.axpby_f64(with.data(), keep, b.data(), 1.0, f2.data(), scale, n);
                K.axpby_f64(without.data(), keep, b.data(), 1.0, nullptr, scale, n);
                CHECK(with == without);
            }
    }
}

TEST(half_conversions_round_to_nearest_even) {
    CHECK(float_to_half(1.0f) == 0x3c00);
    CHECK(float_to_half(65504.0f) == 0x7bff);
    CHECK(float_to_half(65520.0f) == 0x7c00);
    CHECK(float_to_half(5.9604644775390625e-8f) == 0x0001);   // smallest subnormal
    CHECK(float_to_half(2.98023223876953125e-8f) == 0x0000);  // halfway to it: ties to even (0)
    CHECK(half_to_float(0x3555) == 0.333251953125f);
    CHECK(float_to_bf16(1.0f) == 0x3f80);
    CHECK(float_to_bf16(bits_float(0x3f808000u)) == 0x3f80);  // tie rounds to even
    CHECK(float_to_bf16(bits_float(0x3f818000u)) == 0x3f82);
    for (uint32_t h = 0; h < 0x7c00; ++h) CHECK(float_to_half(half_to_float(static_cast<uint16_t>(h))) == h);
}

TEST(every_table_has_every_kernel) {
    // A table is its name, a flag, then a list of pointers; one left out of the list would be null.
    const Kernels& K = kernels();
    CHECK(K.name != nullptr);
    const size_t first = offsetof(Kernels, dot_f32) / sizeof(void*);
    const void* const* entry = reinterpret_cast<const void* const*>(&K);
    for (size_t i = first; i < sizeof(Kernels) / sizeof(void*); ++i) CHECK(entry[i] != nullptr);
}

TEST(exp_matches_scalar) {
    const Kernels& S = *scalar_kernels();
    const Kernels& K = kernels();
    for (int64_t n : kSizes) {
        auto x = normal(n, 5);
        for (float& f : x) f *= 8;
        std::vector<float> y1(n), y2(n);
        S.exp_f32(y1.data(), x.data(), n);
        K.exp_f32(y2.data(), x.data(), n);
        for (int64_t i = 0; i < n; ++i) {
            CHECK_NEAR(y1[i], std::exp(double(x[i])), 1e-6);
            CHECK(std::fabs(y2[i] - y1[i]) <= 2e-6f * y1[i]);
        }
    }
}

namespace {
// S <- diag(a) S + k u^T and out_j = scale q_j^T S, in float64 from the formula.
void matrix_step_naive(std::vector<double>& S, int64_t dk, int64_t dv, const std::vector<float>& a, const float* k,
                       const float* v, bool delta, float beta, const float* q, int64_t nq, float scale,
                       std::vector<double>& out) {
    std::vector<double> u(v, v + dv);
    if (delta)
        for (int64_t j = 0; j < dv; ++j) {
            double r = 0;
            for (int64_t i = 0; i < dk; ++i) r += a[i] * S[i * dv + j] * k[i];
            u[j] = beta * (v[j] - r);
        }
    for (int64_t i = 0; i < dk; ++i)
        for (int64_t j = 0; j < dv; ++j) S[i * dv + j] = a[i] * S[i * dv + j] + k[i] * u[j];
    out.assign(nq * dv, 0.0);
    for (int64_t n = 0; n < nq; ++n)
        for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) out[n * dv + j] += scale * q[n * dk + i] * S[i * dv + j];
}
}  // namespace

TEST(matrix_step_and_read_match_the_formula) {
    const Kernels& S = *scalar_kernels();
    const Kernels& K = kernels();
    const int64_t dims[] = {1, 3, 7, 8, 17, 33, 127};
    unsigned seed = 10;
    for (int64_t dk : dims)
        for (int64_t dv : {int64_t(1), int64_t(7), int64_t(16), int64_t(17), int64_t(33), int64_t(127), int64_t(130)})
            for (int variant = 0; variant < 4; ++variant) {
                const bool delta = variant & 1, per_key = variant & 2;
                const int64_t nq = (dk + dv + variant) % 7;  // 0..6 queries: none, in registers, and beyond
                auto S0 = normal(dk * dv, ++seed), k = normal(dk, ++seed), v = normal(dv, ++seed);
                auto q = normal(nq * dk + 1, ++seed), g = normal(dk, ++seed);
                for (float& x : k) x *= 0.3f;
                std::vector<float> a(dk);
                for (int64_t i = 0; i < dk; ++i) a[i] = per_key ? std::exp(-std::fabs(g[i])) : 0.8f;
                std::vector<double> want_S(S0.begin(), S0.end()), want_out;
                matrix_step_naive(want_S, dk, dv, a, k.data(), v.data(), delta, 0.7f, q.data(), nq, 0.5f, want_out);
                for (const Kernels* table : {&S, &K}) {
                    std::vector<float> Sm = S0, out(nq * dv + 1, -1.0f);
                    MatrixPass m;
                    m.S = Sm.data();
                    m.dk = dk;
                    m.dv = m.ld = dv;
                    if (per_key)
                        m.decay = a.data();
                    else
                        m.decay0 = 0.8f;
                    m.k = k.data();
                    m.v = v.data();
                    m.delta = delta;
                    m.beta = 0.7f;
                    m.q = q.data();
                    m.nq = nq;
                    m.q_stride = dk;
                    m.scale = 0.5f;
                    m.out = out.data();
                    m.out_stride = dv;
                    m.next = S0.data();  // only ever requested from memory, never read
                    table->matrix_step(m);
                    for (int64_t i = 0; i < dk * dv; ++i) CHECK_NEAR(Sm[i], want_S[i], 1e-4);
                    for (int64_t i = 0; i < nq * dv; ++i) CHECK_NEAR(out[i], want_out[i], 1e-4);
                    CHECK(out[nq * dv] == -1.0f);  // nothing written past the outputs
                    std::vector<float> again(nq * dv + 1, -1.0f);
                    m.out = again.data();
                    table->matrix_read(m);
                    for (int64_t i = 0; i < nq * dv; ++i) CHECK_NEAR(again[i], want_out[i], 1e-4);
                    CHECK(again[nq * dv] == -1.0f);
                }
            }
}

TEST(matrix_kernels_honour_the_row_stride) {
    // A column window of a wider matrix: columns outside [4, 4 + dv) stay untouched.
    const int64_t dk = 9, dv = 19, ld = 32;
    auto S0 = normal(dk * ld, 40), k = normal(dk, 41), v = normal(dv, 42), q = normal(2 * dk, 43);
    for (const Kernels* table : {scalar_kernels(), &kernels()}) {
        std::vector<float> Sm = S0, out(2 * dv);
        MatrixPass m;
        m.S = Sm.data() + 4;
        m.dk = dk;
        m.dv = dv;
        m.ld = ld;
        m.k = k.data();
        m.v = v.data();
        m.delta = true;
        m.q = q.data();
        m.nq = 2;
        m.q_stride = dk;
        m.out = out.data();
        m.out_stride = dv;
        table->matrix_step(m);
        for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < ld; ++j)
                if (j < 4 || j >= 4 + dv) CHECK(Sm[i * ld + j] == S0[i * ld + j]);
        std::vector<double> want(S0.begin(), S0.end()), packed(dk * dv), want_out;
        for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) packed[i * dv + j] = S0[i * ld + 4 + j];
        matrix_step_naive(packed, dk, dv, std::vector<float>(dk, 1.0f), k.data(), v.data(), true, 1.0f, q.data(), 2,
                          1.0f, want_out);
        for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) CHECK_NEAR(Sm[i * ld + 4 + j], packed[i * dv + j], 1e-4);
        for (int64_t i = 0; i < 2 * dv; ++i) CHECK_NEAR(out[i], want_out[i], 1e-4);
    }
}

// The chunked prefill's matrix product at odd sizes, in every shape it is used in: against the
// formula in float64, with padded rows so that writes past a row's end would show.
TEST(gemm_matches_the_formula) {
    const int64_t sizes[] = {1, 3, 7, 8, 9, 16, 17, 33, 64, 65, 130};
    unsigned seed = 60;
    for (int64_t m : sizes)
        for (int64_t n : sizes)
            for (int64_t k : {int64_t(1), int64_t(5), int64_t(17), int64_t(64), int64_t(129)})
                for (int shape = 0; shape < 5; ++shape) {
                    const bool lower_a = shape == 1, lower_c = shape == 2, accumulate = shape >= 3,
                               trans_a = shape == 4;
                    const float beta = shape == 3 ? 0.75f : 1.0f;
                    if ((m * n * k) % 3 && shape == 0 && m > 9) continue;  // a sample of the plain products
                    const int64_t lda = trans_a ? m + 3 : k + 3, ldb = n + 5, ldc = n + 2;
                    auto a = normal((trans_a ? k : m) * lda, ++seed), b = normal(k * ldb, ++seed);
                    auto c0 = normal(m * ldc, ++seed);
                    auto at = [&](int64_t i, int64_t p) -> float& { return trans_a ? a[p * lda + i] : a[i * lda + p]; };
                    if (lower_a)
                        for (int64_t i = 0; i < m; ++i)
                            for (int64_t p = i + 1; p < k; ++p) at(i, p) = 0;
                    std::vector<double> want(m * n);
                    for (int64_t i = 0; i < m; ++i)
                        for (int64_t j = 0; j < n; ++j) {
                            double sum = 0;
                            for (int64_t p = 0; p < k; ++p) sum += double(at(i, p)) * b[p * ldb + j];
                            want[i * n + j] = -0.5 * sum + (accumulate ? beta * c0[i * ldc + j] : 0.0);
                        }
                    for (const Kernels* table : {scalar_kernels(), &kernels()}) {
                        std::vector<float> c = c0;
                        Gemm g;
                        g.m = m, g.n = n, g.k = k;
                        g.a = a.data(), g.lda = lda, g.b = b.data(), g.ldb = ldb, g.c = c.data(), g.ldc = ldc;
                        g.alpha = -0.5f, g.beta = beta;
                        g.accumulate = accumulate, g.trans_a = trans_a, g.lower_a = lower_a, g.lower_c = lower_c;
                        table->gemm(g);
                        for (int64_t i = 0; i < m; ++i) {
                            for (int64_t j = 0; j < n; ++j)
                                if (!lower_c || j <= i)
                                    CHECK_NEAR(c[i * ldc + j], want[i * n + j], 1e-4 * (1 + std::sqrt(double(k))));
                            for (int64_t j = n; j < ldc; ++j) CHECK(c[i * ldc + j] == c0[i * ldc + j]);
                        }
                    }
                }
}

TEST(triangular_solve_matches_the_formula) {
    unsigned seed = 80;
    for (int64_t m : {int64_t(1), int64_t(2), int64_t(7), int64_t(17), int64_t(33), int64_t(64)})
        for (int64_t n : {int64_t(1), int64_t(3), int64_t(16), int64_t(17), int64_t(40), int64_t(70), int64_t(256)}) {
            const int64_t lda = m + 1, ldx = n + 3;
            auto a = normal(m * lda, ++seed), x0 = normal(m * ldx, ++seed);
            for (float& f : a) f *= 0.2f;  // a well-conditioned I + a, as the delta rules make it
            for (const Kernels* table : {scalar_kernels(), &kernels()}) {
                std::vector<float> x = x0;
                table->solve_unit_lower(a.data(), lda, x.data(), ldx, m, n);
                // (I + strictly lower a) x == x0; the diagonal and above of a are never read
                for (int64_t i = 0; i < m; ++i) {
                    for (int64_t j = 0; j < n; ++j) {
                        double lhs = x[i * ldx + j];
                        for (int64_t s = 0; s < i; ++s) lhs += double(a[i * lda + s]) * x[s * ldx + j];
                        CHECK_NEAR(lhs, x0[i * ldx + j], 1e-4);
                    }
                    for (int64_t j = n; j < ldx; ++j) CHECK(x[i * ldx + j] == x0[i * ldx + j]);
                }
            }
        }
}

TEST(elementwise_kernels_match_scalar) {
    const Kernels& S = *scalar_kernels();
    const Kernels& K = kernels();
    for (int64_t n : kSizes) {
        auto [a, b, h, bf] = inputs(n, 3);
        same_conversion(&Kernels::f16_to_f32, h);
        same_conversion(&Kernels::bf16_to_f32, bf);
        std::vector<float> w1(n), w2(n);
        std::vector<float> y1 = a, y2 = a;
        S.axpy_f32(y1.data(), -0.75f, b.data(), n);
        K.axpy_f32(y2.data(), -0.75f, b.data(), n);
        check_close(y1, y2, 1e-6);
        S.axpy_bf16(y1.data(), 0.25f, bf.data(), n);
        K.axpy_bf16(y2.data(), 0.25f, bf.data(), n);
        check_close(y1, y2, 1e-6);
        S.scale(y1.data(), 3.0f, n);
        K.scale(y2.data(), 3.0f, n);
        check_close(y1, y2, 1e-6);
        S.max_f32(y1.data(), b.data(), n);
        K.max_f32(y2.data(), b.data(), n);
        check_close(y1, y2, 1e-6);
        std::vector<double> s1(n, 0.5), s2(n, 0.5);
        S.add_f64(s1.data(), a.data(), n);
        K.add_f64(s2.data(), a.data(), n);
        S.sub_f64(s1.data(), b.data(), n);
        K.sub_f64(s2.data(), b.data(), n);
        for (int64_t i = 0; i < n; ++i) CHECK(s1[i] == s2[i]);  // float64 sums of float32: exact
        std::vector<double> t1(n, -1.0), t2(n, -1.0);
        S.set_f64(t1.data(), b.data(), n);
        K.set_f64(t2.data(), b.data(), n);
        for (int64_t i = 0; i < n; ++i) CHECK(t1[i] == double(b[i]) && t2[i] == t1[i]);
        S.add_sums_f64(s1.data(), t1.data(), n);
        K.add_sums_f64(s2.data(), t2.data(), n);
        for (int64_t i = 0; i < n; ++i) CHECK(s1[i] == s2[i]);
        S.mul_f64(w1.data(), s1.data(), 1.0 / 3.0, n);
        K.mul_f64(w2.data(), s2.data(), 1.0 / 3.0, n);
        CHECK(w1 == w2);
        for (int64_t at : {int64_t(0), n / 2, n - 1}) {  // NaN or Inf anywhere, tails included
            std::vector<float> x = a;
            x[at] = at % 2 ? NAN : -INFINITY;
            CHECK(!K.all_finite(x.data(), n));
        }
    }
}

// Bit patterns that need care: signed zeros, subnormals, the largest finite, Inf and NaN.
TEST(conversions_of_special_values_match_scalar) {
    std::vector<float> x = {0.0f,  -0.0f,    1e-40f,   -1e-45f,   6e-8f, 3e-8f,       65504.0f,          65520.0f,
                            1e38f, -3.4e38f, INFINITY, -INFINITY, NAN,   1.00390625f, 1.0f + 1.0f / 128, -2.5f,
                            0.1f};
    same_conversion(&Kernels::f32_to_f16, x);
    same_conversion(&Kernels::f32_to_bf16, x);
}

// A key's score does not depend on where it sits among the rows (in a group of four, past the last
// group, in a later block): a window's pair scores the same as it moves through the ring.
TEST(a_keys_score_does_not_depend_on_its_place) {
    const Kernels& K = kernels();
    for (int64_t d : {int64_t(16), int64_t(100), int64_t(128)}) {
        const int64_t rows = 39;  // a block of 32, then a group of four and three rows past it
        auto q = normal(2 * d, 8), key = normal(d, 9);
        std::vector<float> k(rows * d), s(2 * rows);
        for (int64_t j = 0; j < rows; ++j) std::copy(key.begin(), key.end(), k.begin() + j * d);
        std::vector<uint16_t> kh(rows * d), kb(rows * d);
        K.f32_to_f16(kh.data(), k.data(), rows * d);
        K.f32_to_bf16(kb.data(), k.data(), rows * d);
        for (int dtype = 0; dtype < 3; ++dtype) {
            if (dtype == 0) K.scores_f32(q.data(), d, 2, k.data(), rows, d, 0.5f, s.data(), rows);
            if (dtype == 1) K.scores_f16(q.data(), d, 2, kh.data(), rows, d, 0.5f, s.data(), rows);
            if (dtype == 2) K.scores_bf16(q.data(), d, 2, kb.data(), rows, d, 0.5f, s.data(), rows);
            for (int64_t i = 0; i < 2; ++i)
                for (int64_t j = 1; j < rows; ++j) CHECK(s[i * rows + j] == s[i * rows]);
        }
    }
}

// Block attention kernels against the scalar table, for several query heads, odd row counts and
// sizes that exercise every tail, in each storage precision.
TEST(attention_kernels_match_scalar) {
    const Kernels& S = *scalar_kernels();
    const Kernels& K = kernels();
    for (int64_t d :
         {int64_t(1), int64_t(7), int64_t(16), int64_t(33), int64_t(48), int64_t(100), int64_t(128), int64_t(133)}) {
        for (int64_t rows : {int64_t(1), int64_t(3), int64_t(4), int64_t(5), int64_t(17), int64_t(64), int64_t(70)}) {
            for (int64_t nq : {int64_t(1), int64_t(3)}) {
                const int64_t stride = 70;
                auto q = normal(nq * d, 5), k = normal(rows * d, 6), p = normal(nq * stride, 7);
                std::vector<uint16_t> kh(rows * d), kb(rows * d);
                S.f32_to_f16(kh.data(), k.data(), rows * d);
                S.f32_to_bf16(kb.data(), k.data(), rows * d);
                std::vector<float> s1(nq * stride), s2(nq * stride);
                S.scores_f32(q.data(), d, nq, k.data(), rows, d, 0.5f, s1.data(), stride);
                K.scores_f32(q.data(), d, nq, k.data(), rows, d, 0.5f, s2.data(), stride);
                for (int64_t i = 0; i < nq; ++i)
                    for (int64_t j = 0; j < rows; ++j) CHECK_NEAR(s1[i * stride + j], s2[i * stride + j], 1e-5);
                S.scores_f16(q.data(), d, nq, kh.data(), rows, d, 0.5f, s1.data(), stride);
                K.scores_f16(q.data(), d, nq, kh.data(), rows, d, 0.5f, s2.data(), stride);
                for (int64_t i = 0; i < nq; ++i)
                    for (int64_t j = 0; j < rows; ++j) CHECK_NEAR(s1[i * stride + j], s2[i * stride + j], 1e-5);
                std::vector<float> qr = q;  // the query this table's bfloat16 scores read
                if (K.bf16_scores_round_query)
                    for (float& x : qr) x = bf16_to_float(float_to_bf16(x));
                S.scores_bf16(qr.data(), d, nq, kb.data(), rows, d, 0.5f, s1.data(), stride);
                K.scores_bf16(q.data(), d, nq, kb.data(), rows, d, 0.5f, s2.data(), stride);
                for (int64_t i = 0; i < nq; ++i)
                    for (int64_t j = 0; j < rows; ++j) CHECK_NEAR(s1[i * stride + j], s2[i * stride + j], 1e-5);
                for (bool add : {false, true}) {
                    std::vector<float> o1(nq * (d + 2), 1.0f), o2 = o1;  // rows of d, 2 apart
                    S.weighted_sum_f32(p.data(), stride, nq, k.data(), rows, d, o1.data(), d + 2, add);
                    K.weighted_sum_f32(p.data(), stride, nq, k.data(), rows, d, o2.data(), d + 2, add);
                    check_close(o1, o2, 1e-5);
                    S.weighted_sum_f16(p.data(), stride, nq, kh.data(), rows, d, o1.data(), d + 2, add);
                    K.weighted_sum_f16(p.data(), stride, nq, kh.data(), rows, d, o2.data(), d + 2, add);
                    check_close(o1, o2, 1e-5);
                    S.weighted_sum_bf16(p.data(), stride, nq, kb.data(), rows, d, o1.data(), d + 2, add);
                    K.weighted_sum_bf16(p.data(), stride, nq, kb.data(), rows, d, o2.data(), d + 2, add);
                    check_close(o1, o2, 1e-5);
                    for (int64_t i = 0; i < nq; ++i)
                        CHECK(o2[i * (d + 2) + d] == 1.0f && o2[i * (d + 2) + d + 1] == 1.0f);
                }
            }
        }
    }
}

// A softmax in one block equals the online softmax over any split into blocks.
TEST(softmax_blocks_agree_with_one_softmax) {
    const Kernels& K = kernels();
    for (int64_t n : {int64_t(1), int64_t(5), int64_t(16), int64_t(40), int64_t(100)}) {
        auto s = normal(n, 8);
        for (float& x : s) x *= 4.0f;
        std::vector<float> one = s;
        K.softmax(one.data(), n);
        double sum = 0;
        for (float w : one) sum += w;
        CHECK_NEAR(sum, 1.0, 1e-5);
        const int64_t d = 9;
        auto v = normal(n * d, 9);
        std::vector<float> expect(d, 0.0f), acc(d, 0.0f);
        for (int64_t j = 0; j < n; ++j)
            for (int64_t c = 0; c < d; ++c) expect[c] += one[j] * v[j * d + c];
        float running_max = -INFINITY, total = 0;
        std::vector<float> part = s;
        for (int64_t first = 0; first < n; first += 7) {  // blocks of 7 rows
            int64_t m = std::min<int64_t>(7, n - first);
            K.softmax_block(part.data() + first, m, &running_max, &total, acc.data(), d);
            K.weighted_sum_f32(part.data() + first, 0, 1, v.data() + first * d, m, d, acc.data(), d, true);
        }
        K.scale(acc.data(), 1.0f / total, d);
        check_close(acc, expect, 1e-5);
    }
}
