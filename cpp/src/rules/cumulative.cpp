// Cumulative: Mem_i = (kv_i + i * Mem_{i-1}) / (i + 1), the mean of every folded pair.
// The running sum is float64 so the mean keeps moving after 2^24 pairs. With a RoPE the slot's
// position is the mean of the folded positions, kept as a float64 sum too.
#include "../rule.hpp"

namespace kvfold {
namespace {
class Cumulative final : public AccumulatorRule {
   public:
    // The accumulators are running sums, read divided by the count.
    Weights weights(int64_t count) const override { return {1.0, 1.0, 1.0 / static_cast<double>(count + 1)}; }
};

std::unique_ptr<Rule> make(const RuleSpec&) { return std::make_unique<Cumulative>(); }
}  // namespace

extern const RuleKind cumulative_rule{"cumulative", {}, {}, make};
}  // namespace kvfold
