// Weighted(betas): Mem = sum_j beta_{j-i+n} kv_j / sum beta over the last n = len(betas) folded
// pairs; betas[0] weighs the oldest, betas[-1] the newest. With m < n pairs folded, the newest
// m betas are used and normalised by their sum. With a RoPE the slot's position is the same
// weighted mean of the last n positions.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../cache_checks.hpp"
#include "../rule.hpp"

namespace kvfold {
namespace {
class Weighted final : public SlotRule {
   public:
    explicit Weighted(std::vector<double> betas) : betas_(std::move(betas)) {
        // tail_[m] = sum of the newest m betas
        tail_.assign(betas_.size() + 1, 0.0);
        for (size_t m = 1; m <= betas_.size(); ++m) tail_[m] = tail_[m - 1] + betas_[betas_.size() - m];
    }
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(1);
        add_buffer(ring_k_, sizeof(float) * n() * d.dk, kFloat32);
        add_buffer(ring_v_, sizeof(float) * n() * d.dv, kFloat32);
        if (keeps_positions()) add_buffer(ring_p_, sizeof(int64_t) * n());
    }
    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        SlotEdit slot(*this, lane, 0);
        mix(ring_k_.lane<float>(lane), slot.keys(), k, dims_.dk, count);
        mix(ring_v_.lane<float>(lane), slot.values(), v, dims_.dv, count);
        slot.store(keeps_positions() ? mean_position(lane, count, position) : 0.0);
    }
    int64_t max_slots() const override { return 1; }
    bool averages_pairs() const override { return true; }

   private:
    int64_t n() const { return static_cast<int64_t>(betas_.size()); }

    void mix(float* ring, float* slot, const float* x, int64_t d, int64_t i) const {
        std::memcpy(ring + (i % n()) * d, x, sizeof(float) * d);
        int64_t m = i + 1 < n() ? i + 1 : n();
        double norm = 1.0 / tail_[m];
        std::memset(slot, 0, sizeof(float) * d);
        for (int64_t j = i - m + 1; j <= i; ++j) {  // oldest first
            float w = static_cast<float>(betas_[n() - 1 - (i - j)] * norm);
            if (w != 0.0f) kernels().axpy_f32(slot, w, ring + (j % n()) * d, d);
        }
    }

    double mean_position(int64_t lane, int64_t i, int64_t position) {
        int64_t* ring = ring_p_.lane<int64_t>(lane);
        ring[i % n()] = position;
        const int64_t m = i + 1 < n() ? i + 1 : n();
        double sum = 0;
        for (int64_t j = i - m + 1; j <= i; ++j) sum += betas_[n() - 1 - (i - j)] * static_cast<double>(ring[j % n()]);
        return sum / tail_[m];
    }

    std::vector<double> betas_, tail_;
    LaneBuffer ring_k_, ring_v_, ring_p_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    const Array& b = param(spec, "betas");
    if (b.shape.size() != 1 || b.data.empty())
        throw ValueError("weighted rule: betas must be a non-empty 1-D sequence, got " +
                         std::to_string(b.shape.size()) + " dimensions and " + std::to_string(b.data.size()) +
                         " values");
    if (b.data.size() > (size_t(1) << 24))
        throw ValueError("weighted rule: betas may hold at most 2^24 weights, got " + std::to_string(b.data.size()));
    for (size_t i = 0; i < b.data.size(); ++i)
        if (!std::isfinite(b.data[i]) || b.data[i] < 0)
            throw ValueError("weighted rule: betas must be finite and >= 0, got betas[" + std::to_string(i) +
                             "] = " + number_str(b.data[i]));
    if (!(b.data.back() > 0))
        throw ValueError(
            "weighted rule: betas[-1] (the newest pair's weight) must be > 0 so every partial "
            "window has a positive sum, got " +
            std::to_string(b.data.back()));
    // Only the ratios matter: scaled so the largest weight is 1, sums neither overflow (1e308 + 1e308)
    // nor lose subnormal weights (5e-324).
    std::vector<double> betas = b.data;
    const double largest = *std::max_element(betas.begin(), betas.end());
    for (double& x : betas) x = x / largest;
    if (!(betas.back() > 0))
        throw ValueError(
            "weighted rule: betas[-1] (the newest pair's weight) is too small next to the largest "
            "weight to be told from 0 (ratio below 1e-308), got " +
            std::to_string(b.data.back()));
    return std::make_unique<Weighted>(std::move(betas));
}
}  // namespace

extern const RuleKind weighted_rule{"weighted", {"betas"}, {}, make};
}  // namespace kvfold
