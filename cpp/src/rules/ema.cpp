// EMA: the first folded pair sets Mem; then Mem_i = (1 - alpha) Mem_{i-1} + alpha kv_i.
// The state is float64: in float32 the rounding error of a small alpha grows like eps / alpha.
// With a RoPE the slot's position is the same average of the folded positions.
#include "../rule.hpp"

namespace kvfold {
namespace {
class EMA final : public SlotRule {
   public:
    explicit EMA(double alpha) : alpha_(alpha) {}
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(1);
        add_buffer(mem_k_, sizeof(double) * d.dk);
        add_buffer(mem_v_, sizeof(double) * d.dv);
        if (keeps_positions()) add_buffer(mem_p_, sizeof(double));
    }
    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        const Kernels& K = kernels();
        double a = count == 0 ? 1.0 : alpha_;  // weight 1 sets Mem to the pair (Mem starts at zero)
        SlotEdit slot(*this, lane, 0);
        K.axpby_f64(mem_k_.lane<double>(lane), 1.0 - a, k, a, slot.keys(), 1.0, dims_.dk);
        K.axpby_f64(mem_v_.lane<double>(lane), 1.0 - a, v, a, slot.values(), 1.0, dims_.dv);
        double* p = mem_p_.lane<double>(lane);
        if (keeps_positions()) *p = (1.0 - a) * *p + a * static_cast<double>(position);
        slot.store(keeps_positions() ? *p : 0.0);
    }
    int64_t max_slots() const override { return 1; }
    bool averages_pairs() const override { return true; }

   private:
    double alpha_;
    LaneBuffer mem_k_, mem_v_, mem_p_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    double alpha = scalar_param(spec, "alpha");
    if (!(alpha > 0 && alpha <= 1)) throw ValueError("ema rule: alpha must be in (0, 1], got " + std::to_string(alpha));
    return std::make_unique<EMA>(alpha);
}
}  // namespace

extern const RuleKind ema_rule{"ema", {"alpha"}, {}, make};
}  // namespace kvfold
