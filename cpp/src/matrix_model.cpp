// Matrix memories (matrix_model.hpp).
#include "matrix_model.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "attention.hpp"
#include "chunked.hpp"
#include "parallel.hpp"
#include "platform.hpp"
#include "scratch.hpp"
#include "slot_model.hpp"

namespace kvfold {

namespace {

// ---------------------------------------------------------------------------------------------
// Matrix memories (the linear-attention family)
//
// The rule's S is read linearly. With sinks or a window, softmax attention over [sinks | window]
// is read too, and the two are mixed as in Infini-attention:
//   o = sigmoid(m) o_memory + (1 - sigmoid(m)) o_local.
// Every token may bring gates (decay, beta); the window keeps them beside its pairs, so an evicted
// pair is folded with its own gates. A decode step is one sweep over S (MatrixRule::fold_read).

struct MatrixModel {
    MemoryCache::Impl& c;
    const TokenGates& in;  // the block's per-token gates: decay (B, H, T[, d_k]), beta (B, H, T)
    int64_t T;             // tokens per row in the block
    // When set, block() checks each chunk's k, v and q rows for finite values before folding them,
    // and at the first that is not (here or in another lane: set then) stops.
    std::atomic<bool>* not_finite = nullptr;

    int64_t dk() const { return c.cfg.head_dim; }
    int64_t dv() const { return c.cfg.value_dim; }
    int64_t key_bytes() const { return static_cast<int64_t>(row_bytes(c.cfg.dtype, dk())); }  // a stored row
    int64_t value_bytes() const { return static_cast<int64_t>(row_bytes(c.cfg.dtype, dv())); }

    TokenGate input_gate(int64_t lane, int64_t t) const {
        TokenGate g;
        if (in.decay) {
            g.decay = in.decay + (lane * T + t) * (in.decay_per_key ? dk() : 1);
            g.decay_per_key = in.decay_per_key;
        }
        if (in.beta) g.beta = in.beta + lane * T + t;
        return g;
    }

    // Stores a token's gates with its window slot; returns the gates of the pair to fold now
    // (copied to `evicted`, gate_stride floats), or the token's own when it is folded at once.
    TokenGate place_gates(int64_t lane, int64_t len, const TokenGate& g, float* evicted) {
        const Config& cfg = c.cfg;
        if (c.gate_stride == 0 || cfg.window == 0 || len < cfg.sinks) return g;
        const int64_t j = len - cfg.sinks;
        float* slot = c.win_gates.lane<float>(lane) + (j % cfg.window) * c.gate_stride;
        TokenGate out;
        if (j >= cfg.window) {
            std::memcpy(evicted, slot, sizeof(float) * c.gate_stride);
            if (c.matrix->takes_beta()) out.beta = evicted;
            if (c.matrix->takes_decay()) {  // every stored token has one: check_gates saw to it
                out.decay = evicted + 2;
                out.decay_per_key = evicted[1] > 1;
            }
        }
        slot[0] = g.beta ? *g.beta : 0.0f;
        const int64_t n = g.decay ? (g.decay_per_key ? dk() : 1) : 0;
        slot[1] = static_cast<float>(n);
        if (n) std::memcpy(slot + 2, g.decay, sizeof(float) * n);
        return out;
    }

    // The Infini-attention mix of the memory reads already in qs.out with softmax attention over
    // [sinks | window] of a row that has seen len tokens. local: d_v floats of scratch.
    void mix_local(int64_t lane, int64_t len, const LaneQueries& qs, float* local) const {
        const Config& cfg = c.cfg;
        if (cfg.sinks == 0 && cfg.window == 0) return;
        const Kernels& K = kernels();
        Segment segs[2] = {
            {c.sink_k.lane(lane), c.sink_v.lane(lane), c.sinks_held(len), cfg.dtype},
            {c.win_k.lane(lane), c.win_v.lane(lane), c.window_held(len), cfg.dtype},
        };
        for (int64_t j = 0; j < qs.count; ++j) {
            float* out = qs.out + j * qs.out_stride;
            const Attention local_read{qs.q + j * qs.q_stride, 0, 1, segs, 2, local, 0};
            kvfold::attend(&local_read, 1, dk(), dv(), c.scale);
            const float w = c.matrix->memory_weight(qs.query_head + j);
            K.scale(out, w, dv());
            K.axpy_f32(out, 1.0f - w, local, dv());
        }
    }

