// Drop: evicted pairs are discarded. A sliding window; with sinks, StreamingLLM.
#include "../rule.hpp"

namespace kvfold {
namespace {
class Drop final : public Rule {
   public:
    void fold(int64_t, const float*, const float*, int64_t) override {}
};
}  // namespace

std::unique_ptr<Rule> make_drop(const RuleSpec&) { return std::make_unique<Drop>(); }
}  // namespace kvfold
