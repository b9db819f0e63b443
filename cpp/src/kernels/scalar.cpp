// Portable kernels: the reference every SIMD table is tested against, and the fallback.
#include <cmath>
#include <cstring>

#include "../half.hpp"
#include "../platform.hpp"  // prefetch_l1 in the vector skeletons of q8-inl.hpp
#include "kernels.hpp"
#include "target.hpp"  // KVFOLD_UNROLL in the vector skeletons of q8-inl.hpp

namespace kvfold {
namespace scalar {
namespace {

// Stored elements, one value at a time.
struct F32 {
    using T = float;
    static float one(float x) { return x; }
};
struct F16 {
    using T = uint16_t;
    static float one(uint16_t h) { return half_to_float(h); }
};
struct BF16 {
    using T = uint16_t;
    static float one(uint16_t h) { return bf16_to_float(h); }
};

template <class E>
float dot(const float* a, const typename E::T* b, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += a[i] * E::one(b[i]);
    return s;
}
template <class E>
void axpy(float* y, float a, const typename E::T* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * E::one(x[i]);
}
template <class E>
void widen(float* y, const typename E::T* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = E::one(x[i]);
}
void f32_to_f16(uint16_t* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_half(x[i]);
}
void f32_to_bf16(uint16_t* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
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
void set_f64(double* s, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) s[i] = x[i];
}
void add_sums_f64(double* s, const double* t, int64_t n) {
    for (int64_t i = 0; i < n; ++i) s[i] += t[i];
}
void mul_f64(float* y, const double* s, double a, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(s[i] * a);
}
void axpby_f64(double* s, double a, const float* x, double b, float* y, double c, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        s[i] = a * s[i] + b * x[i];
        if (y) y[i] = static_cast<float>(c * s[i]);
    }
}
void max_f32(float* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] > y[i] ? x[i] : y[i];
}

void exp_f32(float* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
}

constexpr int64_t kTile = 16;  // columns of S per sweep; the tile stays in L1 between its two passes

void matrix_step(const MatrixPass& m) {
    for (int64_t c = 0; c < m.dv; c += kTile) {
        const int64_t w = m.dv - c < kTile ? m.dv - c : kTile;
        float u[kTile];
        for (int64_t j = 0; j < w; ++j) u[j] = m.v[c + j];
        if (m.delta) {  // u = beta (v - (diag(a) S)^T k) over this tile's columns
            float r[kTile] = {};
            for (int64_t i = 0; i < m.dk; ++i) {
                const float ak = (m.decay ? m.decay[i] : m.decay0) * m.k[i];
                const float* row = m.S + i * m.ld + c;
                for (int64_t j = 0; j < w; ++j) r[j] += ak * row[j];
            }
            for (int64_t j = 0; j < w; ++j) u[j] = m.beta * (u[j] - r[j]);
        }
        for (int64_t n = 0; n < m.nq; ++n)
            for (int64_t j = 0; j < w; ++j) m.out[n * m.out_stride + c + j] = 0;
        for (int64_t i = 0; i < m.dk; ++i) {
            const float a = m.decay ? m.decay[i] : m.decay0, ki = m.k[i];
            float* row = m.S + i * m.ld + c;
            for (int64_t j = 0; j < w; ++j) row[j] = a * row[j] + ki * u[j];
            for (int64_t n = 0; n < m.nq; ++n) {
                const float qi = m.q[n * m.q_stride + i];
                float* o = m.out + n * m.out_stride + c;
                for (int64_t j = 0; j < w; ++j) o[j] += qi * row[j];
            }
        }
        for (int64_t n = 0; n < m.nq; ++n)
            for (int64_t j = 0; j < w; ++j) m.out[n * m.out_stride + c + j] *= m.scale;
    }
}

void matrix_read(const MatrixPass& m) {
    for (int64_t n = 0; n < m.nq; ++n) {
        float* o = m.out + n * m.out_stride;
        for (int64_t j = 0; j < m.dv; ++j) o[j] = 0;
        for (int64_t i = 0; i < m.dk; ++i) axpy<F32>(o, m.q[n * m.q_stride + i], m.S + i * m.ld, m.dv);
        scale(o, m.scale, m.dv);
    }
}

// Row by row, each row of c built up from rows of b (the inner loop runs along rows of b and c).
void gemm(const Gemm& g) {
    for (int64_t i = 0; i < g.m; ++i) {
        float* c = g.c + i * g.ldc;
        const int64_t n = g.lower_c && i + 1 < g.n ? i + 1 : g.n;
        const int64_t k = g.lower_a && i + 1 < g.k ? i + 1 : g.k;
        if (!g.accumulate || g.beta != 1)
            for (int64_t j = 0; j < n; ++j) c[j] = g.accumulate ? g.beta * c[j] : 0;
        for (int64_t p = 0; p < k; ++p) {
            const float w = g.alpha * (g.trans_a ? g.a[p * g.lda + i] : g.a[i * g.lda + p]);
            const float* b = g.b + p * g.ldb;
            for (int64_t j = 0; j < n; ++j) c[j] += w * b[j];
        }
    }
}

// Forward substitution: row i subtracts the rows above it, already solved.
void solve_unit_lower(const float* a, int64_t lda, float* x, int64_t ldx, int64_t m, int64_t n) {
    for (int64_t i = 1; i < m; ++i)
        for (int64_t s = 0; s < i; ++s) axpy<F32>(x + i * ldx, -a[i * lda + s], x + s * ldx, n);
}

template <class E>
void scores(const float* q, int64_t q_stride, int64_t nq, const typename E::T* k, int64_t rows, int64_t d, float scale,
            float* s, int64_t s_stride) {
    for (int64_t j = 0; j < rows; ++j)
        for (int64_t i = 0; i < nq; ++i) s[i * s_stride + j] = scale * dot<E>(q + i * q_stride, k + j * d, d);
}

template <class E>
void weighted_sum(const float* p, int64_t p_stride, int64_t nq, const typename E::T* v, int64_t rows, int64_t d,
                  float* out, int64_t out_stride, bool add) {
    for (int64_t i = 0; i < nq; ++i) {
        if (!add) std::memset(out + i * out_stride, 0, sizeof(float) * d);
        for (int64_t j = 0; j < rows; ++j) axpy<E>(out + i * out_stride, p[i * p_stride + j], v + j * d, d);
    }
}

#include "softmax-inl.hpp"

#include "table-inl.hpp"

constexpr Kernels table = filled_table("scalar");

}  // namespace
}  // namespace scalar

const Kernels* scalar_kernels() { return &scalar::table; }

}  // namespace kvfold