    // One token of a lane at row length len: placed, folded (its own pair or the evicted one) and,
    // when qs has queries, answered after the update (the token sees itself).
    void token(int64_t lane, int64_t len, const float* k, const float* v, const TokenGate& gate,
               const LaneQueries& qs) {
        float* ek = scratch<MemoryCache>(2 * dv() + dk() + c.gate_stride);
        float* ev = ek + dk();
        float* eg = ev + dv();
        float* local = eg + c.gate_stride;
        const Model::Evicted e = Model{c}.place(lane, len, k, v, 0, ek, ev);  // matrix rules take no RoPE
        TokenGate fg = place_gates(lane, len, gate, eg);
        if (e.count >= 0)
            c.matrix->fold_read(lane, e.k, e.v, fg, qs);
        else if (qs.count)
            c.matrix->read(lane, qs);
        if (qs.count) mix_local(lane, len + 1, qs, local);
    }

    // T tokens of a lane (k, v: its rows; q, out: the whole block's, or null) in two passes, each
    // the token loop's result: first the memory, its folds a chunk at a time (MatrixRule::fold_read_run)
    // with every query read right after the fold its token makes; then the tokens take their sink
    // and window slots in turn and the queries mix in the softmax attention over them.
    void block(int64_t lane, const float* k, const float* v, const float* q, float* out) {
        const Config& cfg = c.cfg;
        const int64_t len0 = c.length[lane / cfg.num_heads];
        // Tokens before `folding` fold nothing (sinks, or a window not yet full); from there on,
        // token t folds the pair window places before it, non-sink pair j0 + t - window.
        const int64_t folding = std::min(T, std::max<int64_t>(0, cfg.sinks + cfg.window - len0));
        const int64_t j0 = len0 - cfg.sinks;  // non-sink index of token 0
        for (int64_t t = 0; q && t < folding; ++t) c.matrix->read(lane, queries(lane, q, out, t));
        const int64_t C = chunk_size(), kb = key_bytes(), vb = value_bytes();
        const bool stored = cfg.window > 0 && cfg.dtype != DType::float32;  // pairs folded as stored, rounded
        thread_local std::vector<const float*> rows;
        thread_local std::vector<TokenGate> gates;
        rows.resize(2 * C);
        gates.resize(C);
        float* copies = scratch<MemoryCache>(stored ? C * (dk() + dv()) : 0);
        for (int64_t first = folding; first < T; first += C) {
            const int64_t n = std::min(C, T - first);
            for (int64_t i = 0; i < n; ++i) {
                const int64_t pair = j0 + first + i - cfg.window, t = pair - j0;  // t >= 0: a token of this block
                float* ck = copies + i * (dk() + dv());
                float* cv = ck + dk();
                TokenGate& gate = gates[i];
                if (t >= 0) {
                    rows[i] = k + t * dk(), rows[C + i] = v + t * dv();
                    gate = input_gate(lane, t);
                    if (stored) {
                        round_to_storage(ck, rows[i], dk());
                        round_to_storage(cv, rows[C + i], dv());
                        rows[i] = ck, rows[C + i] = cv;
                    }
                } else {
                    const int64_t pos = pair % cfg.window;
                    const uint8_t* wk = c.win_k.lane(lane) + pos * kb;
                    const uint8_t* wv = c.win_v.lane(lane) + pos * vb;
                    if (stored) {
                        load_row(ck, wk, dk(), cfg.dtype);
                        load_row(cv, wv, dv(), cfg.dtype);
                        rows[i] = ck, rows[C + i] = cv;
                    } else {
                        rows[i] = reinterpret_cast<const float*>(wk), rows[C + i] = reinterpret_cast<const float*>(wv);
                    }
                    gate = window_gate(lane, pos);
                }
            }
            if (not_finite && !finite_rows(lane, k, v, q, first, n)) return;
            FoldRun run{n, rows.data(), rows.data() + C, gates.data(), {}, dk(), dv()};
            if (q) run.qs = queries(lane, q, out, first);
            Requests next;
            if (first + C < T) request_rows(next, lane, k, v, q, first + C, std::min(C, T - first - C));
            run.ahead = &next;
            c.matrix->fold_read_run(lane, run);
        }
        if (cfg.sinks == 0 && cfg.window == 0) return;
        float* evicted = scratch<MemoryCache>(2 * dv() + dk() + c.gate_stride);
        for (int64_t t = 0; t < T; ++t) {
            Model{c}.place(lane, len0 + t, k + t * dk(), v + t * dv(), 0, evicted, evicted + dk());
            place_gates(lane, len0 + t, input_gate(lane, t), evicted + dk() + dv());
            if (q) mix_local(lane, len0 + t + 1, queries(lane, q, out, t), evicted + dk() + dv() + c.gate_stride);
        }
    }

