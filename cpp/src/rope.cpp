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

void Rope::angles(double p, float* cos, float* sin) const {
    for (int64_t i = 0; i < pairs_; ++i) {
        const double a = p * inv_freq_[i];
        cos[i] = static_cast<float>(std::cos(a));
        sin[i] = static_cast<float>(std::sin(a));
    }
}

void Rope::rotate(float* x, const float* cos, const float* sin) const {
    kernels().rotate(x, cos, sin, pairs_, interleaved_);
}

void Rope::rotate_at(float* x, double p) const {
    // The angles of the two positions a thread used last: a fold turns the evicted pair back at -p,
    // a merged slot at its own position, and a new slot at +p, in every head of a row.
    struct Kept {
        uint64_t id = 0;
        double at = -1;
        std::vector<float> table;  // cos, sin, -sin of the angles at position `at` >= 0
    };
    thread_local Kept kept[2];
    thread_local int newest = 0;
    const double at = std::fabs(p);
    const size_t n = static_cast<size_t>(pairs_);
    int k = newest;
    if (kept[k].id != id_ || kept[k].at != at) {
        k = 1 - newest;
        if (kept[k].id != id_ || kept[k].at != at) {
            kept[k].table.resize(3 * n);
            angles(at, kept[k].table.data(), kept[k].table.data() + n);
            for (size_t i = 0; i < n; ++i) kept[k].table[2 * n + i] = -kept[k].table[n + i];
            kept[k].id = id_;
            kept[k].at = at;
        }
    }
    newest = k;
    rotate(x, kept[k].table.data(), kept[k].table.data() + (p < 0 ? 2 * n : n));
}

}  // namespace kvfold
