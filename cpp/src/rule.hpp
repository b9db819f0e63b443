// A rule owns one thing: the memory that evicted pairs are folded into, per lane.
// The cache owns sinks, window, attention and the row counters.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.hpp"
#include "buffer.hpp"
#include "kernels/kernels.hpp"
#include "kvfold/kvfold.hpp"
#include "rope.hpp"
#include "scratch.hpp"

namespace kvfold {

struct Dims {
    int64_t lanes = 0;  // batch rows x KV heads
    int64_t heads = 0;  // KV heads
    int64_t dk = 0, dv = 0;
    DType dtype = DType::float32;
    int64_t query_heads = 0;
    bool check_finite = true;    // the cache's check_finite: a rule checks what a user's code gives it
    const Rope* rope = nullptr;  // the cache's RoPE, if it has one: the slots keep positions
};

// One token's gates for a matrix rule, null where the token brings none: decay is log-space,
// d_k values (decay_per_key) or one for the head; beta is one value.
struct TokenGate {
    const float* decay = nullptr;
    bool decay_per_key = false;
    const float* beta = nullptr;
};

// Queries of one lane's group read together: q_j at q + j * q_stride (d_k floats), the answer
// at out + j * out_stride (d_v floats); query_head is the first one's index among Hq.
struct LaneQueries {
    const float* q = nullptr;
    int64_t count = 0, q_stride = 0;
    float* out = nullptr;
    int64_t out_stride = 0;
    float scale = 1;
    int64_t query_head = 0;
};

// Pairs folded one after another into a lane's matrix memory, each read right after its fold
// (a block's folds, a chunk at a time): pair i is k[i], v[i] with gates gate[i]; when qs.count > 0,
// pair i's queries are those of qs moved on by i * q_step (and answered i * out_step further on).
struct FoldRun {
    int64_t n = 0;
    const float* const* k = nullptr;
    const float* const* v = nullptr;
    const TokenGate* gate = nullptr;
    LaneQueries qs;
    int64_t q_step = 0, out_step = 0;
    Requests* ahead = nullptr;  // memory the caller reads next, to request while the run computes
};

// One pair for each of several lanes (a decode step's): pair i goes into lane[i], which has had
// count[i] pairs folded into it, and stands at position[i]. The lanes are distinct.
struct LaneFolds {
    int64_t n = 0;
    const int64_t* lane = nullptr;
    const float* const* k = nullptr;
    const float* const* v = nullptr;
    const int64_t* count = nullptr;
    const int64_t* position = nullptr;
};

// A rule: its per-lane memory, one of three kinds, each an interface of its own: key/value slots
// read by softmax attention (SlotRule), slots a user callback folds a whole row into (RowRule),
// or a matrix read linearly (MatrixRule). The cache branches on the kind, fixed at construction.
class Rule {
   public:
    virtual ~Rule() = default;

    // Sizes the per-lane state; checks parameters that depend on the cache's shape.
    virtual void plan(const Dims& dims) { dims_ = dims; }
    // The batch changed (reorder): the cache has swapped in buffers of `lanes` lanes.
    void set_lanes(int64_t lanes) { dims_.lanes = lanes; }

    // All per-lane buffers, for reset, copy and reorder: the state, and what the rule derives from it.
    const std::vector<LaneBuffer*>& buffers() const { return buffers_; }
    // Whether a buffer is derived from the others (kept only to fold faster): the state format leaves
    // it out, and rebuild() recomputes it for each lane after a load.
    bool derived(const LaneBuffer* b) const { return std::find(derived_.begin(), derived_.end(), b) != derived_.end(); }
    virtual void rebuild(int64_t /*lane*/) {}
    // What is wrong with a lane's state read from bytes (its sizes already checked), when no folds
    // could have left it so; empty when nothing is. `folded`: the pairs the lane has folded.
    virtual std::string check_loaded(int64_t /*lane*/, int64_t /*folded*/) const { return {}; }

