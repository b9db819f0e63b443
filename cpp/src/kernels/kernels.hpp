// Small kernels over raw float arrays, one file per ISA (scalar.cpp, x86_avx2.cpp, x86_avx512.cpp,
// arm_neon.cpp), each compiled for its ISA alone. What is not ISA-specific is written once and
// included by each of them: softmax-inl.hpp, simd-inl.hpp (over the file's vector traits),
// unmasked-inl.hpp (the row kernels of the files without masked moves) and table-inl.hpp (the
// table, filled by name). dispatch.cpp picks the best table the CPU runs, once.
#pragma once

#include <cstdint>
#include <type_traits>

#include "q8.hpp"

namespace kvfold {

class Requests;  // platform.hpp

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
    float* out = nullptr;  // nq outputs of d_v floats, out_stride apart
    int64_t out_stride = 0;
    const float* next = nullptr;  // the S swept next (same layout), if known: requested into L2 meanwhile
};

// A small matrix product, the building block of the chunked prefill (chunked.cpp):
//   c = alpha a b, or c = alpha a b + beta c when accumulate,
// with a m x k (row i at a + i * lda; with trans_a, a[i][p] is at a + p * lda + i: a k x m matrix
// used transposed), b k x n (row p at b + p * ldb), c m x n (row i at c + i * ldc).
// Two triangular shapes skip work:
//   lower_a: a is lower triangular; its entries above the diagonal must be 0 (they may still be read).
//   lower_c: only c[i][j] with j <= i is wanted; entries above the diagonal are left unspecified.
struct Gemm {
    int64_t m = 0, n = 0, k = 0;
    const float* a = nullptr;
    int64_t lda = 0;
    const float* b = nullptr;
    int64_t ldb = 0;
    float* c = nullptr;
    int64_t ldc = 0;
    float alpha = 1, beta = 1;  // beta: only when accumulate
    bool accumulate = false;
    bool trans_a = false;
    bool lower_a = false, lower_c = false;
    Requests* ahead = nullptr;  // memory wanted after the product: requested a little per tile
};

struct Kernels {
    const char* name;
    // scores_bf16 rounds the query to bfloat16 first (the avx512bf16 table's vdpbf16ps multiplies
    // bfloat16 by bfloat16); the other tables score the float32 query. The kernels follow.
    bool bf16_scores_round_query;
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

    void (*scale)(float* y, float a, int64_t n);         // y *= a
    float (*max)(const float* x, int64_t n);             // n >= 1
    float (*exp_sum)(float* x, float shift, int64_t n);  // x = exp(x - shift); sum
    bool (*all_finite)(const float* x, int64_t n);

    // Accumulators of the summary rules, float64 so long streams stay exact.
    void (*add_f64)(double* s, const float* x, int64_t n);            // s += x
    void (*sub_f64)(double* s, const float* x, int64_t n);            // s -= x
    void (*set_f64)(double* s, const float* x, int64_t n);            // s = x
    void (*add_sums_f64)(double* s, const double* t, int64_t n);      // s += t (two slots' sums merge)
    void (*mul_f64)(float* y, const double* s, double a, int64_t n);  // y = s * a
    // One pass of a fold: s = a * s + b * x, then the visible slot y = c * s in float32 (y may be
    // null when the slot is not wanted).
    void (*axpby_f64)(double* s, double a, const float* x, double b, float* y, double c, int64_t n);
    void (*max_f32)(float* y, const float* x, int64_t n);  // y = max(y, x)
    // RoPE: pair i of x turns by the angle whose cos and sin are given (n pairs): pair i is
    // (x[i], x[i + n]), or (x[2i], x[2i + 1]) when interleaved (rope-inl.hpp).
    void (*rotate)(float* x, const float* cos, const float* sin, int64_t n, bool interleaved);
    // cos and sin of x[i], |x[i]| <= 2^19, in float64 rounded once to float32 (rope-inl.hpp)
    void (*sincos_f64)(const double* x, float* cos, float* sin, int64_t n);

