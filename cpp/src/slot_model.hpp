// The slot model, per lane: token t of a row becomes a sink, enters the window, or (pushed out of
// the window) is folded into the rule's memory; queries attend over [sinks | memory slots | window].
// Model::place also serves the matrix model (matrix_model.hpp), which keeps sinks and a window too.
#pragma once

#include <cstring>
#include <vector>

#include "attention.hpp"
#include "cache_impl.hpp"
#include "positions.hpp"
#include "retention.hpp"
#include "scratch.hpp"

namespace kvfold {

struct Model {
    MemoryCache::Impl& c;
    int64_t dk() const { return c.cfg.head_dim; }
    int64_t dv() const { return c.cfg.value_dim; }
    int64_t key_bytes() const { return static_cast<int64_t>(row_bytes(c.cfg.dtype, dk())); }  // a stored row
    int64_t value_bytes() const { return static_cast<int64_t>(row_bytes(c.cfg.dtype, dv())); }

    // The pair a token's placement pushes out of the window (or the token's own, with window = 0).
    struct Evicted {
        int64_t count = -1;  // pairs folded into the lane before it; -1 when nothing is folded
        const float* k = nullptr;
        const float* v = nullptr;
        int64_t position = 0;
    };

    // Puts a lane's token (at position p) into its sink or window row; returns the pair to fold now:
    // the input itself when window = 0, else a float32 copy of the evicted pair in ek/ev.
    Evicted place(int64_t lane, int64_t len, const float* kt, const float* vt, int64_t p, float* ek, float* ev) {
        const Config& cfg = c.cfg;
        if (len < cfg.sinks) {
            store_row(c.sink_k.lane(lane) + len * key_bytes(), kt, dk(), cfg.dtype);
            store_row(c.sink_v.lane(lane) + len * value_bytes(), vt, dv(), cfg.dtype);
            return {};
        }
        int64_t j = len - cfg.sinks;  // index among non-sink tokens
        if (cfg.window == 0) return {j, kt, vt, p};
        const int64_t kb = key_bytes(), vb = value_bytes();
        const WindowPlace at = enter_window(c, lane, j);
        uint8_t* wk = c.win_k.lane(lane) + at.row * kb;
        uint8_t* wv = c.win_v.lane(lane) + at.row * vb;
        int64_t* wp = c.rope.on() ? c.win_pos.lane<int64_t>(lane) + at.row : nullptr;
        Evicted out;
        if (at.evicts) {
            load_row(ek, wk, dk(), cfg.dtype);
            load_row(ev, wv, dv(), cfg.dtype);
            out = {j - cfg.window, ek, ev, wp ? *wp : 0};
        }
        store_row(wk, kt, dk(), cfg.dtype);
        store_row(wv, vt, dv(), cfg.dtype);
        if (wp) *wp = p;
        return out;
    }

    // Folds an evicted pair into the rule; with a RoPE its key is first turned back from its
    // position, in ek (dk floats of scratch, possibly e.k itself).
    void fold(int64_t lane, const Evicted& e, float* ek) {
        if (e.count >= 0) c.slots->fold(lane, key_to_fold(e, ek), e.v, e.count, e.position);
    }
    const float* key_to_fold(const Evicted& e, float* ek) const {
        if (!c.rope.on() || c.memory_slots == 0) return e.k;
        if (e.k != ek) std::memcpy(ek, e.k, sizeof(float) * dk());
        c.rope.rotate_at(ek, -static_cast<double>(e.position));
        return ek;
    }

    // A decode step's token of lanes [lo, hi) (row `lane` of k and v each) placed, and the pairs it
    // pushes out folded in one call (SlotRule::fold_lanes), so a rule may compute the lanes together.
    void step_lanes(int64_t lo, int64_t hi, const float* k, const float* v, const Positions& pos) {
        const int64_t n = hi - lo;
        float* copies = scratch<LaneFolds>(n * (dk() + dv()));
        thread_local std::vector<int64_t> lanes, counts, positions;
        thread_local std::vector<const float*> rows;
        lanes.resize(n), counts.resize(n), positions.resize(n), rows.resize(2 * n);
        int64_t m = 0;
        for (int64_t lane = lo; lane < hi; ++lane) {
            float* ek = copies + (lane - lo) * (dk() + dv());
            const int64_t b = lane / c.cfg.num_heads;
            const Evicted e = place(lane, c.length[b], k + lane * dk(), v + lane * dv(), pos.at(b, 0), ek, ek + dk());
            if (e.count < 0) continue;
            lanes[m] = lane, rows[m] = key_to_fold(e, ek), rows[n + m] = e.v;
            counts[m] = e.count, positions[m] = e.position, ++m;
        }
        c.slots->fold_lanes(LaneFolds{m, lanes.data(), rows.data(), rows.data() + n, counts.data(), positions.data()});
    }

