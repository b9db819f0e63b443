#include "rope.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <string>

#include "kernels/kernels.hpp"

namespace kvfold {

Rope::Rope(const RoPE& r, int64_t head_dim) {
    if (r.theta == 0) {
        if (r.dim != 0 || r.interleaved || !r.frequencies.empty())
            throw ValueError(
                "rope: theta 0 means no RoPE; expected dim 0, the half layout and no frequencies with it, got dim " +
                std::to_string(r.dim) + (r.interleaved ? ", the interleaved layout" : "") + " and " +
                std::to_string(r.frequencies.size()) + " frequencies");
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
    const size_t pairs = static_cast<size_t>(dim / 2);
    if (!r.frequencies.empty() && r.frequencies.size() != pairs)
        throw ValueError("rope: frequencies: expected " + std::to_string(pairs) + " values (one per pair of the " +
                         std::to_string(dim) + " rotated dimensions), got " + std::to_string(r.frequencies.size()));
    for (size_t i = 0; i < r.frequencies.size(); ++i)
        if (!std::isfinite(r.frequencies[i])) {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.6g", r.frequencies[i]);
            throw ValueError("rope: frequencies[" + std::to_string(i) + "] must be finite, got " + buf);
        }
    static std::atomic<uint64_t> next_id{1};
    id_ = next_id.fetch_add(1, std::memory_order_relaxed);
    pairs_ = dim / 2;
    interleaved_ = r.interleaved;
    inv_freq_ = r.frequencies;
    if (inv_freq_.empty()) {
        inv_freq_.resize(pairs);
        for (int64_t i = 0; i < pairs_; ++i)
            inv_freq_[i] = std::pow(r.theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
    }
}

namespace {
// Angles the reduction of Kernels::sincos_f64 does not reach (positions beyond about 2^19, or NaN)
// go to libm.
bool past_kernel_reach(double x) { return !(std::fabs(x) <= 0x1p19); }
}  // namespace

void Rope::angles(double p, float* cos, float* sin) const {
    constexpr int64_t kChunk = 64;
    double a[kChunk];
    for (int64_t at = 0; at < pairs_; at += kChunk) {
        const int64_t n = std::min(kChunk, pairs_ - at);
        bool far = false;  // such angles are zeroed for the kernel, then taken from libm
        for (int64_t i = 0; i < n; ++i) {
            a[i] = p * inv_freq_[at + i];
            if (past_kernel_reach(a[i])) far = true, a[i] = 0;
        }
        kernels().sincos_f64(a, cos + at, sin + at, n);
        if (!far) continue;
        for (int64_t i = 0; i < n; ++i) {
            const double x = p * inv_freq_[at + i];
            if (!past_kernel_reach(x)) continue;
            cos[at + i] = static_cast<float>(std::cos(x));
            sin[at + i] = static_cast<float>(std::sin(x));
        }
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
