// Custom(fn, slots): the user's own fold, fn(mem_k, mem_v, k, v, count) -> (new_mem_k, new_mem_v),
// over one batch row with every KV head at once. The slots start at zero and are visible once a
// pair has been folded; sinks, window, attention, GQA and batching are the cache's as for any rule.
// The function may throw (or return something malformed): the cache then restores its state.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../rule.hpp"

namespace kvfold {
namespace {

class Custom final : public RowRule {
   public:
    Custom(CustomFold fn, int64_t slots) : fn_(std::move(fn)), slots_(slots) {}
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(slots_);
    }

    // k (H, d_k), v (H, d_v): the pairs evicted from row `row`, one per head.
    void fold_row(int64_t row, const float* k, const float* v, int64_t count) override {
        const int64_t H = dims_.heads, nk = slots_ * dims_.dk, nv = slots_ * dims_.dv;
        std::vector<float>& mem = buffer();
        mem.resize(static_cast<size_t>(H * (nk + nv)));
        float* mk = mem.data();
        float* mv = mk + H * nk;
        for (int64_t h = 0; h < H; ++h) {  // slot buffers are per lane; the callback sees one array
            std::memcpy(mk + h * nk, state_keys(row * H + h), sizeof(float) * nk);
            std::memcpy(mv + h * nv, state_values(row * H + h), sizeof(float) * nv);
        }
        fn_(CustomCall{mk, mv, k, v, H, slots_, dims_.dk, dims_.dv, count});
        if (dims_.check_finite) {
            check_finite_memory("new_mem_k", mk, H * nk);
            check_finite_memory("new_mem_v", mv, H * nv);
        }
        for (int64_t h = 0; h < H; ++h) {
            std::memcpy(state_keys(row * H + h), mk + h * nk, sizeof(float) * nk);
            std::memcpy(state_values(row * H + h), mv + h * nv, sizeof(float) * nv);
        }
    }
    int64_t max_slots() const override { return slots_; }
    bool slots_are_state() const override { return true; }

   private:
    static void check_finite_memory(const char* name, const float* x, int64_t n) {
        for (int64_t i = 0; i < n; ++i)
            if (!std::isfinite(x[i]))
                throw ValueError(std::string("Custom rule: fn's ") + name + " must hold finite values, got " +
                                 (std::isnan(x[i]) ? "NaN" : "Inf") + " at flat index " + std::to_string(i) +
                                 " (check_finite=False skips this check)");
    }
    static std::vector<float>& buffer() {
        thread_local std::vector<float> buf;
        return buf;
    }

    CustomFold fn_;
    int64_t slots_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    int64_t slots = int_param(spec, "slots", 1, int64_t(1) << 24);
    if (!spec.custom) throw ValueError("custom rule: fn is required (a function folding one pair into the memory)");
    return std::make_unique<Custom>(spec.custom, slots);
}
}  // namespace

extern const RuleKind custom_rule{"custom", {"slots"}, {}, make};

}  // namespace kvfold