    // One lane takes T tokens (k: T x d_k, v: T x d_v) from a row length of len0.
    void append_lane(int64_t lane, int64_t len0, const float* k, const float* v, int64_t T, const Positions& pos) {
        float* ek = scratch<MemoryCache>(dk() + dv());
        float* ev = ek + dk();
        const int64_t b = lane / c.cfg.num_heads;
        for (int64_t t = 0; t < T; ++t)
            fold(lane, place(lane, len0 + t, k + t * dk(), v + t * dv(), pos.at(b, t), ek, ev), ek);
    }

    // Row-wise rules: token t of row b for all heads; k, v are (H, T, d) for this row.
    void append_row_token(int64_t b, int64_t t, const float* k, const float* v, int64_t T, std::vector<float>& gather) {
        const int64_t H = c.cfg.num_heads;
        gather.resize(H * (dk() + dv()));
        float* ek = gather.data();
        float* ev = ek + H * dk();
        int64_t count = -1;
        for (int64_t h = 0; h < H; ++h) {
            float* hk = ek + h * dk();
            float* hv = ev + h * dv();
            const Evicted e =
                place(b * H + h, c.length[b] + t, k + (h * T + t) * dk(), v + (h * T + t) * dv(), 0, hk, hv);
            count = e.count;
            if (count >= 0 && e.k != hk) {
                std::memcpy(hk, e.k, sizeof(float) * dk());
                std::memcpy(hv, e.v, sizeof(float) * dv());
            }
        }
        if (count >= 0) c.rows->fold_row(b, ek, ev, count);
    }

    // The visible set of a lane whose row has seen len tokens: [sinks | memory slots | window]; with
    // tova or h2o the window's weights are recorded as attention reads it.
    void visible_set(int64_t lane, int64_t len, Segment* segs) const {
        const DType t = c.cfg.dtype;
        const int64_t held = c.window_held(len);
        segs[0] = {c.sink_k.lane(lane), c.sink_v.lane(lane), c.sinks_held(len), t};
        segs[1] = {c.slots->read_key(lane, 0), c.slots->slot_value(lane, 0), c.slots->visible_slots(c.folded(len)),
                   c.slots->slot_dtype(), c.slots->slot_bias(lane)};
        segs[2] = {c.win_k.lane(lane), c.win_v.lane(lane), held, t, nullptr, window_weights(c, lane, held)};
    }
};

// Attention problems of up to kLanes lanes, handed to attend() together so that their short
// dependency chains overlap.
constexpr int kLanes = 4;
struct LaneBatch {
    Segment segs[kLanes][3];
    Attention problems[kLanes];
    int count = 0;
    // All query heads of a lane: q rows at q0 + g * q_stride, outputs at o0 + g * o_stride.
    void add(const Model& m, int64_t lane, int64_t len, const float* q0, int64_t q_stride, float* o0,
             int64_t o_stride) {
        m.visible_set(lane, len, segs[count]);
        problems[count] = Attention{q0, q_stride, m.c.group, segs[count], 3, o0, o_stride, 1.0f / m.c.group};
        ++count;
    }
    void run(const Model& m) {
        attend(problems, count, m.dk(), m.dv(), m.c.scale);
        count = 0;
    }
};

// Multiply-adds of one lane's attention, for parallel_for's grain.
double attend_flops(const MemoryCache::Impl& c);

// Appends T tokens to every row. Row-wise (user) rules may throw: the state is then restored,
// unless the caller guards the state itself.
void append(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const Positions& pos, bool guard = true);
// Every lane's query heads (q: B, Hq, d_k) attend over the lane's visible set (out: B, Hq, d_v).
void attend_all(MemoryCache::Impl& c, const float* q, float* out);
// T tokens per lane, each placed (and folded) then attended while the lane's state is hot:
// q (B, Hq, T, d_k), k (B, H, T, d_k), v (B, H, T, d_v) -> out (B, Hq, T, d_v). Lane-wise rules only.
void run_lanes(MemoryCache::Impl& c, const float* q, const float* k, const float* v, int64_t T, float* out,
               const Positions& pos);
// Row-wise (user) rules: token by token through the guarded row path; the state is restored if the
// user's fold throws.
void forward_rows(MemoryCache::Impl& c, const float* q, const float* k, const float* v, int64_t T, float* out);

}  // namespace kvfold
