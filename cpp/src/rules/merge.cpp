// Merge(slots, bias): token merging as the memory. Each slot holds float64 sums Sk, Sv and a count n;
// a folded pair becomes a new slot at the end, and when that makes slots + 1, the two slots whose mean
// keys have the highest cosine similarity merge (sums and counts add; the merged slot takes the lower
// index, later slots move down; ties: the first pair (i, j), i < j, in row-major order; a zero key has
// cosine 0 with anything). Slots are read as (Sk / n, Sv / n), with logit bias ln n when
// bias = "log_count". With a RoPE each slot also sums its pairs' positions, Sp, and stands at Sp / n.
//
// The float64 sums live in slots + 1 places that never move: `order` maps a slot's index to its place,
// and its last entry is the free place the next folded pair takes. Derived from the sums, and rebuilt
// from them after a load rather than saved: each place's mean key direction in float32 and its squared
// norm, the float32 cosines of every two places, and each place's largest cosine with another. A fold
// computes only the new slot's and the merged slot's cosines, one SIMD score pass each (O(slots * d)),
// and keeps the largest of each place up to date in O(slots) (a place whose largest was the entry that
// fell is scanned again), so finding the most similar pair reads only the places near the top. The
// pairs whose float32 cosine comes within its rounding error of the largest are compared again in
// float64, so the choice is the float64 one. Only the slots attention reads (storage dtype) move down
// on a merge.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../attention.hpp"
#include "../rule.hpp"

namespace kvfold {
namespace {
class Merge final : public SlotRule {
   public:
    Merge(int64_t slots, bool log_count) : slots_(slots), log_count_(log_count) {}

    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(slots_);
        const size_t n = static_cast<size_t>(slots_ + 1);  // the slots and the pair just folded
        add_buffer(sum_k_, sizeof(double) * n * d.dk);
        add_buffer(sum_v_, sizeof(double) * n * d.dv);
        add_buffer(count_, sizeof(double) * n);
        add_buffer(order_, sizeof(int64_t) * n);  // slot index -> place
        add_buffer(bias_, sizeof(float) * slots_);
        if (keeps_positions()) add_buffer(sum_p_, sizeof(double) * n);
        add_derived_buffer(unit_, sizeof(float) * n * d.dk);  // Sk / |Sk| of each place (0 for a zero key)
        add_derived_buffer(norm2_, sizeof(double) * n);       // |Sk|^2 of each place
        add_derived_buffer(cosine_, sizeof(float) * n * n);   // cosine of the mean keys of places p and q
        add_derived_buffer(largest_, sizeof(float) * n);      // each place's largest cosine with another
        // a float32 dot of unit vectors is within (d + 2) float32 roundings of the exact cosine
        margin_ = 2.0f * static_cast<float>(d.dk + 2) * std::numeric_limits<float>::epsilon();
    }

    // The places' directions and cosines, in the order folds would have written them.
    void rebuild(int64_t lane) override {
        float* largest = largest_.lane<float>(lane);
        for (int64_t p = 0; p <= slots_; ++p) largest[p] = 0;  // the largest of an all-zero matrix
        for (int64_t p = 0; p <= slots_; ++p) update_cosines(lane, p);
    }

    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        const int64_t dk = dims_.dk, dv = dims_.dv;
        int64_t* order = order_.lane<int64_t>(lane);
        const int64_t s = count < slots_ ? count : slots_;  // the new slot's index
        if (count <= slots_) order[s] = s;                  // filling up: slot i in place i
        for (int64_t i = 0; i <= s; ++i)  // a state read from bytes is checked for its sizes, not its meaning:
            if (order[i] < 0 || order[i] > slots_) return reset_order(order);  // never index by a bad place
        const int64_t p = order[s];
        double* sk = sum_k_.lane<double>(lane) + p * dk;
        double* sv = sum_v_.lane<double>(lane) + p * dv;
        for (int64_t i = 0; i < dk; ++i) sk[i] = k[i];
        for (int64_t i = 0; i < dv; ++i) sv[i] = v[i];
        count_.lane<double>(lane)[p] = 1;
        if (keeps_positions()) sum_p_.lane<double>(lane)[p] = static_cast<double>(position);
        update_cosines(lane, p);
        if (s < slots_) {
            write_slot(lane, s);
            return;
        }
        int64_t a, b;
        most_similar(lane, &a, &b);
        const int64_t pa = order[a], pb = order[b];
        add(sum_k_.lane<double>(lane) + pa * dk, sum_k_.lane<double>(lane) + pb * dk, dk);
        add(sum_v_.lane<double>(lane) + pa * dv, sum_v_.lane<double>(lane) + pb * dv, dv);
        count_.lane<double>(lane)[pa] += count_.lane<double>(lane)[pb];
        if (keeps_positions()) sum_p_.lane<double>(lane)[pa] += sum_p_.lane<double>(lane)[pb];
        remove(lane, b);
        update_cosines(lane, pa);
        write_slot(lane, a);
        if (b < slots_) write_slot(lane, slots_ - 1);  // the folded pair moved down into the last slot
    }

