// The RoPE angles and rotation, written once as plain loops that each kernel file's target vectorizes.
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

// cos and sin of x[i] in float64, within about an ulp of the exact ones (an ulp in float32 is 2^29 of
// them), rounded once to float32, for |x[i]| <= 2^19: x less the nearest multiple k of pi/2, taken
// off in three parts of 33 bits each (k * part is exact for |k| < 2^20), then fdlibm's polynomials on
// [-pi/4, pi/4]. No calls and no branches: the loop vectorizes.
void sincos_f64(const double* x, float* cos, float* sin, int64_t n) {
    constexpr double kRound = 0x1.8p52;  // adding it rounds to a whole number (std::nearbyint may be a call)
    for (int64_t i = 0; i < n; ++i) {
        const double k = (x[i] * 6.36619772367581382433e-01 + kRound) - kRound;
        const double r =
            ((x[i] - k * 1.57079632673412561417e+00) - k * 6.07710050630396597660e-11) - k * 2.02226624871116645580e-21;
        const double z = r * r;
        const double ps =
            8.33333333332248946124e-03 +
            z * (-1.98412698298579493134e-04 +
                 z * (2.75573137070700676789e-06 + z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)));
        const double sr = r + z * r * (-1.66666666666666324348e-01 + z * ps);
        const double pc = z * (4.16666666666666019037e-02 +
                               z * (-1.38888888888741095749e-03 +
                                    z * (2.48015872894767294178e-05 +
                                         z * (-2.75573143513906633035e-07 +
                                              z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
        const double hz = 0.5 * z, w = 1.0 - hz;
        const double cr = w + (((1.0 - w) - hz) + z * pc);
        // x = r + q pi/2 (mod 2 pi), q = k mod 4: sin is +-sr or +-cr, cos the other.
        const int q = static_cast<int>(k) & 3;
        const bool odd = q & 1;
        const double s = odd ? cr : sr, c = odd ? sr : cr;
        sin[i] = static_cast<float>(s * static_cast<double>(1 - (q & 2)));
        cos[i] = static_cast<float>(c * static_cast<double>(1 - ((q + 1) & 2)));
    }
}