    // Whether the rows of tokens [t, t + n) of a lane without sinks or window (k, v and its group's
    // queries) are all finite, and no other lane has found one that is not; else flags it.
    bool finite_rows(int64_t lane, const float* k, const float* v, const float* q, int64_t t, int64_t n) const {
        const Kernels& K = kernels();
        bool finite = !not_finite->load(std::memory_order_relaxed) && K.all_finite(k + t * dk(), n * dk()) &&
                      K.all_finite(v + t * dv(), n * dv());
        const int64_t hq = (lane / c.cfg.num_heads) * c.cfg.num_query_heads + (lane % c.cfg.num_heads) * c.group;
        for (int64_t j = 0; finite && q && j < c.group; ++j)
            finite = K.all_finite(q + ((hq + j) * T + t) * dk(), n * dk());
        if (!finite) not_finite->store(true, std::memory_order_relaxed);
        return finite;
    }

    // The rows of the chunk that folds at tokens [t, t + n), to request while the one before it is
    // computed: a long block's rows come from memory, at a pace the hardware prefetcher does not
    // follow from chunk to chunk.
    void request_rows(Requests& next, int64_t lane, const float* k, const float* v, const float* q, int64_t t,
                      int64_t n) const {
        auto request = [&](const float* p, int64_t floats) {
            if (floats > 0) next.add(p, sizeof(float) * static_cast<size_t>(floats));
        };
        const int64_t pairs = std::max<int64_t>(0, t - c.cfg.window);  // the pairs folded then
        request(k + pairs * dk(), (t + n - c.cfg.window - pairs) * dk());
        request(v + pairs * dv(), (t + n - c.cfg.window - pairs) * dv());
        const int64_t hq = (lane / c.cfg.num_heads) * c.cfg.num_query_heads + (lane % c.cfg.num_heads) * c.group;
        for (int64_t j = 0; q && j < c.group; ++j) request(q + ((hq + j) * T + t) * dk(), n * dk());
    }

    // The gates kept beside window slot pos (none when the rule takes none per token).
    TokenGate window_gate(int64_t lane, int64_t pos) const {
        TokenGate g;
        if (c.gate_stride == 0) return g;
        const float* slot = c.win_gates.lane<float>(lane) + pos * c.gate_stride;
        if (c.matrix->takes_beta()) g.beta = slot;
        if (c.matrix->takes_decay()) g.decay = slot + 2, g.decay_per_key = slot[1] > 1;
        return g;
    }

    // x as the window stores it: rounded to the storage precision.
    void round_to_storage(float* y, const float* x, int64_t n) const {
        thread_local std::vector<uint8_t> stored;
        stored.resize(row_bytes(c.cfg.dtype, n));
        store_row(stored.data(), x, n, c.cfg.dtype);
        load_row(y, stored.data(), n, c.cfg.dtype);
    }

    void attend(int64_t lane, int64_t len, const LaneQueries& qs) const {
        c.matrix->read(lane, qs);
        mix_local(lane, len, qs, scratch<MemoryCache>(dv()));
    }

