// Moving(n): the mean of the last n folded pairs (of all of them while fewer than n).
// O(d) per fold: a float64 running sum over a ring of the last n pairs. Each time the ring has
// turned once the sum is rebuilt from the ring, so add/subtract drift never accumulates.
#include <cstring>

#include "../rule.hpp"

namespace kvfold {
namespace {
class Moving final : public Rule {
   public:
    explicit Moving(int64_t n) : n_(n) {}
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(1);
        add_buffer(ring_k_, sizeof(float) * n_ * d.dk);
        add_buffer(ring_v_, sizeof(float) * n_ * d.dv);
        add_buffer(sum_k_, sizeof(double) * d.dk);
        add_buffer(sum_v_, sizeof(double) * d.dv);
    }
    void fold(int64_t lane, const float* k, const float* v, int64_t count) override {
        double inv = 1.0 / static_cast<double>(count + 1 < n_ ? count + 1 : n_);
        SlotEdit slot(*this, lane, 0);
        push(ring_k_.lane<float>(lane), sum_k_.lane<double>(lane), slot.keys(), k, dims_.dk, count, inv);
        push(ring_v_.lane<float>(lane), sum_v_.lane<double>(lane), slot.values(), v, dims_.dv, count, inv);
        slot.store();
    }
    int64_t max_slots() const override { return 1; }

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

    int64_t n_;
    LaneBuffer ring_k_, ring_v_, sum_k_, sum_v_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    return std::make_unique<Moving>(int_param(spec, "n", 1, int64_t(1) << 32));
}
}  // namespace

extern const RuleKind moving_rule{"moving", {"n"}, {}, make};
}  // namespace kvfold
