// The slot model's passes over the lanes (slot_model.hpp).
#include "slot_model.hpp"

#include <algorithm>
#include <memory>

#include "parallel.hpp"

namespace kvfold {

double attend_flops(const MemoryCache::Impl& c) {
    double rows = static_cast<double>(c.cfg.sinks + c.cfg.window + c.memory_slots + 1);
    return 2.0 * rows * static_cast<double>(c.cfg.head_dim + c.cfg.value_dim) * static_cast<double>(c.group);
}

void append(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const Positions& pos, bool guard) {
    const Config& g = c.cfg;
    Model m{c};
    if (!c.rows) {
        parallel_for(c.lanes, 4.0 * T * (g.head_dim + g.value_dim), [&](int64_t lo, int64_t hi) {
            for (int64_t lane = lo; lane < hi; ++lane)
                m.append_lane(lane, c.length[lane / g.num_heads], k + lane * T * g.head_dim, v + lane * T * g.value_dim,
                              T, pos);
        });
        for (int64_t& len : c.length) len += T;
        return;
    }
    std::unique_ptr<MemoryCache::Impl> saved(guard ? new MemoryCache::Impl(c) : nullptr);
    try {
        std::vector<float> gather;
        for (int64_t b = 0; b < g.batch_size; ++b) {
            const float* kb = k + b * g.num_heads * T * g.head_dim;
            const float* vb = v + b * g.num_heads * T * g.value_dim;
            for (int64_t t = 0; t < T; ++t) m.append_row_token(b, t, kb, vb, T, gather);
            c.length[b] += T;
        }
    } catch (...) {
        if (saved) c.copy_state_from(*saved);
        throw;
    }
}

void attend_all(MemoryCache::Impl& c, const float* q, float* out) {
    const Config& g = c.cfg;
    Model m{c};
    parallel_for(c.lanes, attend_flops(c), [&](int64_t lo, int64_t hi) {
        LaneBatch batch;
        for (int64_t lane = lo; lane < hi; ++lane) {
            int64_t b = lane / g.num_heads, h = lane % g.num_heads;
            int64_t hq = b * g.num_query_heads + h * c.group;  // first query head of this lane
            batch.add(m, lane, c.length[b], q + hq * g.head_dim, g.head_dim, out + hq * g.value_dim, g.value_dim);
            if (batch.count == kLanes || lane + 1 == hi) batch.run(m);
        }
    });
}

void run_lanes(MemoryCache::Impl& c, const float* q, const float* k, const float* v, int64_t T, float* out,
               const Positions& pos) {
    const Config& g = c.cfg;
    const int64_t dk = g.head_dim, dv = g.value_dim, H = g.num_heads, Hq = g.num_query_heads;
    Model m{c};
    if (T == 1 && g.window == 0 && g.sinks == 0 && c.memory_slots == 1) {
        // Each lane then sees its one slot alone after the fold: its softmax weight is 1, so every
        // query head of the lane reads the slot's value as stored (as attend does for one row).
        // A rule that folds into the output writes it there itself, into the lane's first query head.
        const bool into_output = c.slots->folds_into_output();
        if (!into_output) c.settle();
        parallel_for(c.lanes, attend_flops(c) + 4.0 * (dk + dv), [&](int64_t lo, int64_t hi) {
            thread_local std::vector<float*> heads;  // each lane's first query head in out
            heads.resize(static_cast<size_t>(hi - lo));
            for (int64_t lane = lo; lane < hi; ++lane) {
                const int64_t b = lane / H;
                heads[lane - lo] = out + (b * Hq + (lane - b * H) * c.group) * dv;
            }
            if (into_output)  // the token is the pair to fold: nothing to place (no window, no sinks)
                c.slots->fold_tokens_into(lo, hi, k, v, c.length.data(), heads.data());
            else
                m.step_lanes(lo, hi, k, v, pos);
            for (int64_t lane = lo; lane < hi; ++lane) {
                float* o = heads[lane - lo];
                if (!into_output) load_row(o, c.slots->slot_value(lane, 0), dv, c.slots->slot_dtype());
                for (int64_t j = 1; j < c.group; ++j) std::memcpy(o + j * dv, o, sizeof(float) * dv);
            }
        });
        c.slots_behind = into_output;
        for (int64_t& len : c.length) len += 1;
        return;
    }
    c.settle();
    parallel_for(c.lanes, T * (attend_flops(c) + 4.0 * (dk + dv)), [&](int64_t lo, int64_t hi) {
        float* ek = scratch<MemoryCache>(dk + dv);
        LaneBatch batch;
        // One token: lanes side by side. A block: one lane at a time, so that each streams its own
        // rows (the same offsets in T-token rows of several lanes would fight for cache sets).
        const int64_t width = T == 1 ? kLanes : 1;
        if (T == 1) m.step_lanes(lo, hi, k, v, pos);  // all lanes first: their folds in one call
        for (int64_t first = lo; first < hi; first += width) {
            const int64_t last = std::min(hi, first + width);
            for (int64_t t = 0; t < T; ++t) {
                for (int64_t lane = first; lane < last; ++lane) {
                    int64_t b = lane / H, h = lane % H, hq = b * Hq + h * c.group, len = c.length[b] + t;
                    if (T > 1)
                        m.fold(lane,
                               m.place(lane, len, k + (lane * T + t) * dk, v + (lane * T + t) * dv, pos.at(b, t), ek,
                                       ek + dk),
                               ek);
                    batch.add(m, lane, len + 1, q + (hq * T + t) * dk, T * dk, out + (hq * T + t) * dv, T * dv);
                }
                batch.run(m);
            }
        }
    });
    for (int64_t& len : c.length) len += T;
}

void forward_rows(MemoryCache::Impl& c, const float* q, const float* k, const float* v, int64_t T, float* out) {
    const Config& g = c.cfg;
    const int64_t dk = g.head_dim, dv = g.value_dim, H = g.num_heads, Hq = g.num_query_heads;
    std::vector<float> kt(g.batch_size * H * dk), vt(g.batch_size * H * dv), qt(g.batch_size * Hq * dk),
        ot(g.batch_size * Hq * dv);
    MemoryCache::Impl saved(c);
    try {
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t r = 0; r < g.batch_size * H; ++r) {
                std::memcpy(&kt[r * dk], k + (r * T + t) * dk, sizeof(float) * dk);
                std::memcpy(&vt[r * dv], v + (r * T + t) * dv, sizeof(float) * dv);
            }
            for (int64_t r = 0; r < g.batch_size * Hq; ++r)
                std::memcpy(&qt[r * dk], q + (r * T + t) * dk, sizeof(float) * dk);
            append(c, kt.data(), vt.data(), 1, Positions{}, false);  // Custom takes no RoPE
            attend_all(c, qt.data(), ot.data());
            for (int64_t r = 0; r < g.batch_size * Hq; ++r)
                std::memcpy(out + (r * T + t) * dv, &ot[r * dv], sizeof(float) * dv);
        }
    } catch (...) {
        c.copy_state_from(saved);
        throw;
    }
}

}  // namespace kvfold
