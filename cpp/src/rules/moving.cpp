// Moving(n): the mean of the last n folded pairs (of all of them while fewer than n).
// O(d) per fold: a float64 running sum over a ring of the last n pairs. Each time the ring has
// turned once the sum is rebuilt from the ring, so add/subtract drift never accumulates. With a RoPE
// the slot's position is the mean of the last n positions, from a ring of them (exact: integers).
#include <cstring>

#include "../rule.hpp"

namespace kvfold {
namespace {
class Moving final : public SlotRule {
   public:
    explicit Moving(int64_t n) : n_(n) {}
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(1);
        add_buffer(ring_k_, sizeof(float) * n_ * d.dk, kFloat32);
        add_buffer(ring_v_, sizeof(float) * n_ * d.dv, kFloat32);
        add_buffer(sum_k_, sizeof(double) * d.dk, kFloat64);
        add_buffer(sum_v_, sizeof(double) * d.dv, kFloat64);
        if (keeps_positions()) {
            add_buffer(ring_p_, sizeof(int64_t) * n_);
            add_buffer(sum_p_, sizeof(double), kFloat64);
        }
    }
    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        double inv = 1.0 / static_cast<double>(count + 1 < n_ ? count + 1 : n_);
        SlotEdit slot(*this, lane, 0);
        push(ring_k_.lane<float>(lane), sum_k_.lane<double>(lane), slot.keys(), k, dims_.dk, count, inv);
        push(ring_v_.lane<float>(lane), sum_v_.lane<double>(lane), slot.values(), v, dims_.dv, count, inv);
        slot.store(keeps_positions() ? mean_position(lane, count, position) : 0.0);
    }
    int64_t max_slots() const override { return 1; }
    bool averages_pairs() const override { return true; }

   private:
    // Puts x in the ring, updates the sum and sets the slot to sum * inv.
    void push(float* ring, double* sum, float* slot, const float* x, int64_t d, int64_t count, double inv) const {
        const Kernels& K = kernels();
        float* row = ring + (count % n_) * d;
        if (count >= n_ && (count + 1) % n_ == 0) {
            std::memcpy(row, x, sizeof(float) * d);
            std::memset(sum, 0, sizeof(double) * d);
            for (int64_t r = 0; r < n_; ++r) K.add_f64(sum, ring + r * d, d);
            K.mul_f64(slot, sum, inv, d);
            return;
        }
        if (count >= n_) K.sub_f64(sum, row, d);
        std::memcpy(row, x, sizeof(float) * d);
        K.axpby_f64(sum, 1.0, x, 1.0, slot, inv, d);
    }

    // Puts the position in its ring; the mean of the last min(count + 1, n) positions. The sum of
    // integers is exact in float64 (below 2^53), so it never drifts.
    double mean_position(int64_t lane, int64_t count, int64_t position) {
        int64_t* slot = ring_p_.lane<int64_t>(lane) + count % n_;
        double* sum = sum_p_.lane<double>(lane);
        if (count >= n_) *sum -= static_cast<double>(*slot);
        *slot = position;
        *sum += static_cast<double>(position);
        return *sum / static_cast<double>(count + 1 < n_ ? count + 1 : n_);
    }

    int64_t n_;
    LaneBuffer ring_k_, ring_v_, sum_k_, sum_v_, ring_p_, sum_p_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    return std::make_unique<Moving>(int_param(spec, "n", 1, int64_t(1) << 32));
}
}  // namespace

extern const RuleKind moving_rule{"moving", {"n"}, {}, make};
}  // namespace kvfold