    int64_t max_slots() const override { return slots_; }
    bool averages_pairs() const override { return true; }
    int64_t visible_slots(int64_t folded) const override { return folded < slots_ ? folded : slots_; }
    const float* slot_bias(int64_t lane) const override { return log_count_ ? bias_.lane<float>(lane) : nullptr; }

   private:
    // Four running sums: independent chains the CPU overlaps (one sum would wait on every add).
    static double dot(const double* x, const double* y, int64_t d) {
        double s[4] = {0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 4 <= d; i += 4)
            for (int j = 0; j < 4; ++j) s[j] += x[i + j] * y[i + j];
        for (; i < d; ++i) s[0] += x[i] * y[i];
        return (s[0] + s[1]) + (s[2] + s[3]);
    }

    static void add(double* x, const double* y, int64_t d) {
        for (int64_t i = 0; i < d; ++i) x[i] += y[i];
    }

    // Places out of range come only from a damaged or hand-made state; start its places over as the
    // identity (its slots mean nothing then, but nothing is read out of bounds).
    void reset_order(int64_t* order) const {
        for (int64_t i = 0; i <= slots_; ++i) order[i] = i;
    }

    // Place p's key direction and squared norm from its sums, and its cosines with every place (stale
    // places included: a place's entries are rewritten whenever it takes a slot). The largest cosine of
    // every place stays the largest of its row: it grows with a new entry above it, and a row whose
    // largest may have been the entry replaced is scanned again.
    void update_cosines(int64_t lane, int64_t p) {
        const int64_t dk = dims_.dk, n = slots_ + 1;
        const double* sk = sum_k_.lane<double>(lane) + p * dk;
        float* units = unit_.lane<float>(lane);
        float* cos = cosine_.lane<float>(lane);
        float* largest = largest_.lane<float>(lane);
        const double norm2 = dot(sk, sk, dk), inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;
        norm2_.lane<double>(lane)[p] = norm2;
        for (int64_t i = 0; i < dk; ++i) units[p * dk + i] = static_cast<float>(sk[i] * inv);
        thread_local std::vector<float> row;
        thread_local std::vector<int64_t> rescan;
        row.resize(static_cast<size_t>(n));
        rescan.clear();
        kernels().scores_f32(units + p * dk, dk, 1, units, n, dk, 1.0f, row.data(), n);
        float own = -std::numeric_limits<float>::infinity();
        for (int64_t q = 0; q < n; ++q) {
            const float was = cos[q * n + p], c = row[q];
            cos[p * n + q] = cos[q * n + p] = c;
            if (q == p) continue;
            own = std::max(own, c);
            if (c >= largest[q])
                largest[q] = c;
            else if (was == largest[q])
                rescan.push_back(q);
        }
        largest[p] = own;
        for (int64_t q : rescan) largest[q] = largest_of_row(cos + q * n, q, n);
    }