   protected:
    void add_buffer(LaneBuffer& b, size_t bytes_per_lane, Holds holds = {}) {
        b.plan(dims_.lanes, bytes_per_lane, holds);
        buffers_.push_back(&b);
    }
    void add_derived_buffer(LaneBuffer& b, size_t bytes_per_lane) {
        add_buffer(b, bytes_per_lane);
        derived_.push_back(&b);
    }

    Dims dims_;
    std::vector<LaneBuffer*> buffers_;
    std::vector<const LaneBuffer*> derived_;
};

// Summary rules: key/value slots read by softmax attention beside sinks and window.
class SlotRule : public Rule {
   public:
    // Folds one pair into lane `lane`; `count` pairs were folded into it before. `position` is the
    // pair's; with a RoPE its key comes un-rotated, and the slots keep the positions (see below).
    virtual void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) = 0;
    // Folds a pair into each of several lanes: fold after fold, unless the rule computes the lanes
    // together (GRU: one matrix product for all of them, its weights read once). Either way each
    // lane's result is the one fold() gives it.
    virtual void fold_lanes(const LaneFolds& f) {
        for (int64_t i = 0; i < f.n; ++i) fold(f.lane[i], f.k[i], f.v[i], f.count[i], f.position[i]);
    }
    // Whether the rule can fold a decode step into its output (fold_tokens_into), leaving the slot
    // rows behind its own state: for a step whose one visible row is that slot, the rows would be
    // written only to be copied out. The cache then calls write_slots for every lane before
    // anything else reads the rows.
    virtual bool folds_into_output() const { return false; }
    // A decode step of lanes [lo, hi) with no window and no sinks (a rule that folds_into_output):
    // lane l folds its own token, row l of k and v, after row_count[l / heads] pairs, and writes
    // its value slot to values[l - lo].
    virtual void fold_tokens_into(int64_t /*lo*/, int64_t /*hi*/, const float* /*k*/, const float* /*v*/,
                                  const int64_t* /*row_count*/, float* const* /*values*/) {}
    // Writes a lane's slot rows from the rule's state, after `folded` pairs.
    virtual void write_slots(int64_t /*lane*/, int64_t /*folded*/) {}

    // Whether every slot is an average of folded pairs, with weights that depend on the order of the
    // pairs alone. Only such rules take a RoPE: a slot then keeps the same average of the pairs'
    // positions (store() and set_position() below), and attention reads its key rotated there.
    virtual bool averages_pairs() const { return false; }
    bool keeps_positions() const { return dims_.rope != nullptr; }

    // The slots ([lanes][max_slots][d]), stored in the cache's dtype, except where they are the
    // rule's state itself (float32).
    virtual int64_t max_slots() const { return 0; }
    // GRU and Custom carry their state in the slots; the averages keep theirs in their own buffers
    // (float64 sums, rings of pairs) and write the slots as a copy to read.
    virtual bool slots_are_state() const { return false; }
    DType slot_dtype() const { return slot_dtype_; }
    // Slots holding something after `folded` folds; they are rows [0, n) of the lane's slots.
    virtual int64_t visible_slots(int64_t folded) const { return folded > 0 ? max_slots() : 0; }
    // Slot holding the oldest summary after `folded` folds (slots form a ring).
    virtual int64_t oldest_slot(int64_t /*folded*/) const { return 0; }
    // The row of a lane's slots that holds slot s (s < visible_slots(folded), in the order memory() and
    // visible() show them); attention reads rows [0, visible_slots) in whatever order they are.
    virtual int64_t slot_row(int64_t /*lane*/, int64_t folded, int64_t s) const {
        return (oldest_slot(folded) + s) % max_slots();
    }
    // A logit bias per slot ([max_slots] floats of a lane), added to the scaled scores; null for none.
    virtual const float* slot_bias(int64_t /*lane*/) const { return nullptr; }

