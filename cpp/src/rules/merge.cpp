// Merge(slots, bias): token merging as the memory. Each slot holds float64 sums Sk, Sv and a count n;
// a folded pair becomes a new slot at the end, and when that makes slots + 1, the two slots whose
// mean keys have the highest cosine similarity merge (sums and counts add; the merged slot takes the
// lower index, later slots move down; ties: the first pair (i, j), i < j, in row-major order; a zero
// key has cosine 0 with anything). Slots are read as (Sk / n, Sv / n), with logit bias ln n when
// bias = "log_count". The cosines of every pair of slots are kept, so a fold computes only the new
// slot's and the merged slot's: O(slots * d), plus an O(slots^2) scan for the largest.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../attention.hpp"
#include "../rule.hpp"

namespace kvfold {
namespace {
class Merge final : public Rule {
   public:
    Merge(int64_t slots, bool log_count) : slots_(slots), log_count_(log_count) {}

    void plan(const Dims& d) override {
        Rule::plan(d);
        plan_slots(slots_);
        const size_t n = static_cast<size_t>(slots_ + 1);  // the slots and the pair just folded
        add_buffer(sum_k_, sizeof(double) * n * d.dk);
        add_buffer(sum_v_, sizeof(double) * n * d.dv);
        add_buffer(count_, sizeof(double) * n);
        add_buffer(norm_, sizeof(double) * n);        // |Sk| of each slot
        add_buffer(cosine_, sizeof(double) * n * n);  // cosine of the mean keys of slots i and j
        add_buffer(bias_, sizeof(float) * slots_);
    }

    void fold(int64_t lane, const float* k, const float* v, int64_t count) override {
        const int64_t dk = dims_.dk, dv = dims_.dv, n = slots_ + 1;
        double* sk = sum_k_.lane<double>(lane);
        double* sv = sum_v_.lane<double>(lane);
        double* cnt = count_.lane<double>(lane);
        double* norm = norm_.lane<double>(lane);
        double* cos = cosine_.lane<double>(lane);
        const int64_t s = count < slots_ ? count : slots_;  // the new slot's index
        for (int64_t i = 0; i < dk; ++i) sk[s * dk + i] = k[i];
        for (int64_t i = 0; i < dv; ++i) sv[s * dv + i] = v[i];
        cnt[s] = 1;
        norm[s] = std::sqrt(dot(sk + s * dk, sk + s * dk, dk));
        for (int64_t i = 0; i < s; ++i) cos[i * n + s] = cos[s * n + i] = cosine(lane, i, s);
        if (s < slots_) {
            write_slot(lane, s);
            return;
        }
        int64_t a = 0, b = 1;  // the pair to merge: the largest cosine, first in row-major order
        double best = -std::numeric_limits<double>::infinity();
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = i + 1; j < n; ++j)
                if (cos[i * n + j] > best) best = cos[i * n + j], a = i, b = j;
        for (int64_t i = 0; i < dk; ++i) sk[a * dk + i] += sk[b * dk + i];
        for (int64_t i = 0; i < dv; ++i) sv[a * dv + i] += sv[b * dv + i];
        cnt[a] += cnt[b];
        remove(lane, b);
        norm[a] = std::sqrt(dot(sk + a * dk, sk + a * dk, dk));
        for (int64_t i = 0; i < slots_; ++i)
            if (i != a) cos[i * n + a] = cos[a * n + i] = cosine(lane, i, a);
        write_slot(lane, a);
        if (b < slots_) write_slot(lane, slots_ - 1);  // the folded pair moved down into the last slot
    }

    int64_t max_slots() const override { return slots_; }
    int64_t visible_slots(int64_t folded) const override { return folded < slots_ ? folded : slots_; }
    const float* slot_bias(int64_t lane) const override { return log_count_ ? bias_.lane<float>(lane) : nullptr; }

   private:
    static double dot(const double* x, const double* y, int64_t d) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += x[i] * y[i];
        return s;
    }

