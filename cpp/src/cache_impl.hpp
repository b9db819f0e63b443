// The cache's state, shared by the public cache (cache.cpp), the slot and matrix models and the
// state format (state_io.cpp); constructed in cache_impl.cpp.
#pragma once

#include <vector>

#include "buffer.hpp"
#include "cache_lock.hpp"
#include "kvfold/kvfold.hpp"
#include "rope.hpp"
#include "rule.hpp"

namespace kvfold {

struct MemoryCache::Impl {
    Config cfg;
    RuleSpec spec;
    std::unique_ptr<Rule> rule;  // made once: reorder swaps its buffers, never the rule
    // What the rule is, fixed at construction: read without the lock.
    int64_t memory_slots = 0;
    SlotRule* slots = nullptr;     // the rule, when its memory is key/value slots
    RowRule* rows = nullptr;       // the rule, when it folds whole rows (Custom)
    MatrixRule* matrix = nullptr;  // the rule, when its memory is a matrix (the linear-attention family)
    bool normalized = false;
    int64_t lanes = 0;  // batch rows x KV heads
    int64_t group = 1;  // query heads per KV head
    float scale = 1;
    Rope rope;  // on() when the cache has a RoPE
    Retain retain = Retain::fifo;
    int64_t recent = 0;                       // h2o: the newest window pairs never folded (0 otherwise)
    LaneBuffer sink_k, sink_v, win_k, win_v;  // storage dtype, [lanes][sinks|window][d]
    // Matrix rules with per-token gates: each window slot keeps its token's gates, gate_stride
    // floats [beta, decay count (0, 1 or d_k), decay values], so an evicted pair folds with them.
    LaneBuffer win_gates;
    int64_t gate_stride = 0;
    // With a RoPE: each window row's position (int64), so an evicted pair is un-rotated at its own.
    LaneBuffer win_pos;
    // tova and h2o (retention.hpp): each window row's recorded weight (float, NaN while unscored), and
    // the window's rows oldest first (int64); fifo needs neither (row j % window holds pair j).
    LaneBuffer win_score, win_order;
    std::vector<int64_t> length;    // tokens seen per row
    std::vector<int64_t> last_pos;  // each row's latest position (0 before its first token)
    // A decode step whose rule folds into its output (SlotRule::folds_into_output) leaves the slot
    // rows behind; settle() writes them. Every call that reads or writes the rows settles first
    // (SettledLock); those that read only counts and sizes do not, so reading them between steps
    // (a model's layer asks visible_size at each step) costs nothing.
    bool slots_behind = false;
    mutable CacheMutex mu;  // one call at a time; the GIL is released

    // Checks the configuration and sizes every buffer; allocates nothing.
    Impl(const Config& config, const RuleSpec& rule_spec);
    Impl(const Impl& other);  // deep copy of configuration and state
    size_t planned_bytes() const;
    void allocate();
    // Copies lengths and every buffer from a cache of the same configuration.
    void copy_state_from(const Impl& other);
    // Copies `count` rows of `src` (same configuration but for the batch size): row first + r
    // takes src row src_rows[r] (batch_ops.cpp).
    void copy_rows_from(const Impl& src, const int64_t* src_rows, int64_t count, int64_t first = 0);
    // Takes the batch size, lengths and buffers of `other` (same configuration but for the batch
    // size) and gives it ours; the rule object and the mutex stay (batch_ops.cpp).
    void swap_state(Impl& other);

    void settle();  // writes the slot rows a decode step left behind (slots_behind)

    // Every per-lane buffer: the cache's own, then the rule's.
    std::vector<LaneBuffer*> buffers();
    std::vector<const LaneBuffer*> buffers() const;

    // Tokens a row holds at most (far from overflow): the state format refuses longer rows.
    static constexpr int64_t kMaxLength = int64_t(1) << 62;

    // Where a row's tokens sit, from its length.
    int64_t sinks_held(int64_t len) const { return len < cfg.sinks ? len : cfg.sinks; }
    int64_t window_held(int64_t len) const {
        int64_t rest = len - sinks_held(len);
        return rest < cfg.window ? rest : cfg.window;
    }
    int64_t folded(int64_t len) const { return len - sinks_held(len) - window_held(len); }
    int64_t visible_rows(int64_t len) const {
        return sinks_held(len) + (slots ? slots->visible_slots(folded(len)) : 0) + window_held(len);
    }
};

// The cache's lock, with its slot rows settled once it is held: what every call that reads or writes
// the rows takes (a decode step settles in run_lanes, unless it folds into its output).
class SettledLock {
   public:
    explicit SettledLock(MemoryCache::Impl& c) : lock_(c.mu) { c.settle(); }

   private:
    CacheLock lock_;
};

}  // namespace kvfold
