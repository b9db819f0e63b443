// softmax and one block of an online softmax, written once over the including kernel file's own
// max, exp_sum and scale (the scalar table's and the SIMD tables' alike).
//
// Include it inside the kernel file's namespace, after those three and inside its target region.
// No include guard: each kernel file includes it once. It includes nothing itself (<cmath> and
// <cstdint> come first, outside the target region).

void softmax(float* s, int64_t n) {
    float total = exp_sum(s, max(s, n), n);
    scale(s, 1.0f / total, n);
}

// Raises the running max to m, rescaling what was accumulated under the old one.
inline void raise_max(float m, float* running_max, float* total, float* acc, int64_t d) {
    if (m > *running_max) {
        if (*total > 0) {
            float shrink = std::exp(*running_max - m);
            scale(acc, shrink, d);
            *total *= shrink;
        }
        *running_max = m;
    }
}

void softmax_block(float* s, int64_t n, float* running_max, float* total, float* acc, int64_t d) {
    raise_max(max(s, n), running_max, total, acc, d);
    *total += exp_sum(s, *running_max, n);
}
