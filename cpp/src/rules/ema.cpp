// EMA: the first folded pair sets Mem; then Mem_i = (1 - alpha) Mem_{i-1} + alpha kv_i.
// The state is float64: in float32 the rounding error of a small alpha grows like eps / alpha.
// With a RoPE the slot's position is the same average of the folded positions.
#include "../cache_checks.hpp"
#include "../rule.hpp"

namespace kvfold {
namespace {
class EMA final : public AccumulatorRule {
   public:
    explicit EMA(double alpha) : alpha_(alpha) {}
    Weights weights(int64_t count) const override {
        double a = count == 0 ? 1.0 : alpha_;  // weight 1 sets Mem to the pair (Mem starts at zero)
        return {1.0 - a, a, 1.0};
    }

   private:
    double alpha_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    double alpha = scalar_param(spec, "alpha");
    if (!(alpha > 0 && alpha <= 1)) throw ValueError("ema rule: alpha must be in (0, 1], got " + number_str(alpha));
    return std::make_unique<EMA>(alpha);
}
}  // namespace

extern const RuleKind ema_rule{"ema", {"alpha"}, {}, make};
}  // namespace kvfold
