// Small kernels over raw float arrays, one implementation per ISA (scalar.cpp, x86_avx2.cpp,
// x86_avx512.cpp, arm_neon.cpp). dispatch.cpp picks the best table the CPU runs, once.
#pragma once

#include <cstdint>

namespace kvfold {

// One sweep over a matrix memory S (rows: key dimensions, columns: value dimensions) of one KV
// head. matrix_step first updates S,
//   S <- diag(a) S + k u^T,  u = v, or u = beta (v - (diag(a) S)^T k) for the delta rules,
// with a_i = decay[i] (or decay0 for every row when decay is null), then reads the updated S for
// nq queries, out_j = scale q_j^T S; column tile by column tile, so S is loaded from memory once.
// matrix_read only reads (S, dk, dv, ld and the query fields).
struct MatrixPass {
    float* S;
    int64_t dk, dv;  // rows, columns
    int64_t ld;      // distance between rows of S, >= dv
    const float* decay = nullptr;
    float decay0 = 1;
    const float* k = nullptr;  // d_k
    const float* v = nullptr;  // d_v
    bool delta = false;
    float beta = 1;
    const float* q = nullptr;  // nq queries of d_k floats, q_stride apart
    int64_t nq = 0, q_stride = 0;
    float scale = 1;
    float* out = nullptr;      // nq outputs of d_v floats, out_stride apart
    int64_t out_stride = 0;
};

struct Kernels {
    const char* name;
    // Rows in storage precision: f16 and bf16 rows are uint16_t bit patterns.
    float (*dot_f32)(const float* a, const float* b, int64_t n);
    float (*dot_f16)(const float* a, const uint16_t* b, int64_t n);
    float (*dot_bf16)(const float* a, const uint16_t* b, int64_t n);
    void (*axpy_f32)(float* y, float a, const float* x, int64_t n);  // y += a * x
    void (*axpy_f16)(float* y, float a, const uint16_t* x, int64_t n);
    void (*axpy_bf16)(float* y, float a, const uint16_t* x, int64_t n);
    void (*f32_to_f16)(uint16_t* y, const float* x, int64_t n);
    void (*f16_to_f32)(float* y, const uint16_t* x, int64_t n);
    void (*f32_to_bf16)(uint16_t* y, const float* x, int64_t n);
    void (*bf16_to_f32)(float* y, const uint16_t* x, int64_t n);

    void (*scale)(float* y, float a, int64_t n);                 // y *= a
    float (*max)(const float* x, int64_t n);                      // n >= 1
    float (*exp_sum)(float* x, float shift, int64_t n);           // x = exp(x - shift); sum
    bool (*all_finite)(const float* x, int64_t n);

    // Accumulators of the summary rules, float64 so long streams stay exact.
    void (*add_f64)(double* s, const float* x, int64_t n);            // s += x
    void (*sub_f64)(double* s, const float* x, int64_t n);            // s -= x
    void (*mul_f64)(float* y, const double* s, double a, int64_t n);  // y = s * a
    void (*lerp_f64)(double* s, const float* x, double a, int64_t n); // s += a * (x - s)
    void (*max_f32)(float* y, const float* x, int64_t n);             // y = max(y, x)

    // Recurrent memories. A table may leave these null; dispatch then takes the next table down's.
    void (*gemv)(float* y, const float* W, const float* x, int64_t rows, int64_t cols);  // y = W x
    void (*exp_f32)(float* y, const float* x, int64_t n);                               // y = exp(x)
    void (*matrix_step)(const MatrixPass& m);
    void (*matrix_read)(const MatrixPass& m);
};

const Kernels& kernels();  // the active table

// Per-ISA tables; null when not compiled for this architecture.
const Kernels* scalar_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* neon_kernels();

}  // namespace kvfold