    double cosine(int64_t lane, int64_t i, int64_t j) {
        const int64_t dk = dims_.dk;
        const double* sk = sum_k_.lane<double>(lane);
        const double* norm = norm_.lane<double>(lane);
        if (norm[i] == 0 || norm[j] == 0) return 0;
        return dot(sk + i * dk, sk + j * dk, dk) / (norm[i] * norm[j]);
    }

    // Removes slot b of the n = slots + 1: later sums, counts, norms, cosines and stored slots move down.
    void remove(int64_t lane, int64_t b) {
        const int64_t dk = dims_.dk, dv = dims_.dv, n = slots_ + 1, later = n - 1 - b;
        double* sk = sum_k_.lane<double>(lane);
        double* sv = sum_v_.lane<double>(lane);
        double* cnt = count_.lane<double>(lane);
        double* norm = norm_.lane<double>(lane);
        double* cos = cosine_.lane<double>(lane);
        std::memmove(sk + b * dk, sk + (b + 1) * dk, sizeof(double) * later * dk);
        std::memmove(sv + b * dv, sv + (b + 1) * dv, sizeof(double) * later * dv);
        std::memmove(cnt + b, cnt + b + 1, sizeof(double) * later);
        std::memmove(norm + b, norm + b + 1, sizeof(double) * later);
        // Row-major, each entry moves to an index at or before its own: in place, front to back.
        for (int64_t r = 0; r < n; ++r)
            for (int64_t c = 0; c < n; ++c)
                if (r != b && c != b) cos[(r - (r > b)) * n + (c - (c > b))] = cos[r * n + c];
        if (b + 1 < slots_) {  // stored slots b+1 .. slots-1 move down; the last is rewritten
            const int64_t moved = slots_ - 1 - b, es = slot_bytes();
            uint8_t* keys = slot_k_.lane(lane);
            uint8_t* values = slot_v_.lane(lane);
            std::memmove(keys + b * dk * es, keys + (b + 1) * dk * es, moved * dk * es);
            std::memmove(values + b * dv * es, values + (b + 1) * dv * es, moved * dv * es);
            float* bias = bias_.lane<float>(lane);
            std::memmove(bias + b, bias + b + 1, sizeof(float) * moved);
        }
    }

    // Slot s as attention reads it: the means, rounded once to the storage dtype, and ln n.
    void write_slot(int64_t lane, int64_t s) {
        const int64_t dk = dims_.dk, dv = dims_.dv;
        thread_local std::vector<float> row;
        row.resize(static_cast<size_t>(dk + dv));
        const double inv = 1.0 / count_.lane<double>(lane)[s];
        const double* sk = sum_k_.lane<double>(lane) + s * dk;
        const double* sv = sum_v_.lane<double>(lane) + s * dv;
        for (int64_t i = 0; i < dk; ++i) row[i] = static_cast<float>(sk[i] * inv);
        for (int64_t i = 0; i < dv; ++i) row[dk + i] = static_cast<float>(sv[i] * inv);
        store_row(slot_k_.lane(lane) + s * dk * slot_bytes(), row.data(), dk, slot_dtype());
        store_row(slot_v_.lane(lane) + s * dv * slot_bytes(), row.data() + dk, dv, slot_dtype());
        bias_.lane<float>(lane)[s] = static_cast<float>(std::log(count_.lane<double>(lane)[s]));
    }

    int64_t slots_;
    bool log_count_;
    LaneBuffer sum_k_, sum_v_, count_, norm_, cosine_, bias_;
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    int64_t slots = int_param(spec, "slots", 1, int64_t(1) << 16);
    bool log_count = option(spec, "bias", {"none", "log_count"}) == "log_count";
    return std::make_unique<Merge>(slots, log_count);
}
}  // namespace

extern const RuleKind merge_rule{"merge", {"slots"}, {"bias"}, make};
}  // namespace kvfold