    // Slot s of a lane, as stored (slot_dtype()); keys as folded (un-rotated with a RoPE).
    const void* slot_key(int64_t lane, int64_t s) const { return slot_k_.lane(lane) + s * key_bytes(); }
    // The key attention reads: with a RoPE, the slot's key rotated at its position.
    const void* read_key(int64_t lane, int64_t s) const {
        return keeps_positions() ? read_k_.lane(lane) + s * key_bytes() : slot_key(lane, s);
    }
    const void* slot_value(int64_t lane, int64_t s) const { return slot_v_.lane(lane) + s * value_bytes(); }

   protected:
    // Bytes of a key slot and of a value slot in slot_dtype().
    int64_t key_bytes() const { return static_cast<int64_t>(row_bytes(slot_dtype_, dims_.dk)); }
    int64_t value_bytes() const { return static_cast<int64_t>(row_bytes(slot_dtype_, dims_.dv)); }
    // A lane's slots as float32, for the rules whose state they are.
    float* state_keys(int64_t lane) { return slot_k_.lane<float>(lane); }
    float* state_values(int64_t lane) { return slot_v_.lane<float>(lane); }

    // Slot s of a lane as float32 rows for a fold to update: the slot itself when slots are
    // float32, else a per-thread copy, widened here and rounded back into the slot by store().
    class SlotEdit {
       public:
        SlotEdit(SlotRule& rule, int64_t lane, int64_t s)
            : rule_(rule),
              lane_(lane),
              s_(s),
              key_(rule.slot_k_.lane(lane) + s * rule.key_bytes()),
              value_(rule.slot_v_.lane(lane) + s * rule.value_bytes()),
              k_(static_cast<float*>(key_)),
              v_(static_cast<float*>(value_)) {
            if (rule.slot_dtype_ != DType::float32) widen();
        }
        float* keys() { return k_; }
        float* values() { return v_; }
        // With a RoPE, `position` is the slot's (the average of the folded positions).
        void store(double position = 0) {
            if (rule_.slot_dtype_ != DType::float32) narrow();
            if (rule_.keeps_positions()) rule_.set_position(lane_, s_, k_, position);
        }

       private:
        void widen();
        void narrow();
        SlotRule& rule_;
        int64_t lane_, s_;
        void *key_, *value_;
        float *k_, *v_;
    };

    // Plans the slot buffers and registers them together with the rule's own state.
    void plan_slots(int64_t slots) {
        slot_dtype_ = slots_are_state() ? DType::float32 : dims_.dtype;
        slot_k_.plan(dims_.lanes, key_bytes() * slots, rows_of(slot_dtype_, dims_.dk));
        slot_v_.plan(dims_.lanes, value_bytes() * slots, rows_of(slot_dtype_, dims_.dv));
        buffers_ = {&slot_k_, &slot_v_};
        derived_.clear();
        if (keeps_positions()) {
            add_buffer(read_k_, key_bytes() * slots);  // unchecked on load: a rotated float16 key may round to Inf
            add_buffer(slot_pos_, sizeof(double) * slots, kFloat64);
        }
    }
    // For rules that write the slots from state of their own: the slots (and with a RoPE their read
    // keys and positions) are derived, left out of the state format and written again by rebuild().
    void derive_slots() {
        for (const LaneBuffer* b : {&slot_k_, &slot_v_, &read_k_, &slot_pos_})
            if (std::find(buffers_.begin(), buffers_.end(), b) != buffers_.end()) derived_.push_back(b);
    }
    // With a RoPE: slot s of a lane stands at `position`, and its read key is `key` (float32, as
    // folded) rotated there.
    void set_position(int64_t lane, int64_t s, const float* key, double position);
    // With a RoPE: slots [from, from + n) move to [to, to + n), positions and read keys with them.
    void move_positions(int64_t lane, int64_t to, int64_t from, int64_t n);