    // The largest of row q's n cosines but its own (q's with itself).
    static float largest_of_row(const float* row, int64_t q, int64_t n) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i)
            if (i != q) m = std::max(m, row[i]);
        return m;
    }

    // The float64 cosine of the mean keys in places p and q (0 when either is zero), with the squared
    // norms kept when the places were last written.
    double exact_cosine(int64_t lane, int64_t p, int64_t q) const {
        const int64_t dk = dims_.dk;
        const double* norm2 = norm2_.lane<double>(lane);
        const double nx = norm2[p], ny = norm2[q];
        if (!(nx > 0 && ny > 0)) return 0.0;
        return dot(sum_k_.lane<double>(lane) + p * dk, sum_k_.lane<double>(lane) + q * dk, dk) /
               (std::sqrt(nx) * std::sqrt(ny));
    }

    // The slots a < b with the most similar mean keys, the first such pair in row-major order. The largest
    // float32 cosine is the largest of the places' largest (a set's largest does not depend on its order);
    // the pairs within rounding of it are compared in float64, ties going to the first slot pair.
    void most_similar(int64_t lane, int64_t* a, int64_t* b) const {
        const int64_t n = slots_ + 1;
        const int64_t* order = order_.lane<int64_t>(lane);
        const float* cos = cosine_.lane<float>(lane);
        const float* largest = largest_.lane<float>(lane);
        thread_local std::vector<int64_t> slot_of;  // place -> slot index
        slot_of.resize(n);
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < n; ++p) best = std::max(best, largest[p]);
        for (int64_t i = 0; i < n; ++i) slot_of[order[i]] = i;
        const float near = best - margin_;
        double exact = -std::numeric_limits<double>::infinity();
        *a = 0, *b = 1;
        for (int64_t p = 0; p + 1 < n; ++p) {
            if (!(largest[p] >= near)) continue;
            for (int64_t q = p + 1; q < n; ++q) {
                if (!(cos[p * n + q] >= near)) continue;
                const double c = exact_cosine(lane, p, q);
                const int64_t i = std::min(slot_of[p], slot_of[q]), j = std::max(slot_of[p], slot_of[q]);
                if (c > exact || (c == exact && (i < *a || (i == *a && j < *b)))) exact = c, *a = i, *b = j;
            }
        }
    }

    // Removes slot b of the slots + 1: later slots move down, and b's place becomes the free one.
    void remove(int64_t lane, int64_t b) {
        int64_t* order = order_.lane<int64_t>(lane);
        const int64_t freed = order[b];
        std::memmove(order + b, order + b + 1, sizeof(int64_t) * (slots_ - b));
        order[slots_] = freed;
        if (b + 1 < slots_) {  // stored slots b+1 .. slots-1 move down; the last is rewritten
            const int64_t moved = slots_ - 1 - b, es = slot_bytes(), dk = dims_.dk, dv = dims_.dv;
            uint8_t* keys = slot_k_.lane(lane);
            uint8_t* values = slot_v_.lane(lane);
            std::memmove(keys + b * dk * es, keys + (b + 1) * dk * es, moved * dk * es);
            std::memmove(values + b * dv * es, values + (b + 1) * dv * es, moved * dv * es);
            float* bias = bias_.lane<float>(lane);
            std::memmove(bias + b, bias + b + 1, sizeof(float) * moved);
            move_positions(lane, b, b + 1, moved);
        }
    }

    // Slot s as attention reads it: the means, rounded once to the storage dtype, and ln n.
    void write_slot(int64_t lane, int64_t s) {
        const int64_t dk = dims_.dk, dv = dims_.dv, p = order_.lane<int64_t>(lane)[s];
        thread_local std::vector<float> row;
        row.resize(static_cast<size_t>(dk + dv));
        const double n = count_.lane<double>(lane)[p], inv = 1.0 / n;
        const double* sk = sum_k_.lane<double>(lane) + p * dk;
        const double* sv = sum_v_.lane<double>(lane) + p * dv;
        for (int64_t i = 0; i < dk; ++i) row[i] = static_cast<float>(sk[i] * inv);
        for (int64_t i = 0; i < dv; ++i) row[dk + i] = static_cast<float>(sv[i] * inv);
        store_row(slot_k_.lane(lane) + s * dk * slot_bytes(), row.data(), dk, slot_dtype());
        store_row(slot_v_.lane(lane) + s * dv * slot_bytes(), row.data() + dk, dv, slot_dtype());
        bias_.lane<float>(lane)[s] = static_cast<float>(std::log(n));
        if (keeps_positions()) set_position(lane, s, row.data(), sum_p_.lane<double>(lane)[p] * inv);
    }

    int64_t slots_;
    bool log_count_;
    float margin_ = 0;
    LaneBuffer sum_k_, sum_v_, count_, order_, bias_, sum_p_;  // the state
    LaneBuffer unit_, norm2_, cosine_, largest_;               // derived from it
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    int64_t slots = int_param(spec, "slots", 1, int64_t(1) << 16);
    bool log_count = option(spec, "bias", {"none", "log_count"}) == "log_count";
    return std::make_unique<Merge>(slots, log_count);
}
}  // namespace

extern const RuleKind merge_rule{"merge", {"slots"}, {"bias"}, make};
}  // namespace kvfold
