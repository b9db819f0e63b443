#include "rope.hpp"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <string>

#include "kernels/kernels.hpp"

namespace kvfold {

Rope::Rope(const RoPE& r, int64_t head_dim) {
    if (r.theta == 0) {
        if (r.dim != 0 || r.interleaved)
            throw ValueError("rope: theta 0 means no RoPE; expected dim 0 and the half layout with it, got dim " +
                             std::to_string(r.dim));
        return;
    }
    if (!(std::isfinite(r.theta) && r.theta > 0)) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.6g", r.theta);
        throw ValueError(std::string("rope: theta must be a finite number > 0, got ") + buf);
    }
    const int64_t dim = r.dim == 0 ? head_dim : r.dim;
    if (r.dim < 0 || dim > head_dim)
        throw ValueError("rope: dim must be at most head_dim=" + std::to_string(head_dim) +
                         " (0 for the whole head), got dim=" + std::to_string(r.dim));
    if (dim % 2)
        throw ValueError(
            r.dim == 0 ? "rope: a RoPE over the whole head needs an even head_dim, got " + std::to_string(head_dim)
                       : "rope: dim must be even (dimensions are rotated in pairs), got " + std::to_string(dim));
    static std::atomic<uint64_t> next_id{1};
    id_ = next_id.fetch_add(1, std::memory_order_relaxed);
    pairs_ = dim / 2;
    interleaved_ = r.interleaved;
    inv_freq_.resize(static_cast<size_t>(pairs_));
    for (int64_t i = 0; i < pairs_; ++i)
        inv_freq_[i] = std::pow(r.theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
}

namespace {
// sin and cos of x in float64, within about an ulp of the exact ones (an ulp in float32 is 2^29 of
// them), for |x| <= kSinCosMax: x less the nearest multiple k of pi/2, taken off in three parts of 33
// bits each (k * part is exact for |k| < 2^20), then fdlibm's polynomials on [-pi/4, pi/4]. A few
// times cheaper than std::sin and std::cos, and free of calls, so the loop over the pairs overlaps.
constexpr double kSinCosMax = 0x1p19;
void sincos_reduced(double x, double* s, double* c) {
    constexpr double kRound = 0x1.8p52;  // adding it rounds to a whole number (std::nearbyint may be a call)
    const double k = (x * 6.36619772367581382433e-01 + kRound) - kRound;
    const double r =
        ((x - k * 1.57079632673412561417e+00) - k * 6.07710050630396597660e-11) - k * 2.02226624871116645580e-21;
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
    // x = r + q pi/2 (mod 2 pi): picked by index, not by branches (q is a coin toss to the CPU).
    const int64_t q = static_cast<int64_t>(k) & 3;
    const double both[2] = {sr, cr}, sign[2] = {1.0, -1.0};
    *s = both[q & 1] * sign[q >> 1];
    *c = both[(q & 1) ^ 1] * sign[((q + 1) >> 1) & 1];
}
}  // namespace

void Rope::angles(double p, float* cos, float* sin) const {
    for (int64_t i = 0; i < pairs_; ++i) {
        const double a = p * inv_freq_[i];
        double s, c;
        if (std::fabs(a) <= kSinCosMax) {
            sincos_reduced(a, &s, &c);
        } else {
            s = std::sin(a);
            c = std::cos(a);
        }
        cos[i] = static_cast<float>(c);
        sin[i] = static_cast<float>(s);
    }
}

void Rope::rotate(float* x, const float* cos, const float* sin) const {
    kernels().rotate(x, cos, sin, pairs_, interleaved_);
}

void Rope::rotate_at(float* x, double p) const {
    // The angles of the positions a thread used last: a fold turns the evicted pair back at -p, a
    // merged slot at its own (fractional) position, and a new slot at +p, in every head of a row.
    // Whole positions are kept by position (with tova or h2o each head folds a pair of its own, and
    // every head folds each pair in turn); the last two others by recency.
    struct Kept {
        uint64_t id = 0;
        double at = -1;
        std::vector<float> table;  // cos, sin, -sin of the angles at position `at` >= 0
    };
    constexpr size_t kWhole = 512;  // whole positions kept, position % kWhole
    thread_local Kept kept[2];
    thread_local std::vector<Kept> whole(kWhole);
    thread_local int newest = 0;
    const double at = std::fabs(p);
    const size_t n = static_cast<size_t>(pairs_);
    Kept* k = nullptr;
    if (at == std::floor(at) && at < 0x1p53) {
        k = &whole[static_cast<size_t>(static_cast<uint64_t>(at) % kWhole)];
    } else {
        int i = newest;
        if (kept[i].id != id_ || kept[i].at != at) i = 1 - newest;  // kept, or the older one goes
        newest = i;
        k = &kept[i];
    }
    if (k->id != id_ || k->at != at) {
        k->table.resize(3 * n);
        angles(at, k->table.data(), k->table.data() + n);
        for (size_t i = 0; i < n; ++i) k->table[2 * n + i] = -k->table[n + i];
        k->id = id_;
        k->at = at;
    }
    rotate(x, k->table.data(), k->table.data() + (p < 0 ? 2 * n : n));
}

}  // namespace kvfold