    LaneBuffer slot_k_, slot_v_;
    LaneBuffer read_k_, slot_pos_;  // with a RoPE: the rotated keys attention reads, the slots' positions
    DType slot_dtype_ = DType::float32;
};

// Custom rules fold a whole batch row (all heads) through a user callback, one thread; their slots
// are their state. The cache calls fold_row, never fold.
class RowRule : public SlotRule {
   public:
    void fold(int64_t, const float*, const float*, int64_t, int64_t) final {}
    virtual void fold_row(int64_t row, const float* k, const float* v, int64_t count) = 0;
};

// One slot that is a running average in float64 (Cumulative, EMA): per lane, accumulators for the
// key, the value and, with a RoPE, the position take acc = keep * acc + add * pair, and the slot
// reads acc * scale.
class AccumulatorRule : public SlotRule {
   public:
    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(1);
        add_buffer(acc_k_, sizeof(double) * d.dk, kFloat64);
        add_buffer(acc_v_, sizeof(double) * d.dv, kFloat64);
        if (keeps_positions()) add_buffer(acc_p_, sizeof(double), kFloat64);
    }
    int64_t max_slots() const override { return 1; }
    bool averages_pairs() const override { return true; }

    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) final {
        const Weights w = weights(count);
        SlotEdit slot(*this, lane, 0);
        sums(lane, k, v, w, slot.keys(), slot.values());
        double p = 0;
        if (keeps_positions()) {
            double& acc = *acc_p_.lane<double>(lane);
            acc = w.keep * acc + w.add * static_cast<double>(position);
            p = acc * w.scale;
        }
        slot.store(p);
    }
    // A decode step's lanes: float32 slots without positions are written by the sums directly.
    void fold_lanes(const LaneFolds& f) final {
        if (!folds_into_output()) return SlotRule::fold_lanes(f);
        for (int64_t i = 0; i < f.n; ++i)
            sums(f.lane[i], f.k[i], f.v[i], weights(f.count[i]), slot_k_.lane<float>(f.lane[i]),
                 slot_v_.lane<float>(f.lane[i]));
    }
    bool folds_into_output() const final { return slot_dtype() == DType::float32 && !keeps_positions(); }
    // The values go to the output and the keys nowhere (write_slots writes them when read).
    void fold_tokens_into(int64_t lo, int64_t hi, const float* k, const float* v, const int64_t* row_count,
                          float* const* values) final {
        // The lanes of a row have folded as many pairs: the row's weights, taken once for all its lanes.
        for (int64_t lane = lo; lane < hi;) {
            const int64_t row = lane / dims_.heads, end = std::min(hi, (row + 1) * dims_.heads);
            const Weights w = weights(row_count[row]);
            for (; lane < end; ++lane)
                sums(lane, k + lane * dims_.dk, v + lane * dims_.dv, w, nullptr, values[lane - lo]);
        }
    }
    // The rows the last fold would have written (folded - 1 pairs before it).
    void write_slots(int64_t lane, int64_t folded) final {
        if (folded <= 0) return;
        const double scale = weights(folded - 1).scale;
        const Kernels& K = kernels();
        K.mul_f64(slot_k_.lane<float>(lane), acc_k_.lane<double>(lane), scale, dims_.dk);
        K.mul_f64(slot_v_.lane<float>(lane), acc_v_.lane<double>(lane), scale, dims_.dv);
    }

   protected:
    // acc = keep * acc + add * pair, read as acc * scale.
    struct Weights {
        double keep, add, scale;
    };
    // The weights of the fold into a lane that has had `count` pairs.
    virtual Weights weights(int64_t count) const = 0;

   private:
    void sums(int64_t lane, const float* k, const float* v, const Weights& w, float* key, float* value) {
        const Kernels& K = kernels();
        K.axpby_f64(acc_k_.lane<double>(lane), w.keep, k, w.add, key, w.scale, dims_.dk);
        K.axpby_f64(acc_v_.lane<double>(lane), w.keep, v, w.add, value, w.scale, dims_.dv);
    }

    LaneBuffer acc_k_, acc_v_, acc_p_;
};

