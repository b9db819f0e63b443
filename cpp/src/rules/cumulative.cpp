// Cumulative: Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1), the mean of every folded pair.
// The running sum is float64 so the mean keeps moving after 2^24 pairs. With a RoPE the slot's
// position is the mean of the folded positions, kept as a float64 sum too.
#include "../rule.hpp"

namespace kvfold {
namespace {
class Cumulative final : public SlotRule {
   public:
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(1);
        add_buffer(sum_k_, sizeof(double) * d.dk);
        add_buffer(sum_v_, sizeof(double) * d.dv);
        if (keeps_positions()) add_buffer(sum_p_, sizeof(double));
    }
    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        const Kernels& K = kernels();
        double inv = 1.0 / static_cast<double>(count + 1);
        SlotEdit slot(*this, lane, 0);
        K.axpby_f64(sum_k_.lane<double>(lane), 1.0, k, 1.0, slot.keys(), inv, dims_.dk);
        K.axpby_f64(sum_v_.lane<double>(lane), 1.0, v, 1.0, slot.values(), inv, dims_.dv);
        double p = 0;
        if (keeps_positions()) p = (*sum_p_.lane<double>(lane) += static_cast<double>(position)) * inv;
        slot.store(p);
    }
    int64_t max_slots() const override { return 1; }
    bool averages_pairs() const override { return true; }

   private:
    LaneBuffer sum_k_, sum_v_, sum_p_;
};

std::unique_ptr<Rule> make(const RuleSpec&) { return std::make_unique<Cumulative>(); }
}  // namespace

extern const RuleKind cumulative_rule{"cumulative", {}, {}, make};
}  // namespace kvfold
