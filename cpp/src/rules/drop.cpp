// Drop: evicted pairs are discarded. A sliding window; with sinks, StreamingLLM.
#include "../rule.hpp"

namespace kvfold {
namespace {
class Drop final : public SlotRule {
   public:
    void fold(int64_t, const float*, const float*, int64_t, int64_t) override {}
    bool averages_pairs() const override { return true; }
};

std::unique_ptr<Rule> make(const RuleSpec&) { return std::make_unique<Drop>(); }
}  // namespace

extern const RuleKind drop_rule{"drop", {}, {}, make};
}  // namespace kvfold