// Matrix memories (the linear-attention family) hold S (d_k x d_v) per lane, read linearly; the
// cache calls fold_read and read instead of fold, and keeps the gates of windowed tokens.
class MatrixRule : public Rule {
   public:
    virtual bool normalized() const { return false; }   // keeps z beside S (normalize=True)
    virtual bool uses_decay() const { return false; }   // gated: a decay, constant or per token
    virtual bool uses_beta() const { return false; }    // delta: a beta, constant or per token
    virtual bool takes_decay() const { return false; }  // per-token decay needed
    virtual bool takes_beta() const { return false; }   // per-token beta needed
    // Folds one pair with its gates and answers the queries (none when qs.count == 0) from the
    // updated memory, in one sweep over S.
    virtual void fold_read(int64_t lane, const float* k, const float* v, const TokenGate& gate,
                           const LaneQueries& qs) = 0;
    virtual void read(int64_t lane, const LaneQueries& qs) const = 0;
    // fold_read pair after pair; a rule may compute the same another way (chunked.hpp).
    virtual void fold_read_run(int64_t lane, const FoldRun& run) {
        if (run.ahead) run.ahead->rest();
        for (int64_t i = 0; i < run.n; ++i) {
            LaneQueries qs = run.qs;
            if (qs.count) qs.q += i * run.q_step, qs.out += i * run.out_step;
            fold_read(lane, run.k[i], run.v[i], run.gate[i], qs);
        }
    }
    // Infini-attention mix: the memory read's weight sigmoid(m) for query head hq.
    virtual float memory_weight(int64_t /*hq*/) const { return 1; }
    // S (d_k x d_v, row-major) and, for normalized rules, z (d_k) of a lane (null otherwise).
    virtual float* matrix_state(int64_t lane) = 0;
    virtual float* normalizer(int64_t /*lane*/) { return nullptr; }
};

// The gates of the matrix rules have ranges: exp(decay) <= 1 shrinks S, and beta in [0, 2] keeps the
// delta update from growing it (1 - beta is its factor along a unit key). Why, for error messages:
constexpr const char* kDecayRange = "decay is log-space; exp(decay) <= 1 keeps S from growing";
constexpr const char* kBetaRange = "beta in [0, 2] keeps the delta update from growing S";

// A kind of rule, declared in the rule's own file: its name in specs and saved state, the numeric
// parameters and string options its spec may carry (the registry refuses any other), and how to
// build it (make checks the values).
// Kinds are statics that a thread still running at exit may read; they hold no destructor to run.
struct NameList {
    static constexpr int kMax = 8;
    const char* names[kMax] = {};
    int size = 0;
    constexpr NameList(std::initializer_list<const char*> list) {
        for (const char* n : list) names[size++] = n;
    }
    const char* const* begin() const { return names; }
    const char* const* end() const { return names + size; }
};

struct RuleKind {
    const char* name;
    NameList params, options;
    std::unique_ptr<Rule> (*make)(const RuleSpec&);
};
static_assert(std::is_trivially_destructible_v<RuleKind>, "a rule kind outlives the threads that read it");

// Builds the rule a spec describes (parameters checked, nothing allocated).
std::unique_ptr<Rule> make_rule(const RuleSpec& spec);

// Parameter access for rule constructors: each throws ValueError naming the parameter.
const Array& param(const RuleSpec& spec, const char* name);
double scalar_param(const RuleSpec& spec, const char* name);
int64_t int_param(const RuleSpec& spec, const char* name, int64_t lo, int64_t hi);
std::string option(const RuleSpec& spec, const char* name, const std::vector<std::string>& allowed);

}  // namespace kvfold
