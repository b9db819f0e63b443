// Every kernel table, filled by name from the kernels the including file defines (or takes from
// softmax-inl.hpp and simd-inl.hpp) under these names. A file that tunes a kernel by hand under
// another name sets that entry again afterwards, by name.
//
// Include it at the end of the kernel file's namespace, inside its target region. No include
// guard: each kernel file includes it once.

#include "q8-inl.hpp"
#include "rope-inl.hpp"

// A kernel written once over the stored element type, under its float32, float16 and bfloat16 names.
#define KVFOLD_EACH_STORAGE(k, kernel) \
    k.kernel##_f32 = kernel<F32>;      \
    k.kernel##_f16 = kernel<F16>;      \
    k.kernel##_bf16 = kernel<BF16>

constexpr Kernels filled_table(const char* name) {
    Kernels k{};
    k.name = name;
    KVFOLD_EACH_STORAGE(k, dot);
    KVFOLD_EACH_STORAGE(k, axpy);
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
    k.set_f64 = set_f64;
    k.add_sums_f64 = add_sums_f64;
    k.mul_f64 = mul_f64;
    k.axpby_f64 = axpby_f64;
    k.max_f32 = max_f32;
    k.rotate = rotate;
    k.sincos_f64 = sincos_f64;
    KVFOLD_EACH_STORAGE(k, scores);
    KVFOLD_EACH_STORAGE(k, weighted_sum);
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

#undef KVFOLD_EACH_STORAGE
