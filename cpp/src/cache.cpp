// The model: per row and KV head, token t becomes a sink, enters the window, or (pushed out of the
// window) is folded into the rule's memory; queries attend over [sinks | memory slots | window].
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>

#include "attention.hpp"
#include "cache_impl.hpp"
#include "chunked.hpp"
#include "parallel.hpp"
#include "platform.hpp"
#include "positions.hpp"
#include "retention.hpp"
#include "scratch.hpp"

namespace kvfold {

const char* version() { return KVFOLD_VERSION; }

DType parse_dtype(const std::string& name) {
    if (name == "float32") return DType::float32;
    if (name == "float16") return DType::float16;
    if (name == "bfloat16") return DType::bfloat16;
    throw ValueError("dtype: expected 'float32', 'float16' or 'bfloat16', got '" + name + "'");
}
const char* dtype_name(DType t) {
    switch (t) {
        case DType::float16: return "float16";
        case DType::bfloat16: return "bfloat16";
        default: return "float32";
    }
}
size_t dtype_size(DType t) { return t == DType::float32 ? 4 : 2; }

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 20;  // heads, head_dim, value_dim
constexpr int64_t kMaxBatch = int64_t(1) << 24;
constexpr int64_t kMaxTokens = int64_t(1) << 32;  // window, sinks

std::string number_str(double x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", x);
    return buf;
}

std::string describe(const Config& c) {
    return "batch_size=" + std::to_string(c.batch_size) + ", num_heads=" + std::to_string(c.num_heads) +
           ", head_dim=" + std::to_string(c.head_dim) + ", window=" + std::to_string(c.window) +
           ", sinks=" + std::to_string(c.sinks);
}

void check_range(const char* name, int64_t value, int64_t lo, int64_t hi) {
    if (value < lo || value > hi)
        throw ValueError(std::string(name) + ": expected an integer in [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "], got " + std::to_string(value));
}

// Whether n values are all finite; a long block is checked in pieces shared by the threads (the
// check streams memory: a value costs about as long as a few multiply-adds on cached data).
bool all_finite(const float* x, int64_t n) {
    constexpr int64_t kPiece = 1 << 16;
    constexpr double kCostPerValue = 8;
    if (n <= kPiece) return kernels().all_finite(x, n);  // a decode step's few values
    std::atomic<bool> finite{true};
    parallel_for((n + kPiece - 1) / kPiece, kCostPerValue * kPiece, [&](int64_t lo, int64_t hi) {
        const int64_t begin = lo * kPiece, end = std::min(n, hi * kPiece);
        if (!kernels().all_finite(x + begin, end - begin)) finite.store(false, std::memory_order_relaxed);
    });
    return finite.load();
}

// Flat index i of an array of `shape`, as "(a, b, ...)".
std::string index_str(int64_t i, const std::vector<int64_t>& shape) {
    std::vector<int64_t> index(shape.size());
    for (size_t a = shape.size(), rest = static_cast<size_t>(i); a-- > 0;) {
        index[a] = static_cast<int64_t>(rest % shape[a]);
        rest /= shape[a];
    }
    return shape_str(index);
}

int64_t count(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

void check_finite(const char* name, const float* x, const std::vector<int64_t>& shape) {
    if (all_finite(x, count(shape))) return;
    int64_t i = 0;
    while (std::isfinite(x[i])) ++i;
    throw ValueError(std::string(name) + ": expected finite values, got " + (std::isnan(x[i]) ? "NaN" : "Inf") +
                     " at index " + index_str(i, shape) + " (check_finite=False skips this check)");
}

// Finite values in [lo, hi]: gates whose meaning has a range.
void check_within(const char* name, const float* x, const std::vector<int64_t>& shape, float lo, float hi,
                  const char* why) {
    const int64_t n = count(shape);
    for (int64_t i = 0; i < n; ++i)
        if (!(x[i] >= lo && x[i] <= hi))
            throw ValueError(std::string(name) + ": expected values in [" + number_str(lo) + ", " + number_str(hi) +
                             "] (" + why + "), got " + number_str(x[i]) + " at index " + index_str(i, shape) +
                             " (check_finite=False skips this check)");
}

// Finite values that the storage dtype holds: float16 rounds |x| >= 65520 to Inf, bfloat16 rounds
// |x| >= 0x7f7f8000 (about 3.3961e38) to Inf.
void check_storable(const char* name, const float* x, const std::vector<int64_t>& shape, DType dtype) {
    if (dtype == DType::float32) return;
    const uint32_t limit = dtype == DType::float16 ? 0x477FF000u : 0x7F7F8000u;  // 65520.0f, bf16 halfway to Inf
    const int64_t n = count(shape);
    constexpr int64_t kPiece = 4096;  // the max of each piece's magnitudes first: a loop that vectorizes
    for (int64_t at = 0; at < n; at += kPiece) {
        const int64_t m = std::min(kPiece, n - at);
        uint32_t largest = 0;
        for (int64_t j = 0; j < m; ++j) {
            uint32_t bits;
            std::memcpy(&bits, x + at + j, sizeof bits);
            largest = std::max(largest, bits & 0x7FFFFFFFu);
        }
        if (largest < limit) continue;
        for (int64_t i = at;; ++i) {
            uint32_t bits;
            std::memcpy(&bits, x + i, sizeof bits);
            if ((bits & 0x7FFFFFFFu) >= limit)
                throw ValueError(std::string(name) + ": expected values that " + dtype_name(dtype) +
                                 " storage holds (|x| < " + (dtype == DType::float16 ? "65520" : "3.3961e38") +
                                 "), got " + number_str(x[i]) + " at index " + index_str(i, shape) +
                                 ", which it would store as Inf (check_finite=False skips this check)");
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Construction

MemoryCache::Impl::Impl(const Config& c, const RuleSpec& s) : cfg(c), spec(s) {
    check_range("batch_size", c.batch_size, 1, kMaxBatch);
    check_range("num_heads", c.num_heads, 1, kMaxDim);
    check_range("head_dim", c.head_dim, 1, kMaxDim);
    check_range("value_dim", c.value_dim, 1, kMaxDim);
    check_range("num_query_heads", c.num_query_heads, 1, kMaxDim);
    if (c.num_query_heads % c.num_heads)
        throw ValueError("num_query_heads: expected a multiple of num_heads=" + std::to_string(c.num_heads) + ", got " +
                         std::to_string(c.num_query_heads));
    check_range("window", c.window, 0, kMaxTokens);
    check_range("sinks", c.sinks, 0, kMaxTokens);
    if (c.scale == 0)
        scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    else if (std::isfinite(c.scale) && c.scale > 0 && std::isfinite(static_cast<float>(c.scale)) &&
             static_cast<float>(c.scale) > 0)
        scale = static_cast<float>(c.scale);
    else
        throw ValueError("scale: expected a number > 0 that float32 holds (1.4e-45 to 3.4e38), got " +
                         number_str(c.scale));
    if (c.dtype != DType::float32 && c.dtype != DType::float16 && c.dtype != DType::bfloat16)
        throw ValueError("dtype: expected float32, float16 or bfloat16, got code " +
                         std::to_string(static_cast<int>(c.dtype)));

    rope = Rope(c.rope, c.head_dim);
    recent = checked_recent(c);
    retain = c.retain;
    rule = make_rule(spec);
    check_memory_options(*this);
    lanes = c.batch_size * c.num_heads;
    group = c.num_query_heads / c.num_heads;
    rule->plan(Dims{lanes, c.num_heads, c.head_dim, c.value_dim, c.dtype, c.num_query_heads, c.check_finite,
                    rope.on() ? &rope : nullptr});
    memory_slots = rule->max_slots();
    matrix = rule->matrix();
    normalized = rule->normalized();
    const size_t es = dtype_size(c.dtype);
    sink_k.plan(lanes, es * c.sinks * c.head_dim);
    sink_v.plan(lanes, es * c.sinks * c.value_dim);
    win_k.plan(lanes, es * c.window * c.head_dim);
    win_v.plan(lanes, es * c.window * c.value_dim);
    if (rule->takes_decay() || rule->takes_beta()) gate_stride = 2 + (rule->takes_decay() ? c.head_dim : 0);
    win_gates.plan(lanes, sizeof(float) * c.window * gate_stride);
    win_pos.plan(lanes, rope.on() ? sizeof(int64_t) * c.window : 0);
    win_score.plan(lanes, retain != Retain::fifo ? sizeof(float) * c.window : 0);
    win_order.plan(lanes, retain != Retain::fifo ? sizeof(int64_t) * c.window : 0);

    const size_t need = planned_bytes();
    const MemoryLimit limit = memory_limit();
    if (need > limit.bytes)
        throw ValueError("cache size: this configuration (" + describe(c) + ") needs " + std::to_string(need) +
                         " bytes, more than the " + std::to_string(limit.bytes) + " allowed by " + limit.what);
}

MemoryCache::Impl::Impl(const Impl& o) : Impl(o.cfg, o.spec) {
    allocate();
    copy_state_from(o);
}

void MemoryCache::Impl::copy_state_from(const Impl& o) {
    auto dst = buffers();
    auto src = o.buffers();
    for (size_t i = 0; i < dst.size(); ++i)
        if (dst[i]->bytes()) std::memcpy(dst[i]->data(), src[i]->data(), dst[i]->bytes());
    length = o.length;
    last_pos = o.last_pos;
}

std::vector<LaneBuffer*> MemoryCache::Impl::buffers() {
    std::vector<LaneBuffer*> all{&sink_k, &sink_v, &win_k, &win_v};
    if (win_gates.lane_bytes()) all.push_back(&win_gates);
    for (LaneBuffer* b : {&win_pos, &win_score, &win_order})
        if (b->lane_bytes()) all.push_back(b);
    for (LaneBuffer* b : rule->buffers()) all.push_back(b);
    return all;
}

std::vector<const LaneBuffer*> MemoryCache::Impl::buffers() const {
    auto all = const_cast<Impl*>(this)->buffers();
    return {all.begin(), all.end()};
}

size_t MemoryCache::Impl::planned_bytes() const {
    size_t total = 2 * sizeof(int64_t) * static_cast<size_t>(cfg.batch_size);  // length, last_pos
    for (const LaneBuffer* b : buffers()) {
        size_t n = b->planned_bytes();
        if (n == SIZE_MAX || total + n < total) return SIZE_MAX;
        total += n;
    }
    return total;
}

void MemoryCache::Impl::allocate() {
    try {
        for (LaneBuffer* b : buffers()) b->allocate();
        length.assign(cfg.batch_size, 0);
        last_pos.assign(cfg.batch_size, 0);
    } catch (const std::bad_alloc&) {
        for (LaneBuffer* b : buffers()) b->release();
        throw ValueError("cache size: could not allocate the " + std::to_string(planned_bytes()) +
                         " bytes this configuration (" + describe(cfg) + ") needs");
    }
}

// ---------------------------------------------------------------------------------------------
// The model, per lane

namespace {

struct Model {
    MemoryCache::Impl& c;
    int64_t dk() const { return c.cfg.head_dim; }
    int64_t dv() const { return c.cfg.value_dim; }

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
        const size_t es = dtype_size(cfg.dtype);
        if (len < cfg.sinks) {
            store_row(c.sink_k.lane(lane) + len * dk() * es, kt, dk(), cfg.dtype);
            store_row(c.sink_v.lane(lane) + len * dv() * es, vt, dv(), cfg.dtype);
            return {};
        }
        int64_t j = len - cfg.sinks;  // index among non-sink tokens
        if (cfg.window == 0) return {j, kt, vt, p};
        const WindowPlace at = enter_window(c, lane, j);
        uint8_t* wk = c.win_k.lane(lane) + at.row * dk() * es;
        uint8_t* wv = c.win_v.lane(lane) + at.row * dv() * es;
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
        if (e.count < 0) return;
        const float* k = e.k;
        if (c.rope.on() && c.memory_slots > 0) {
            if (k != ek) std::memcpy(ek, k, sizeof(float) * dk());
            c.rope.rotate_at(ek, -static_cast<double>(e.position));
            k = ek;
        }
        c.rule->fold(lane, k, e.v, e.count, e.position);
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
        if (count >= 0) c.rule->fold_row(b, ek, ev, count);
    }

    // The visible set of a lane whose row has seen len tokens: [sinks | memory slots | window]; with
    // tova or h2o the window's weights are recorded as attention reads it.
    void visible_set(int64_t lane, int64_t len, Segment* segs) const {
        const DType t = c.cfg.dtype;
        const int64_t held = c.window_held(len);
        segs[0] = {c.sink_k.lane(lane), c.sink_v.lane(lane), c.sinks_held(len), t};
        segs[1] = {c.rule->read_key(lane, 0), c.rule->slot_value(lane, 0), c.rule->visible_slots(c.folded(len)),
                   c.rule->slot_dtype(), c.rule->slot_bias(lane)};
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

double attend_flops(const MemoryCache::Impl& c) {
    double rows = static_cast<double>(c.cfg.sinks + c.cfg.window + c.rule->max_slots() + 1);
    return 2.0 * rows * static_cast<double>(c.cfg.head_dim + c.cfg.value_dim) * static_cast<double>(c.group);
}

// ---------------------------------------------------------------------------------------------
// Matrix memories (the linear-attention family)
//
// The rule's S is read linearly. With sinks or a window, softmax attention over [sinks | window]
// is read too, and the two are mixed as in Infini-attention:
//   o = sigmoid(m) o_memory + (1 - sigmoid(m)) o_local.
// Every token may bring gates (decay, beta); the window keeps them beside its pairs, so an evicted
// pair is folded with its own gates. A decode step is one sweep over S (Rule::fold_read).

struct MatrixModel {
    MemoryCache::Impl& c;
    const TokenGates& in;  // the block's per-token gates: decay (B, H, T[, d_k]), beta (B, H, T)
    int64_t T;             // tokens per row in the block

    int64_t dk() const { return c.cfg.head_dim; }
    int64_t dv() const { return c.cfg.value_dim; }

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
            if (c.rule->takes_beta()) out.beta = evicted;
            if (c.rule->takes_decay()) {  // every stored token has one: check_gates saw to it
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
            const float w = c.rule->memory_weight(qs.query_head + j);
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
            c.rule->fold_read(lane, e.k, e.v, fg, qs);
        else if (qs.count)
            c.rule->read(lane, qs);
        if (qs.count) mix_local(lane, len + 1, qs, local);
    }

    // T tokens of a lane (k, v: its rows; q, out: the whole block's, or null) in two passes, each
    // the token loop's result: first the memory, its folds a chunk at a time (Rule::fold_read_run)
    // with every query read right after the fold its token makes; then the tokens take their sink
    // and window slots in turn and the queries mix in the softmax attention over them.
    void block(int64_t lane, const float* k, const float* v, const float* q, float* out) {
        const Config& cfg = c.cfg;
        const int64_t len0 = c.length[lane / cfg.num_heads];
        // Tokens before `folding` fold nothing (sinks, or a window not yet full); from there on,
        // token t folds the pair window places before it, non-sink pair j0 + t - window.
        const int64_t folding = std::min(T, std::max<int64_t>(0, cfg.sinks + cfg.window - len0));
        const int64_t j0 = len0 - cfg.sinks;  // non-sink index of token 0
        for (int64_t t = 0; q && t < folding; ++t) c.rule->read(lane, queries(lane, q, out, t));
        const int64_t C = chunk_size(), es = static_cast<int64_t>(dtype_size(cfg.dtype));
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
                    const uint8_t* wk = c.win_k.lane(lane) + pos * dk() * es;
                    const uint8_t* wv = c.win_v.lane(lane) + pos * dv() * es;
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
            FoldRun run{n, rows.data(), rows.data() + C, gates.data(), {}, dk(), dv()};
            if (q) run.qs = queries(lane, q, out, first);
            if (first + C < T) request_rows(lane, k, v, q, first + C, std::min(C, T - first - C));
            c.rule->fold_read_run(lane, run);
        }
        if (cfg.sinks == 0 && cfg.window == 0) return;
        float* evicted = scratch<MemoryCache>(2 * dv() + dk() + c.gate_stride);
        for (int64_t t = 0; t < T; ++t) {
            Model{c}.place(lane, len0 + t, k + t * dk(), v + t * dv(), 0, evicted, evicted + dk());
            place_gates(lane, len0 + t, input_gate(lane, t), evicted + dk() + dv());
            if (q) mix_local(lane, len0 + t + 1, queries(lane, q, out, t), evicted + dk() + dv() + c.gate_stride);
        }
    }

    // Asks for the rows of the chunk that folds at tokens [t, t + n) while the one before it is
    // computed: a long block's rows come from memory, at a pace the hardware prefetcher does not
    // follow from chunk to chunk.
    void request_rows(int64_t lane, const float* k, const float* v, const float* q, int64_t t, int64_t n) const {
        auto request = [](const float* p, int64_t floats) {
            for (int64_t i = 0; i < floats; i += 16) prefetch(p + i);
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
        if (c.rule->takes_beta()) g.beta = slot;
        if (c.rule->takes_decay()) g.decay = slot + 2, g.decay_per_key = slot[1] > 1;
        return g;
    }

    // x as the window stores it: rounded to the storage precision.
    void round_to_storage(float* y, const float* x, int64_t n) const {
        thread_local std::vector<uint16_t> half;
        half.resize(n);
        store_row(half.data(), x, n, c.cfg.dtype);
        load_row(y, half.data(), n, c.cfg.dtype);
    }

    void attend(int64_t lane, int64_t len, const LaneQueries& qs) const {
        c.rule->read(lane, qs);
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

// T tokens into every row; with q (B, Hq, T, d_k) and out (B, Hq, T, d_v) each token's queries
// are answered right after it (step and forward), else the memory is only updated.
void matrix_run(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                const float* q, float* out) {
    const Config& g = c.cfg;
    parallel_for(c.lanes, T * matrix_flops(c), [&](int64_t lo, int64_t hi) {
        MatrixModel m{c, gates, T};
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
    for (int64_t& len : c.length) len += T;
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

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

MemoryCache::MemoryCache(const Config& config, const RuleSpec& rule) : impl_(std::make_unique<Impl>(config, rule)) {
    impl().allocate();
}
MemoryCache::MemoryCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MemoryCache::MemoryCache(const MemoryCache& other) {
    CacheLock lock(other.impl().mu);
    impl_ = std::make_unique<Impl>(other.impl());
}
MemoryCache::~MemoryCache() = default;

void* MemoryCache::operator new(size_t size) {
    void* p = ::operator new(size);
    std::memset(p, 0, size);
    return p;
}
void MemoryCache::operator delete(void* p) { ::operator delete(p); }

MemoryCache::Impl& MemoryCache::impl() const {
    if (!impl_)
        throw TypeError("MemoryCache: this object was never initialized; make caches with kvfold.MemoryCache(...)");
    return *impl_;
}

const Config& MemoryCache::config() const { return impl().cfg; }
const RuleSpec& MemoryCache::rule() const { return impl().spec; }
float MemoryCache::scale() const { return impl().scale; }
int64_t MemoryCache::memory_slots() const { return impl().memory_slots; }
bool MemoryCache::matrix_memory() const { return impl().matrix; }
bool MemoryCache::matrix_normalized() const { return impl().normalized; }

namespace {

// Per-token gates are given exactly when the rule needs them (as ONNX LinearAttention does).
void check_gates(const MemoryCache::Impl& c, const TokenGates& gates, int64_t T) {
    const Rule& r = *c.rule;
    const std::string& kind = c.spec.kind;
    const char* names[2] = {"decay", "beta"};
    const bool given[2] = {gates.decay != nullptr, gates.beta != nullptr};
    const bool needed[2] = {r.takes_decay(), r.takes_beta()};
    const bool used[2] = {r.uses_decay(), r.uses_beta()};
    for (int i = 0; i < 2; ++i) {
        const std::string name = names[i];
        if (given[i] && !needed[i]) {
            if (!r.matrix()) throw ValueError(name + ": the " + kind + " rule takes no per-token gates, got " + name);
            if (!used[i])
                throw ValueError(name + ": the " + kind + " rule takes no " + name +
                                 (i == 0 ? " (gated and gated_delta do)" : " (delta and gated_delta do)") +
                                 ", got one");
            throw ValueError(name + ": this " + kind + " rule was built with a constant " + name +
                             ", so it takes no per-token " + name + ", got one");
        }
        if (!given[i] && needed[i])
            throw ValueError(
                name + ": the " + kind + " rule needs a per-token " + name +
                (i == 0 ? " (log-space, shape (B, H) or (B, H, d_k) per token)" : " (shape (B, H) per token)") +
                " or a constant " + name + " given to the rule, got none");
    }
    if (!c.cfg.check_finite) return;
    const Config& g = c.cfg;
    if (gates.decay) {
        std::vector<int64_t> shape{g.batch_size, g.num_heads, T};
        if (gates.decay_per_key) shape.push_back(g.head_dim);
        check_finite("decay", gates.decay, shape);
        check_within("decay", gates.decay, shape, -FLT_MAX, 0, kDecayRange);
    }
    if (gates.beta) {
        check_finite("beta", gates.beta, {g.batch_size, g.num_heads, T});
        check_within("beta", gates.beta, {g.batch_size, g.num_heads, T}, 0, 2, kBetaRange);
    }
}

// Validates a block of tokens before anything changes.
void check_tokens(const MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates) {
    if (T < 1) throw ValueError("k: expected at least one token (T >= 1), got T=" + std::to_string(T));
    check_gates(c, gates, T);
    if (!c.cfg.check_finite) return;
    const Config& g = c.cfg;
    check_finite("k", k, {g.batch_size, g.num_heads, T, g.head_dim});
    check_finite("v", v, {g.batch_size, g.num_heads, T, g.value_dim});
    check_storable("k", k, {g.batch_size, g.num_heads, T, g.head_dim}, g.dtype);
    check_storable("v", v, {g.batch_size, g.num_heads, T, g.value_dim}, g.dtype);
}

void check_queries(const MemoryCache::Impl& c, const float* q, int64_t T) {
    if (!c.cfg.check_finite) return;
    const Config& g = c.cfg;
    if (T == 0)
        check_finite("q", q, {g.batch_size, g.num_query_heads, g.head_dim});
    else
        check_finite("q", q, {g.batch_size, g.num_query_heads, T, g.head_dim});
}

// Appends T tokens to every row. Row-wise (user) rules may throw: the state is then restored,
// unless the caller guards the state itself.
void append(MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const Positions& pos, bool guard = true) {
    const Config& g = c.cfg;
    Model m{c};
    if (!c.rule->folds_rows()) {
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

// T tokens per lane, each placed (and folded) then attended while the lane's state is hot:
// q (B, Hq, T, d_k), k (B, H, T, d_k), v (B, H, T, d_v) -> out (B, Hq, T, d_v). Lane-wise rules only.
void run_lanes(MemoryCache::Impl& c, const float* q, const float* k, const float* v, int64_t T, float* out,
               const Positions& pos) {
    const Config& g = c.cfg;
    const int64_t dk = g.head_dim, dv = g.value_dim, H = g.num_heads, Hq = g.num_query_heads;
    Model m{c};
    parallel_for(c.lanes, T * (attend_flops(c) + 4.0 * (dk + dv)), [&](int64_t lo, int64_t hi) {
        float* ek = scratch<MemoryCache>(dk + dv);
        LaneBatch batch;
        // One token: lanes side by side. A block: one lane at a time, so that each streams its own
        // rows (the same offsets in T-token rows of several lanes would fight for cache sets).
        const int64_t width = T == 1 ? kLanes : 1;
        for (int64_t first = lo; first < hi; first += width) {
            const int64_t last = std::min(hi, first + width);
            for (int64_t t = 0; t < T; ++t) {
                for (int64_t lane = first; lane < last; ++lane) {
                    int64_t b = lane / H, h = lane % H, hq = b * Hq + h * c.group, len = c.length[b] + t;
                    m.fold(
                        lane,
                        m.place(lane, len, k + (lane * T + t) * dk, v + (lane * T + t) * dv, pos.at(b, t), ek, ek + dk),
                        ek);
                    batch.add(m, lane, len + 1, q + (hq * T + t) * dk, T * dk, out + (hq * T + t) * dv, T * dv);
                }
                batch.run(m);
            }
        }
    });
    for (int64_t& len : c.length) len += T;
}

// Row-wise (user) rules: token by token through the guarded row path; the state is restored if the
// user's fold throws.
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

}  // namespace

void MemoryCache::update(const float* k, const float* v, int64_t T, const TokenGates& gates, const int64_t* positions) {
    CacheLock lock(impl().mu);
    Impl& c = impl();
    const Positions pos{positions, T, c.length.data()};
    check_tokens(c, k, v, T, gates);
    check_positions(c, pos);
    if (c.rule->matrix())
        matrix_run(c, k, v, T, gates, nullptr, nullptr);
    else
        append(c, k, v, T, pos);
    record_positions(c, positions, T);
}

void MemoryCache::attend(const float* q, float* out) {
    CacheLock lock(impl().mu);
    check_queries(impl(), q, 0);
    if (impl().rule->matrix()) return matrix_attend(impl(), q, out);
    attend_all(impl(), q, out);
}

void MemoryCache::step(const float* q, const float* k, const float* v, float* out, const TokenGates& gates,
                       const int64_t* positions) {
    CacheLock lock(impl().mu);
    Impl& c = impl();
    const Positions pos{positions, 1, c.length.data()};
    check_tokens(c, k, v, 1, gates);
    check_queries(c, q, 0);
    check_positions(c, pos);
    if (c.rule->matrix()) {
        matrix_run(c, k, v, 1, gates, q, out);
    } else if (c.rule->folds_rows()) {
        append(c, k, v, 1, pos);
        attend_all(c, q, out);
    } else {
        run_lanes(c, q, k, v, 1, out, pos);
    }
    record_positions(c, positions, 1);
}

void MemoryCache::forward(const float* q, const float* k, const float* v, int64_t T, float* out,
                          const TokenGates& gates, const int64_t* positions) {
    CacheLock lock(impl().mu);
    Impl& c = impl();
    const Positions pos{positions, T, c.length.data()};
    check_tokens(c, k, v, T, gates);
    check_queries(c, q, T);
    check_positions(c, pos);
    if (c.rule->matrix())
        matrix_run(c, k, v, T, gates, q, out);
    else if (c.rule->folds_rows())
        forward_rows(c, q, k, v, T, out);
    else
        run_lanes(c, q, k, v, T, out, pos);
    record_positions(c, positions, T);
}

void MemoryCache::memory(float* keys, float* values) const {
    CacheLock lock(impl().mu);
    const Impl& c = impl();
    if (c.rule->matrix()) {
        const int64_t dk = c.cfg.head_dim, dv = c.cfg.value_dim;
        for (int64_t lane = 0; lane < c.lanes; ++lane) {
            std::memcpy(keys + lane * dk * dv, c.rule->matrix_state(lane), sizeof(float) * dk * dv);
            if (values && c.rule->normalizer(lane))
                std::memcpy(values + lane * dk, c.rule->normalizer(lane), sizeof(float) * dk);
        }
        return;
    }
    const int64_t S = c.rule->max_slots(), dk = c.cfg.head_dim, dv = c.cfg.value_dim;
    for (int64_t lane = 0; lane < c.lanes; ++lane) {
        int64_t f = c.folded(c.length[lane / c.cfg.num_heads]);
        int64_t shown = c.rule->visible_slots(f), oldest = c.rule->oldest_slot(f);
        float* ko = keys + lane * S * dk;
        float* vo = values + lane * S * dv;
        std::memset(ko, 0, sizeof(float) * S * dk);
        std::memset(vo, 0, sizeof(float) * S * dv);
        for (int64_t s = 0; s < shown; ++s) {
            int64_t src = (oldest + s) % S;
            load_row(ko + s * dk, c.rule->slot_key(lane, src), dk, c.rule->slot_dtype());
            load_row(vo + s * dv, c.rule->slot_value(lane, src), dv, c.rule->slot_dtype());
        }
    }
}

void MemoryCache::load_memory(const float* keys, const float* values) {
    CacheLock lock(impl().mu);
    Impl& c = impl();
    const Config& g = c.cfg;
    const std::string& kind = c.spec.kind;
    if (!c.rule->matrix())
        throw ValueError("load_memory: the " + kind +
                         " rule's memory cannot be set; only matrix rules "
                         "(linear, gated, delta, gated_delta) take a state S");
    const bool normalized = c.normalized;
    if (normalized && !values)
        throw ValueError("z: the normalized linear rule keeps z beside S; expected z of shape (B, H, d_k), got none");
    if (!normalized && values)
        throw ValueError("z: the " + kind + " rule keeps no z (only normalize=True does), got one");
    const int64_t dk = g.head_dim, dv = g.value_dim;
    if (g.check_finite) {
        check_finite("S", keys, {g.batch_size, g.num_heads, dk, dv});
        if (values) check_finite("z", values, {g.batch_size, g.num_heads, dk});
    }
    for (int64_t lane = 0; lane < c.lanes; ++lane) {
        std::memcpy(c.rule->matrix_state(lane), keys + lane * dk * dv, sizeof(float) * dk * dv);
        if (values) std::memcpy(c.rule->normalizer(lane), values + lane * dk, sizeof(float) * dk);
    }
}

int64_t MemoryCache::visible_size() const {
    CacheLock lock(impl().mu);
    int64_t n = 0;
    for (int64_t len : impl().length) n = std::max(n, impl().visible_rows(len));
    return n;
}

int64_t MemoryCache::visible(float* keys, float* values, uint8_t* mask, int64_t rows) const {
    CacheLock lock(impl().mu);
    const Impl& c = impl();
    const Config& g = c.cfg;
    const int64_t dk = g.head_dim, dv = g.value_dim, H = g.num_heads;
    const size_t es = dtype_size(g.dtype);
    int64_t n = 0;
    for (int64_t len : c.length) n = std::max(n, c.visible_rows(len));
    if (n > rows) return n;
    for (int64_t b = 0; b < g.batch_size; ++b) {
        int64_t len = c.length[b], shown = c.visible_rows(len);
        for (int64_t i = 0; i < rows; ++i) mask[b * rows + i] = i < shown;
    }
    for (int64_t lane = 0; lane < c.lanes; ++lane) {
        int64_t len = c.length[lane / H], row = 0;
        float* ko = keys + lane * rows * dk;
        float* vo = values + lane * rows * dv;
        auto put = [&](const uint8_t* k, const uint8_t* v, DType t) {
            load_row(ko + row * dk, k, dk, t);
            load_row(vo + row * dv, v, dv, t);
            ++row;
        };
        for (int64_t s = 0; s < c.sinks_held(len); ++s)
            put(c.sink_k.lane(lane) + s * dk * es, c.sink_v.lane(lane) + s * dv * es, g.dtype);
        int64_t f = c.folded(len), S = c.rule->max_slots();
        for (int64_t s = 0; s < c.rule->visible_slots(f); ++s) {
            int64_t src = (c.rule->oldest_slot(f) + s) % S;
            put(static_cast<const uint8_t*>(c.rule->read_key(lane, src)),
                static_cast<const uint8_t*>(c.rule->slot_value(lane, src)), c.rule->slot_dtype());
        }
        int64_t held = c.window_held(len), first = len - c.sinks_held(len) - held;
        for (int64_t i = 0; i < held; ++i) {
            int64_t pos = window_row(c, lane, first, i);
            put(c.win_k.lane(lane) + pos * dk * es, c.win_v.lane(lane) + pos * dv * es, g.dtype);
        }
        std::memset(ko + row * dk, 0, sizeof(float) * (rows - row) * dk);  // the padding
        std::memset(vo + row * dv, 0, sizeof(float) * (rows - row) * dv);
    }
    return n;
}

void MemoryCache::reset() {
    CacheLock lock(impl().mu);
    for (LaneBuffer* b : impl().buffers())
        if (b->bytes()) std::memset(b->data(), 0, b->bytes());
    for (int64_t& len : impl().length) len = 0;
    for (int64_t& p : impl().last_pos) p = 0;
}

void MemoryCache::reset_rows(const int64_t* rows, int64_t count) {
    CacheLock lock(impl().mu);
    Impl& c = impl();
    const int64_t B = c.cfg.batch_size, H = c.cfg.num_heads;
    for (int64_t i = 0; i < count; ++i)
        if (rows[i] < 0 || rows[i] >= B)
            throw ValueError("rows: expected row indices in [0, " + std::to_string(B) + "), got " +
                             std::to_string(rows[i]) + " at position " + std::to_string(i));
    for (int64_t i = 0; i < count; ++i) {
        for (LaneBuffer* buf : c.buffers())
            for (int64_t h = 0; h < H; ++h) buf->zero_lane(rows[i] * H + h);
        c.length[rows[i]] = 0;
        c.last_pos[rows[i]] = 0;
    }
}

std::vector<int64_t> MemoryCache::lengths() const {
    CacheLock lock(impl().mu);
    return impl().length;
}

std::vector<int64_t> MemoryCache::last_positions() const {
    CacheLock lock(impl().mu);
    return impl().last_pos;
}

size_t MemoryCache::nbytes() const {
    CacheLock lock(impl().mu);
    size_t total = sizeof(int64_t) * (impl().length.size() + impl().last_pos.size());
    for (const LaneBuffer* b : impl().buffers()) total += b->bytes();
    return total;
}

}  // namespace kvfold
