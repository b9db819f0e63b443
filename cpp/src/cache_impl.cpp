// Construction of a cache's state (cache_impl.hpp): the configuration checked, every buffer sized,
// then allocated; copies.
#include <cmath>
#include <cstring>
#include <new>

#include "cache_checks.hpp"
#include "cache_impl.hpp"
#include "platform.hpp"
#include "retention.hpp"

namespace kvfold {

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 20;  // heads, head_dim, value_dim
constexpr int64_t kMaxBatch = int64_t(1) << 24;

}  // namespace

MemoryCache::Impl::Impl(const Config& c, const RuleSpec& s) : cfg(c), spec(s) {
    check_range("batch_size", c.batch_size, 1, kMaxBatch);
    check_range("num_heads", c.num_heads, 1, kMaxDim);
    check_range("head_dim", c.head_dim, 1, kMaxDim);
    check_range("value_dim", c.value_dim, 1, kMaxDim);
    check_range("num_query_heads", c.num_query_heads, 1, kMaxDim);
    if (c.num_query_heads % c.num_heads)
        throw ValueError("num_query_heads: expected a multiple of num_heads=" + std::to_string(c.num_heads) + ", got " +
                         std::to_string(c.num_query_heads));
    check_range("window", c.window, 0, kMaxWindow);
    check_range("sinks", c.sinks, 0, kMaxWindow);
    if (c.scale == 0)
        scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
    else if (std::isfinite(c.scale) && c.scale > 0 && std::isfinite(static_cast<float>(c.scale)) &&
             static_cast<float>(c.scale) > 0)
        scale = static_cast<float>(c.scale);
    else
        throw ValueError("scale: expected a number > 0 that float32 holds (1.4e-45 to 3.4e38), got " +
                         number_str(c.scale));
    if (c.dtype != DType::float32 && c.dtype != DType::float16 && c.dtype != DType::bfloat16 && c.dtype != DType::int8)
        throw ValueError("dtype: expected float32, float16, bfloat16 or int8, got code " +
                         std::to_string(static_cast<int>(c.dtype)));

    rope = Rope(c.rope, c.head_dim);
    recent = checked_recent(c);
    retain = c.retain;
    rule = make_rule(spec);
    slots = dynamic_cast<SlotRule*>(rule.get());
    rows = dynamic_cast<RowRule*>(rule.get());
    matrix = dynamic_cast<MatrixRule*>(rule.get());
    check_memory_options(*this);
    lanes = c.batch_size * c.num_heads;
    group = c.num_query_heads / c.num_heads;
    rule->plan(Dims{lanes, c.num_heads, c.head_dim, c.value_dim, c.dtype, c.num_query_heads, c.check_finite,
                    rope.on() ? &rope : nullptr});
    memory_slots = slots ? slots->max_slots() : 0;
    normalized = matrix && matrix->normalized();
    const size_t kb = row_bytes(c.dtype, c.head_dim), vb = row_bytes(c.dtype, c.value_dim);
    sink_k.plan(lanes, kb * c.sinks, rows_of(c.dtype, c.head_dim));
    sink_v.plan(lanes, vb * c.sinks, rows_of(c.dtype, c.value_dim));
    win_k.plan(lanes, kb * c.window, rows_of(c.dtype, c.head_dim));
    win_v.plan(lanes, vb * c.window, rows_of(c.dtype, c.value_dim));
    if (matrix && (matrix->takes_decay() || matrix->takes_beta()))
        gate_stride = 2 + (matrix->takes_decay() ? c.head_dim : 0);
    win_gates.plan(lanes, sizeof(float) * c.window * gate_stride, kFloat32);
    win_pos.plan(lanes, rope.on() ? sizeof(int64_t) * c.window : 0);
    win_score.plan(lanes, retain != Retain::fifo ? sizeof(float) * c.window : 0, kScores);
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
    slots_behind = o.slots_behind;
}

void MemoryCache::Impl::settle() {
    if (!slots_behind) return;
    for (int64_t lane = 0; lane < lanes; ++lane) slots->write_slots(lane, folded(length[lane / cfg.num_heads]));
    slots_behind = false;
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

}  // namespace kvfold
