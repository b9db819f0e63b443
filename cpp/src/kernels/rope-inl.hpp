// The RoPE rotation, written once as plain loops that each kernel file's target vectorizes.
//
// Included by table-inl.hpp, inside the kernel file's namespace and target region. No include guard.

void rotate(float* x, const float* cos, const float* sin, int64_t n, bool interleaved) {
    if (!interleaved) {  // pair i: (x[i], x[i + n])
        float* b = x + n;
        for (int64_t i = 0; i < n; ++i) {
            const float xa = x[i], xb = b[i];
            x[i] = xa * cos[i] - xb * sin[i];
            b[i] = xb * cos[i] + xa * sin[i];
        }
        return;
    }
    for (int64_t i = 0; i < n; ++i) {  // pair i: (x[2i], x[2i + 1])
        const float xa = x[2 * i], xb = x[2 * i + 1];
        x[2 * i] = xa * cos[i] - xb * sin[i];
        x[2 * i + 1] = xb * cos[i] + xa * sin[i];
    }
}