    // The group of query heads reading lane; query j of token t at q + (hq * T + t) * d_k.
    LaneQueries queries(int64_t lane, const float* q, float* out, int64_t t) const {
        const Config& g = c.cfg;
        const int64_t b = lane / g.num_heads, h = lane % g.num_heads, hq = b * g.num_query_heads + h * c.group;
        return LaneQueries{
            q + (hq * T + t) * dk(), c.group, T * dk(), out + (hq * T + t) * dv(), T * dv(), c.scale, h * c.group};
    }
};

double matrix_flops(const MemoryCache::Impl& c) {
    const Config& g = c.cfg;
    return 2.0 * static_cast<double>(g.head_dim * g.value_dim) * static_cast<double>(3 + c.group) + attend_flops(c);
}

}  // namespace

namespace {

void run(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates, const float* q,
         float* out, std::atomic<bool>* not_finite) {
    const Config& g = c.cfg;
    parallel_for(c.lanes, T * matrix_flops(c), [&](int64_t lo, int64_t hi) {
        MatrixModel m{c, gates, T, not_finite};
        for (int64_t lane = lo; lane < hi; ++lane) {
            if (T > 1) {  // a block: chunked
                m.block(lane, k + lane * T * g.head_dim, v + lane * T * g.value_dim, q, out);
                continue;
            }
            const int64_t len = c.length[lane / g.num_heads];
            for (int64_t t = 0; t < T; ++t) {
                LaneQueries qs = q ? m.queries(lane, q, out, t) : LaneQueries{};
                m.token(lane, len + t, k + (lane * T + t) * g.head_dim, v + (lane * T + t) * g.value_dim,
                        m.input_gate(lane, t), qs);
            }
        }
    });
}

}  // namespace

void matrix_run(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                const float* q, float* out) {
    run(c, k, v, T, gates, q, out, nullptr);
    for (int64_t& len : c.length) len += T;
}

bool matrix_checks_as_it_folds(const MemoryCache::Impl& c, int64_t T) {
    const Config& g = c.cfg;
    if (!c.matrix || !g.check_finite || g.window || g.sinks || g.dtype != DType::float32 || T < 2) return false;
    double state = 0;
    for (const LaneBuffer* b : c.rule->buffers()) state += static_cast<double>(b->bytes());
    const double inputs = 4.0 * static_cast<double>(T) *
                          static_cast<double>(c.lanes * (g.head_dim + g.value_dim) + c.lanes * c.group * g.head_dim);
    return inputs >= 8 * state;  // the copy of the state costs little next to a second pass over the inputs
}

bool matrix_run_checked(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                        const float* q, float* out) {
    thread_local std::vector<uint8_t> saved;  // grows once per calling thread
    size_t bytes = 0;
    for (const LaneBuffer* b : c.rule->buffers()) bytes += b->bytes();
    saved.resize(std::max(saved.size(), bytes));
    uint8_t* at = saved.data();
    for (const LaneBuffer* b : c.rule->buffers()) {
        if (b->bytes()) std::memcpy(at, b->data(), b->bytes());
        at += b->bytes();
    }
    std::atomic<bool> not_finite{false};
    run(c, k, v, T, gates, q, out, &not_finite);
    if (not_finite.load()) {
        at = saved.data();
        for (LaneBuffer* b : c.rule->buffers()) {
            if (b->bytes()) std::memcpy(b->data(), at, b->bytes());
            at += b->bytes();
        }
        return false;
    }
    for (int64_t& len : c.length) len += T;
    return true;
}

void matrix_attend(const MemoryCache::Impl& c, const float* q, float* out) {
    const Config& g = c.cfg;
    const TokenGates none;
    parallel_for(c.lanes, matrix_flops(c), [&](int64_t lo, int64_t hi) {
        MatrixModel m{const_cast<MemoryCache::Impl&>(c), none, 1};
        for (int64_t lane = lo; lane < hi; ++lane)
            m.attend(lane, c.length[lane / g.num_heads], m.queries(lane, q, out, 0));
    });
}

}  // namespace kvfold
