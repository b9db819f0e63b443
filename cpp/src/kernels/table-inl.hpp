// Every kernel table, filled by name from the kernels the including file defines (or takes from
// softmax-inl.hpp and simd-inl.hpp) under these names. A file that tunes a kernel by hand under
// another name sets that entry again afterwards, by name.
//
// Include it at the end of the kernel file's namespace, inside its target region. No include
// guard: each kernel file includes it once.

#include "q8-inl.hpp"
#include "rope-inl.hpp"

constexpr Kernels filled_table(const char* name) {
    Kernels k{};
    k.name = name;
    k.dot_f32 = dot<F32>;
    k.dot_f16 = dot<F16>;
    k.dot_bf16 = dot<BF16>;
    k.axpy_f32 = axpy<F32>;
    k.axpy_f16 = axpy<F16>;
    k.axpy_bf16 = axpy<BF16>;
    k.f32_to_f16 = f32_to_f16;
    k.f16_to_f32 = widen<F16>;
    k.f32_to_bf16 = f32_to_bf16;
    k.bf16_to_f32 = widen<BF16>;
    k.scale = scale;
    k.max = max;
    k.exp_sum = exp_sum;
    k.all_finite = all_finite;
    k.add_f64 = add_f64;
    k.sub_f64 = sub_f64;
    k.mul_f64 = mul_f64;
    k.axpby_f64 = axpby_f64;
    k.max_f32 = max_f32;
    k.rotate = rotate;
    k.scores_f32 = scores<F32>;
    k.scores_f16 = scores<F16>;
    k.scores_bf16 = scores<BF16>;
    k.weighted_sum_f32 = weighted_sum<F32>;
    k.weighted_sum_f16 = weighted_sum<F16>;
    k.weighted_sum_bf16 = weighted_sum<BF16>;
    k.softmax = softmax;
    k.softmax_block = softmax_block;
    k.exp_f32 = exp_f32;
    k.matrix_step = matrix_step;
    k.matrix_read = matrix_read;
    k.gemm = gemm;
    k.solve_unit_lower = solve_unit_lower;
    k.f32_to_q8 = f32_to_q8;
    k.q8_to_f32 = q8_to_f32;
    k.scores_q8 = scores_q8;
    k.weighted_sum_q8 = weighted_sum_q8;
    return k;
}