    // Attention over a block of rows, for nq query heads that share the rows (grouped-query
    // attention reads each key and value row once for the whole group). Row j of k or v starts at
    // k + j * d; query i at q + i * q_stride; its scores or weights at s + i * s_stride.
    //   scores:       s_ij = scale * q_i . k_j
    //   weighted_sum: out_i = (add ? out_i : 0) + sum_j p_ij v_j   (out_i at out + i * out_stride)
    void (*scores_f32)(const float* q, int64_t q_stride, int64_t nq, const float* k, int64_t rows, int64_t d,
                       float scale, float* s, int64_t s_stride);
    void (*scores_f16)(const float* q, int64_t q_stride, int64_t nq, const uint16_t* k, int64_t rows, int64_t d,
                       float scale, float* s, int64_t s_stride);
    void (*scores_bf16)(const float* q, int64_t q_stride, int64_t nq, const uint16_t* k, int64_t rows, int64_t d,
                        float scale, float* s, int64_t s_stride);
    void (*weighted_sum_f32)(const float* p, int64_t p_stride, int64_t nq, const float* v, int64_t rows, int64_t d,
                             float* out, int64_t out_stride, bool add);
    void (*weighted_sum_f16)(const float* p, int64_t p_stride, int64_t nq, const uint16_t* v, int64_t rows, int64_t d,
                             float* out, int64_t out_stride, bool add);
    void (*weighted_sum_bf16)(const float* p, int64_t p_stride, int64_t nq, const uint16_t* v, int64_t rows, int64_t d,
                              float* out, int64_t out_stride, bool add);
    // s (n >= 1 scores) becomes softmax(s): a visible set that fits in one block.
    void (*softmax)(float* s, int64_t n);
    // One block of an online softmax: the n scores s become weights exp(s - m), m the running max
    // (*max, updated); when the max grows, the output so far (acc, d) and *total are rescaled
    // first. *total accumulates the weights. n >= 1.
    void (*softmax_block)(float* s, int64_t n, float* max, float* total, float* acc, int64_t d);
    // Recurrent memories.
    void (*exp_f32)(float* y, const float* x, int64_t n);  // y = exp(x)
    void (*matrix_step)(const MatrixPass& m);
    void (*matrix_read)(const MatrixPass& m);
    // Chunked prefill: the matrix product above, and a triangular solve in place,
    //   x <- (I + a)^-1 x,  a strictly lower triangular m x m (entries on and above the diagonal
    //   are not read), x m x n (row i at x + i * ldx).
    void (*gemm)(const Gemm& g);
    void (*solve_unit_lower)(const float* a, int64_t lda, float* x, int64_t ldx, int64_t m, int64_t n);

    // int8 rows (q8.hpp): a row of d values is q8_row_bytes(d) bytes, rows one after another. The
    // conversions are exact functions of the row, the same bits in every table. scores_q8 quantizes
    // each query like a row and multiplies int8 by int8; weighted_sum_q8 is weighted_sum over the
    // rows as float32.
    void (*f32_to_q8)(uint8_t* y, const float* x, int64_t n);
    void (*q8_to_f32)(float* y, const uint8_t* x, int64_t n);
    void (*scores_q8)(const float* q, int64_t q_stride, int64_t nq, const uint8_t* k, int64_t rows, int64_t d,
                      float scale, float* s, int64_t s_stride);
    void (*weighted_sum_q8)(const float* p, int64_t p_stride, int64_t nq, const uint8_t* v, int64_t rows, int64_t d,
                            float* out, int64_t out_stride, bool add);
};
static_assert(std::is_trivially_destructible_v<Kernels>,
              "tables are statics that a thread still running at exit may read");

const Kernels& kernels();  // the active table

// Per-ISA tables, each on the architecture that has it.
const Kernels* scalar_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* avx512bf16_kernels();  // avx512 with bfloat16 keys scored by vdpbf16ps (x86_avx512bf16.cpp)

// What the x86 kernels choose between at run time (dispatch.cpp reads CPUID).
bool cpu_has_avx512vnni();
bool cpu_is_intel();
#elif defined(__aarch64__)
const Kernels* neon_kernels();
#endif

}  // namespace kvfold
