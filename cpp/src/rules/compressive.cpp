// Compressive(slots, rate, pool): every `rate` folded pairs are pooled (mean or max) into one
// compressed pair in a FIFO of `slots`. The newest compressed pair is open: while it holds fewer
// than `rate` pairs it shows the pool of what it holds, so nothing folded is ever invisible. With a
// RoPE (pool mean only) a slot's position is the mean of its pairs' positions.
#include <cstring>

#include "../rule.hpp"

namespace kvfold {
namespace {
class Compressive final : public SlotRule {
   public:
    Compressive(int64_t slots, int64_t rate, bool max) : slots_(slots), rate_(rate), max_(max) {}
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(slots_);
        if (!max_) {  // the open pair's running sum
            add_buffer(sum_k_, sizeof(double) * d.dk, kFloat64);
            add_buffer(sum_v_, sizeof(double) * d.dv, kFloat64);
            if (keeps_positions()) add_buffer(sum_p_, sizeof(double), kFloat64);
        }
    }
    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        int64_t at = count % rate_;
        SlotEdit slot(*this, lane, (count / rate_) % slots_);
        float* sk = slot.keys();
        float* sv = slot.values();
        if (max_) {
            pool_max(sk, k, dims_.dk, at);
            pool_max(sv, v, dims_.dv, at);
        } else {
            pool_mean(sk, sum_k_.lane<double>(lane), k, dims_.dk, at);
            pool_mean(sv, sum_v_.lane<double>(lane), v, dims_.dv, at);
        }
        double p = 0;
        if (keeps_positions()) {
            double* sum = sum_p_.lane<double>(lane);
            *sum = (at == 0 ? 0.0 : *sum) + static_cast<double>(position);
            p = *sum / static_cast<double>(at + 1);
        }
        slot.store(p);
    }
    int64_t max_slots() const override { return slots_; }
    bool averages_pairs() const override { return !max_; }
    int64_t visible_slots(int64_t folded) const override {
        int64_t made = (folded + rate_ - 1) / rate_;
        return made < slots_ ? made : slots_;
    }
    int64_t oldest_slot(int64_t folded) const override {
        int64_t made = (folded + rate_ - 1) / rate_;
        return made > slots_ ? made % slots_ : 0;
    }

   private:
    static void pool_max(float* slot, const float* x, int64_t d, int64_t at) {
        if (at == 0)
            std::memcpy(slot, x, sizeof(float) * d);
        else
            kernels().max_f32(slot, x, d);
    }
    static void pool_mean(float* slot, double* sum, const float* x, int64_t d, int64_t at) {
        if (at == 0) std::memset(sum, 0, sizeof(double) * d);
        kernels().axpby_f64(sum, 1.0, x, 1.0, slot, 1.0 / static_cast<double>(at + 1), d);
    }

    int64_t slots_, rate_;
    bool max_;
    LaneBuffer sum_k_, sum_v_, sum_p_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    int64_t slots = int_param(spec, "slots", 1, int64_t(1) << 24);
    int64_t rate = int_param(spec, "rate", 1, int64_t(1) << 32);
    bool max = option(spec, "pool", {"mean", "max"}) == "max";
    return std::make_unique<Compressive>(slots, rate, max);
}
}  // namespace

extern const RuleKind compressive_rule{"compressive", {"slots", "rate"}, {"pool"}, make};
}  // namespace kvfold
