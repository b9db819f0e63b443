// Merge(slots, bias): token merging as the memory. Each slot holds float64 sums Sk, Sv and a count n;
// a folded pair becomes a new slot at the end, and when that makes slots + 1, the two slots whose mean
// keys have the highest cosine similarity merge (sums and counts add; the merged slot takes the lower
// index, later slots move down; ties: the first pair (i, j), i < j, in row-major order; a zero key has
// cosine 0 with anything). Slots are read as (Sk / n, Sv / n), with logit bias ln n when
// bias = "log_count". With a RoPE each slot also sums its pairs' positions, Sp, and stands at Sp / n.
//
// The float64 sums live in slots + 1 places that never move: `order` maps a slot's index to its place,
// and its last entry is the free place the next folded pair takes. The rows attention reads (means in
// the storage dtype, ln n, with a RoPE the rotated key) never move either: place p < slots is read
// from row p, and place `slots`, when it holds a slot, from the free place's row (row_of). A merge
// so writes the merged slot's row and the folded pair's, and moves at most one row; attention reads
// the rows in this order (softmax does not depend on it), memory() and visible() in slot order. The
// rows are a function of the sums and the order: derived, not saved, written again after a load.
//
// Derived from the sums, and rebuilt from them after a load rather than saved: each place's mean key
// direction in float16 (half the bytes a fold reads) and its squared norm, the float32 cosines of every two places
// (-inf on the diagonal), each place's largest cosine with another, and each place's error factor (its spread, see
// merged_cosines). A fold scores the new slot against every direction, one SIMD pass (O(slots * d)); the merged
// slot's cosines are its parents', weighed by their norms (O(slots)), unless that widens their error bound too far
// (see merged_cosines). The largest of each place is kept up to date in O(slots) (a place whose largest was the entry
// that fell is scanned again), so finding the most similar pair reads only the places near the top. The pairs whose
// cosine comes within the error bound of the largest are compared again in float64, so the choice is the float64 one
// (a pair alone within it needs no second look).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../attention.hpp"
#include "../cache_checks.hpp"
#include "../kernels/kernels.hpp"
#include "../platform.hpp"
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
        add_buffer(sum_k_, sizeof(double) * n * d.dk, kFloat64);
        add_buffer(sum_v_, sizeof(double) * n * d.dv, kFloat64);
        add_buffer(count_, sizeof(double) * n, kFloat64);
        add_buffer(order_, sizeof(int64_t) * n);  // slot index -> place
        if (keeps_positions()) add_buffer(sum_p_, sizeof(double) * n, kFloat64);
        derive_slots();
        add_derived_buffer(bias_, sizeof(float) * slots_);
        add_derived_buffer(unit_, sizeof(uint16_t) * n * d.dk);  // Sk / |Sk| of each place (0 for a zero key)
        add_derived_buffer(norm2_, sizeof(double) * n);          // |Sk|^2 of each place
        add_derived_buffer(cosine_, sizeof(float) * n * n);      // cosine of the mean keys of places p and q
        add_derived_buffer(largest_, sizeof(float) * n);         // each place's largest cosine with another
        add_derived_buffer(spread_, sizeof(float) * n);          // each place's error factor, see merged_cosines
        // The float32 dot of two float16 unit vectors is within e of the exact cosine: each vector is
        // off by at most d16 in length (a float32 then a float16 rounding of each component, and below
        // float16's normal range its spacing, 2^-24), the dot by (d + 2) float32 roundings; two
        // cosines within 2e may be either way round.
        const double d16 =
            std::ldexp(1.0, -11) + std::ldexp(1.0, -23) + std::sqrt(static_cast<double>(d.dk)) * std::ldexp(1.0, -24);
        const double e = 2.0 * d16 * (1.0 + d16) + 1.01 * static_cast<double>(d.dk + 2) * std::ldexp(1.0, -23);
        margin_ = static_cast<float>(2.0 * e);
        // A merged cosine is computed in float32 from its parents' weights and cosines, a few roundings of
        // 2^-24 of its parents' weight: within 2^-21 / e of e times that weight, which widens the factor a
        // little (see merged_cosines).
        round_ = std::ldexp(1.0, -21) / e;
    }

    // The places' directions and cosines, every place scored, and the rows attention reads. (Merges
    // computed some cosines from their parents' instead; both are within the bounds most_similar
    // allows, so the loaded state chooses as the original would.) Place `slots` holds a slot from the first merge on
    // (no count is 0 after a fold); before it, places [0, slots) fill in order and the empty ones have count 0.
    void rebuild(int64_t lane) override {
        const int64_t n = slots_ + 1;
        float* cos = cosine_.lane<float>(lane);
        float* largest = largest_.lane<float>(lane);
        for (int64_t p = 0; p < n * n; ++p) cos[p] = p % (n + 1) ? 0.0f : kSelf;
        for (int64_t p = 0; p < n; ++p) largest[p] = 0;  // the largest of an all-zero matrix
        for (int64_t p = 0; p <= slots_; ++p) score_place(lane, p);
        const int64_t* order = order_.lane<int64_t>(lane);
        const double* count = count_.lane<double>(lane);
        const bool merging = count[slots_] > 0;
        for (int64_t p = 0; p <= slots_; ++p)
            if (merging ? p != order[slots_] : p < slots_ && count[p] > 0) write_slot(lane, p);
    }

    // The places given out so far are distinct (all of them, the free one too, from the first merge
    // on), and the live slots count whole numbers of pairs, the folded pairs in all.
    std::string check_loaded(int64_t lane, int64_t folded) const override {
        const int64_t* order = order_.lane<int64_t>(lane);
        const double* count = count_.lane<double>(lane);
        std::vector<bool> taken(static_cast<size_t>(slots_ + 1));
        for (int64_t s = 0; s < (folded > slots_ ? slots_ + 1 : folded); ++s) {
            const int64_t p = order[s];
            if (p < 0 || p > slots_ || taken[p])
                return "merge slot " + std::to_string(s) + " is in place " + std::to_string(p) +
                       ", expected a place from 0 to " + std::to_string(slots_) + " that no other slot holds";
            taken[p] = true;
        }
        double pairs = 0;
        for (int64_t s = 0; s < std::min(folded, slots_); ++s) {
            const double n = count[order[s]];
            if (!(n >= 1 && n <= static_cast<double>(folded) && n == std::floor(n)))
                return "merge slot " + std::to_string(s) + " counts " + number_str(n) +
                       " pairs, expected a whole number from 1 to " + std::to_string(folded);
            pairs += n;
        }
        // (float64 counts add exactly up to 2^53 pairs; past that, within their rounding)
        if (std::fabs(pairs - static_cast<double>(folded)) > std::ldexp(static_cast<double>(folded), -40))
            return "the merge slots count " + number_str(pairs) + " pairs, the lane has folded " +
                   std::to_string(folded);
        return {};
    }

    void fold(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) override {
        const Merging m = take(lane, k, v, count, position);
        if (m.a >= 0) merge(m);
    }

    // A step's folds, one lane behind the other: while lane i takes its pair and picks the slots to
    // merge, the sums of lane i - 1's pair are on their way from memory, and lane i + 1's cosines and
    // directions (attention has pushed them all out of cache since the last step).
    void fold_lanes(const LaneFolds& f) override {
        Merging held;
        for (int64_t i = 0; i < f.n; ++i) {
            if (i + 1 < f.n) prefetch_lane(f.lane[i + 1]);
            const Merging m = take(f.lane[i], f.k[i], f.v[i], f.count[i], f.position[i]);
            if (held.a >= 0) merge(held);
            held = m;
        }
        if (held.a >= 0) merge(held);
    }

    int64_t max_slots() const override { return slots_; }
    bool averages_pairs() const override { return true; }
    int64_t visible_slots(int64_t folded) const override { return folded < slots_ ? folded : slots_; }
    int64_t slot_row(int64_t lane, int64_t /*folded*/, int64_t s) const override {
        return row_of(order_.lane<int64_t>(lane), order_.lane<int64_t>(lane)[s]);
    }
    const float* slot_bias(int64_t lane) const override { return log_count_ ? bias_.lane<float>(lane) : nullptr; }

   private:
    // A fold after its pair is in place: slots a < b to merge (a = -1: none), p the pair's place.
    struct Merging {
        int64_t lane = -1, a = -1, b = -1, p = -1;
    };

    // Puts the pair into the free place as the newest slot; when that makes slots + 1, picks the two
    // to merge and asks for their sums.
    Merging take(int64_t lane, const float* k, const float* v, int64_t count, int64_t position) {
        const int64_t dk = dims_.dk, dv = dims_.dv;
        int64_t* order = order_.lane<int64_t>(lane);
        const int64_t s = count < slots_ ? count : slots_;  // the new slot's index
        if (count <= slots_) order[s] = s;                  // filling up: slot i in place i
        const int64_t p = order[s];
        double* sk = sum_k_.lane<double>(lane) + p * dk;
        double* sv = sum_v_.lane<double>(lane) + p * dv;
        kernels().set_f64(sk, k, dk);
        kernels().set_f64(sv, v, dv);
        count_.lane<double>(lane)[p] = 1;
        if (keeps_positions()) sum_p_.lane<double>(lane)[p] = static_cast<double>(position);
        score_place(lane, p);
        if (s < slots_) {
            write_slot(lane, p);
            return {};
        }
        Merging m{lane, 0, 1, p};
        most_similar(lane, &m.a, &m.b);
        for (int64_t place : {order[m.a], order[m.b]}) {
            prefetch_l1(sum_k_.lane<double>(lane) + place * dk, sizeof(double) * dk);
            prefetch_l1(sum_v_.lane<double>(lane) + place * dv, sizeof(double) * dv);
        }
        return m;
    }

    // Slots a and b merge (sums and counts add into a's place), b leaves.
    void merge(const Merging& m) {
        const int64_t dk = dims_.dk, dv = dims_.dv, lane = m.lane, a = m.a, b = m.b, p = m.p;
        int64_t* order = order_.lane<int64_t>(lane);
        const int64_t pa = order[a], pb = order[b];
        const double* norm2 = norm2_.lane<double>(lane);
        const double norm_a = std::sqrt(norm2[pa]), norm_b = std::sqrt(norm2[pb]);  // before they add
        kernels().add_sums_f64(sum_k_.lane<double>(lane) + pa * dk, sum_k_.lane<double>(lane) + pb * dk, dk);
        kernels().add_sums_f64(sum_v_.lane<double>(lane) + pa * dv, sum_v_.lane<double>(lane) + pb * dv, dv);
        count_.lane<double>(lane)[pa] += count_.lane<double>(lane)[pb];
        if (keeps_positions()) sum_p_.lane<double>(lane)[pa] += sum_p_.lane<double>(lane)[pb];
        // Slot b leaves: later slots move down in the order, and b's place becomes the free one.
        std::memmove(order + b, order + b + 1, sizeof(int64_t) * (slots_ - b));
        order[slots_] = pb;
        merged_cosines(lane, pa, pb, norm_a, norm_b);
        // Rows: place `slots` was read from row p when p < slots, and is now read from row pb.
        if (p < slots_ && pb != p && pb != slots_ && pa != slots_) move_row(lane, p, pb);
        write_slot(lane, pa);
        if (pb != p) write_slot(lane, p);  // the folded pair, unless it merged
    }

    // What taking a pair reads of a lane: the directions, cosines and per-place numbers, and the
    // sums of the free place the pair goes to.
    void prefetch_lane(int64_t lane) const {
        const int64_t dk = dims_.dk, dv = dims_.dv, n = slots_ + 1;
        prefetch_l1(unit_.lane(lane), sizeof(uint16_t) * n * dk);
        prefetch_l1(cosine_.lane(lane), sizeof(float) * n * n);
        prefetch_l1(largest_.lane(lane), sizeof(float) * n);
        prefetch_l1(spread_.lane(lane), sizeof(float) * n);
        prefetch_l1(norm2_.lane(lane), sizeof(double) * n);
        prefetch_l1(count_.lane(lane), sizeof(double) * n);
        prefetch_l1(order_.lane(lane), sizeof(int64_t) * n);
        const int64_t free = order_.lane<int64_t>(lane)[slots_];
        if (free >= 0 && free <= slots_) {
            prefetch_l1(sum_k_.lane<double>(lane) + free * dk, sizeof(double) * dk);
            prefetch_l1(sum_v_.lane<double>(lane) + free * dv, sizeof(double) * dv);
        }
    }

    // Eight running sums: independent chains the CPU overlaps (one sum would wait on every add; with
    // four, a decode step of Merge(32) over 2 heads took 3% longer).
    static double dot(const double* x, const double* y, int64_t d) {
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; ++j) s[j] += x[i + j] * y[i + j];
        for (; i < d; ++i) s[0] += x[i] * y[i];
        return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }

    // Place p's key direction from its sums, in float16 and as the other places read it (0 for a zero
    // key), and its squared norm.
    const float* direction(int64_t lane, int64_t p) {
        const int64_t dk = dims_.dk;
        const double* sk = sum_k_.lane<double>(lane) + p * dk;
        uint16_t* unit16 = unit_.lane<uint16_t>(lane) + p * dk;
        const double norm2 = dot(sk, sk, dk), inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;
        norm2_.lane<double>(lane)[p] = norm2;
        thread_local std::vector<float> unit;
        unit.resize(static_cast<size_t>(dk));
        kernels().mul_f64(unit.data(), sk, inv, dk);
        store_row(unit16, unit.data(), dk, DType::float16);
        load_row(unit.data(), unit16, dk, DType::float16);
        return unit.data();
    }

    // Place p's cosines with every place (stale places included: a place's entries are rewritten whenever it
    // takes a slot), scored from the float16 directions: each within e of the float64 cosine.
    void score_place(int64_t lane, int64_t p) { score_place(lane, p, direction(lane, p)); }
    void score_place(int64_t lane, int64_t p, const float* unit) {
        const int64_t dk = dims_.dk, n = slots_ + 1;
        float* row = scratch_row(n);
        kernels().scores_f16(unit, dk, 1, unit_.lane<uint16_t>(lane), n, dk, 1.0f, row, n);
        row[p] = kSelf;
        spread_.lane<float>(lane)[p] = 1;
        set_cosines(lane, p, row);
    }

    // Place pa's cosines after place pb's sums were added to it. The merged key is the sum of its parents',
    // so its cosine with q is (|a| cos(a, q) + |b| cos(b, q)) / |a + b|: no pass over the directions.
    // Every cosine (p, q) is kept within e * spread[p] * spread[q] of the float64 one (spread 1 when
    // scored); a merged cosine's error is its parents' weighed the same way, so its spread is
    // (|a| spread[a] + |b| spread[b]) / |a + b|, a little more for its own rounding. That grows when the
    // parents' keys point apart; past kMaxSpread the place is scored again instead.
    void merged_cosines(int64_t lane, int64_t pa, int64_t pb, double norm_a, double norm_b) {
        const int64_t n = slots_ + 1;
        float* spread = spread_.lane<float>(lane);
        const float* unit = direction(lane, pa);
        const double norm = std::sqrt(norm2_.lane<double>(lane)[pa]);
        const double merged = (norm_a * spread[pa] + norm_b * spread[pb]) / norm * (1.0 + round_);
        if (!(norm_a > 0 && norm_b > 0 && merged <= kMaxSpread)) return score_place(lane, pa, unit);
        const float* cos = cosine_.lane<float>(lane);
        const float* ca = cos + pa * n;
        const float* cb = cos + pb * n;
        const float wa = static_cast<float>(norm_a / norm), wb = static_cast<float>(norm_b / norm);
        float* row = scratch_row(n);
        for (int64_t q = 0; q < n; ++q) row[q] = wa * ca[q] + wb * cb[q];
        row[pa] = row[pb] = kSelf;  // (pb is free now; its entries are written again when it takes a pair)
        spread[pa] = static_cast<float>(merged * (1 + std::ldexp(1.0, -23)));  // rounded up
        set_cosines(lane, pa, row);
    }

    // How far a merged place's cosine error may grow, over e, before the place is scored again: the
    // margin most_similar compares within grows with its square.
    static constexpr double kMaxSpread = 1.5;

    static float* scratch_row(int64_t n) {
        thread_local std::vector<float> row;
        row.resize(static_cast<size_t>(n));
        return row.data();
    }

    // Row and column p of the cosines set to `row` (row[p] = kSelf). The largest cosine of every place
    // stays the largest of its row: it grows with a new entry above it, and a row whose largest may have
    // been the entry replaced is scanned again.
    void set_cosines(int64_t lane, int64_t p, const float* row) {
        const int64_t n = slots_ + 1;
        float* cos = cosine_.lane<float>(lane);
        float* largest = largest_.lane<float>(lane);
        thread_local std::vector<int64_t> rescan;
        rescan.resize(static_cast<size_t>(n));
        int64_t stale = 0;  // rows to scan again
        for (int64_t q = 0; q < n; ++q) {
            const float was = cos[p * n + q], c = row[q], l = largest[q];  // symmetric: row p is column p
            cos[q * n + p] = c;
            // Without branches: which entries grow a row's largest is a coin toss to the CPU.
            largest[q] = c >= l ? c : l;
            rescan[stale] = q;
            stale += !(c >= l) & (was == l);
        }
        std::memcpy(cos + p * n, row, sizeof(float) * n);
        const Kernels& K = kernels();
        largest[p] = K.max(row, n);
        for (int64_t i = 0; i < stale; ++i) largest[rescan[i]] = K.max(cos + rescan[i] * n, n);
    }

    // A place's cosine with itself, kept so that the largest of a row is the largest of all its entries.
    static constexpr float kSelf = -std::numeric_limits<float>::infinity();

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
        const Kernels& K = kernels();
        const float best = K.max(largest, n), widest = std::max(1.0f, K.max(spread_.lane<float>(lane), n));
        // Each cosine is within margin / 2 * spread^2 of the float64 one (merged_cosines).
        const float near = best - margin_ * widest * widest;
        // The pairs within rounding of the largest; one alone is the largest in float64 as well. Gathered
        // without branches (which entries come near the top is a coin toss to the CPU): each index is
        // written, and the count moves on past it when it is near.
        thread_local std::vector<int64_t> rows, found;
        rows.resize(static_cast<size_t>(n));
        int64_t near_rows = 0, count = 0;
        for (int64_t p = 0; p + 1 < n; ++p) {
            rows[near_rows] = p;
            near_rows += largest[p] >= near;
        }
        for (int64_t r = 0; r < near_rows; ++r) {
            if (found.size() < static_cast<size_t>(count + n)) found.resize(static_cast<size_t>(count + n));
            for (int64_t p = rows[r], q = p + 1; q < n; ++q) {
                found[count] = p * n + q;
                count += cos[p * n + q] >= near;
            }
        }
        const int64_t* pairs = found.data();
        const auto slot_of = [&](int64_t place) { return std::find(order, order + n, place) - order; };
        const auto slots_of = [&](int64_t pair, int64_t* i, int64_t* j) {
            const int64_t x = slot_of(pair / n), y = slot_of(pair % n);
            *i = std::min(x, y), *j = std::max(x, y);
        };
        *a = 0, *b = 1;
        if (count == 1) return slots_of(pairs[0], a, b);
        const int64_t dk = dims_.dk;
        for (int64_t x = 0; x < count; ++x) {
            prefetch_l1(sum_k_.lane<double>(lane) + pairs[x] / n * dk, sizeof(double) * dk);
            prefetch_l1(sum_k_.lane<double>(lane) + pairs[x] % n * dk, sizeof(double) * dk);
        }
        double exact = -std::numeric_limits<double>::infinity();
        for (int64_t x = 0; x < count; ++x) {
            const int64_t pair = pairs[x];
            const double c = exact_cosine(lane, pair / n, pair % n);
            int64_t i, j;
            slots_of(pair, &i, &j);
            if (c > exact || (c == exact && (i < *a || (i == *a && j < *b)))) exact = c, *a = i, *b = j;
        }
    }

    // The row attention reads place p from: its own, or for place `slots` the free place's (kept in
    // range whatever the order holds; a loaded state's order is checked, see check_loaded).
    int64_t row_of(const int64_t* order, int64_t p) const {
        const int64_t r = p < slots_ ? p : order[slots_];
        return r >= 0 && r < slots_ ? r : 0;
    }

    // Row `from` as attention reads it copied to row `to`.
    void move_row(int64_t lane, int64_t from, int64_t to) {
        const int64_t kb = key_bytes(), vb = value_bytes();
        std::memcpy(slot_k_.lane(lane) + to * kb, slot_k_.lane(lane) + from * kb, kb);
        std::memcpy(slot_v_.lane(lane) + to * vb, slot_v_.lane(lane) + from * vb, vb);
        float* bias = bias_.lane<float>(lane);
        bias[to] = bias[from];
        move_positions(lane, to, from, 1);
    }

    // Place p's row as attention reads it: the means, rounded once to the storage dtype, and ln n.
    void write_slot(int64_t lane, int64_t p) {
        const int64_t dk = dims_.dk, dv = dims_.dv, s = row_of(order_.lane<int64_t>(lane), p);
        const double n = count_.lane<double>(lane)[p], inv = 1.0 / n;
        const double* sk = sum_k_.lane<double>(lane) + p * dk;
        const double* sv = sum_v_.lane<double>(lane) + p * dv;
        uint8_t* key = slot_k_.lane(lane) + s * key_bytes();
        uint8_t* value = slot_v_.lane(lane) + s * value_bytes();
        const Kernels& K = kernels();
        const float* mean_k;
        if (slot_dtype() == DType::float32) {  // straight into the rows
            K.mul_f64(reinterpret_cast<float*>(key), sk, inv, dk);
            K.mul_f64(reinterpret_cast<float*>(value), sv, inv, dv);
            mean_k = reinterpret_cast<const float*>(key);
        } else {
            thread_local std::vector<float> row;
            row.resize(static_cast<size_t>(dk + dv));
            K.mul_f64(row.data(), sk, inv, dk);
            K.mul_f64(row.data() + dk, sv, inv, dv);
            store_row(key, row.data(), dk, slot_dtype());
            store_row(value, row.data() + dk, dv, slot_dtype());
            mean_k = row.data();
        }
        bias_.lane<float>(lane)[s] = static_cast<float>(std::log(n));
        if (keeps_positions()) set_position(lane, s, mean_k, sum_p_.lane<double>(lane)[p] * inv);
    }

    int64_t slots_;
    bool log_count_;
    float margin_ = 0;
    double round_ = 0;
    LaneBuffer sum_k_, sum_v_, count_, order_, sum_p_;            // the state
    LaneBuffer bias_, unit_, norm2_, cosine_, largest_, spread_;  // derived from it
};

std::unique_ptr<Rule> make(const RuleSpec& spec) {
    int64_t slots = int_param(spec, "slots", 1, int64_t(1) << 16);
    bool log_count = option(spec, "bias", {"none", "log_count"}) == "log_count";
    return std::make_unique<Merge>(slots, log_count);
}
}  // namespace

extern const RuleKind merge_rule{"merge", {"slots"}, {"bias"}, make};
}  // namespace kvfold
