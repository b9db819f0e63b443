// The public cache: each call takes the lock, checks its inputs, then runs the slot model
// (slot_model.hpp) or the matrix model (matrix_model.hpp).
#include <algorithm>
#include <cstring>

#include "cache_checks.hpp"
#include "cache_impl.hpp"
#include "matrix_model.hpp"
#include "names.hpp"
#include "positions.hpp"
#include "retention.hpp"
#include "slot_model.hpp"

namespace kvfold {

const char* version() { return KVFOLD_VERSION; }

constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16", "int8"};  // in DType's order

DType parse_dtype(const std::string& name) {
    return from_name<DType>(kDTypeNames, name, "dtype", "'float32', 'float16', 'bfloat16' or 'int8'");
}
const char* dtype_name(DType t) { return to_name(kDTypeNames, t); }
// Bytes per value; an int8 row also carries a float32 scale per 32 values (row_bytes).
size_t dtype_size(DType t) { return t == DType::float32 ? 4 : t == DType::int8 ? 1 : 2; }
// ---------------------------------------------------------------------------------------------
// Public API

MemoryCache::MemoryCache(const Config& config, const RuleSpec& rule) : impl_(std::make_unique<Impl>(config, rule)) {
    impl().allocate();
}
MemoryCache::MemoryCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MemoryCache::MemoryCache(const MemoryCache& other) {
    SettledLock lock(other.impl());
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
bool MemoryCache::matrix_memory() const { return impl().matrix != nullptr; }
bool MemoryCache::matrix_normalized() const { return impl().normalized; }

void MemoryCache::update(const float* k, const float* v, int64_t T, const TokenGates& gates, const int64_t* positions) {
    SettledLock lock(impl());
    Impl& c = impl();
    const Positions pos{positions, T, c.length.data()};
    check_tokens(c, k, v, T, gates);
    check_positions(c, pos);
    if (c.matrix)
        matrix_run(c, k, v, T, gates, nullptr, nullptr);
    else
        append(c, k, v, T, pos);
    record_positions(c, positions, T);
}

void MemoryCache::attend(const float* q, float* out) {
    SettledLock lock(impl());
    check_queries(impl(), q, 0);
    if (impl().matrix) return matrix_attend(impl(), q, out);
    attend_all(impl(), q, out);
}

void MemoryCache::step(const float* q, const float* k, const float* v, float* out, const TokenGates& gates,
                       const int64_t* positions) {
    CacheLock lock(impl().mu);  // run_lanes settles the slots, unless the step folds into its output
    Impl& c = impl();
    const Positions pos{positions, 1, c.length.data()};
    check_tokens(c, k, v, 1, gates);
    check_queries(c, q, 0);
    check_positions(c, pos);
    if (c.matrix) {
        matrix_run(c, k, v, 1, gates, q, out);
    } else if (c.rows) {
        append(c, k, v, 1, pos);
        attend_all(c, q, out);
    } else {
        run_lanes(c, q, k, v, 1, out, pos);
    }
    record_positions(c, positions, 1);
}

void MemoryCache::forward(const float* q, const float* k, const float* v, int64_t T, float* out,
                          const TokenGates& gates, const int64_t* positions) {
    CacheLock lock(impl().mu);  // as step's
    Impl& c = impl();
    const Positions pos{positions, T, c.length.data()};
    if (matrix_checks_as_it_folds(c, T)) {
        check_tokens(c, k, v, T, gates, false);
        check_positions(c, pos);
        if (!matrix_run_checked(c, k, v, T, gates, q, out)) {  // the state is as it was: the checks say why
            check_tokens(c, k, v, T, gates);
            check_queries(c, q, T);
        }
        record_positions(c, positions, T);
        return;
    }
    check_tokens(c, k, v, T, gates);
    check_queries(c, q, T);
    check_positions(c, pos);
    if (c.matrix)
        matrix_run(c, k, v, T, gates, q, out);
    else if (c.rows)
        forward_rows(c, q, k, v, T, out);
    else
        run_lanes(c, q, k, v, T, out, pos);
    record_positions(c, positions, T);
}

void MemoryCache::memory(float* keys, float* values) const {
    SettledLock lock(impl());
    const Impl& c = impl();
    if (c.matrix) {
        const int64_t dk = c.cfg.head_dim, dv = c.cfg.value_dim;
        for (int64_t lane = 0; lane < c.lanes; ++lane) {
            std::memcpy(keys + lane * dk * dv, c.matrix->matrix_state(lane), sizeof(float) * dk * dv);
            if (values && c.matrix->normalizer(lane))
                std::memcpy(values + lane * dk, c.matrix->normalizer(lane), sizeof(float) * dk);
        }
        return;
    }
    const int64_t S = c.memory_slots, dk = c.cfg.head_dim, dv = c.cfg.value_dim;
    for (int64_t lane = 0; lane < c.lanes; ++lane) {
        int64_t f = c.folded(c.length[lane / c.cfg.num_heads]);
        int64_t shown = c.slots->visible_slots(f);
        float* ko = keys + lane * S * dk;
        float* vo = values + lane * S * dv;
        std::memset(ko, 0, sizeof(float) * S * dk);
        std::memset(vo, 0, sizeof(float) * S * dv);
        for (int64_t s = 0; s < shown; ++s) {
            int64_t src = c.slots->slot_row(lane, f, s);
            load_row(ko + s * dk, c.slots->slot_key(lane, src), dk, c.slots->slot_dtype());
            load_row(vo + s * dv, c.slots->slot_value(lane, src), dv, c.slots->slot_dtype());
        }
    }
}

void MemoryCache::load_memory(const float* keys, const float* values) {
    SettledLock lock(impl());
    Impl& c = impl();
    const Config& g = c.cfg;
    const std::string& kind = c.spec.kind;
    if (!c.matrix)
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
        check_finite("S", keys, {{"b", g.batch_size}, {"h", g.num_heads}, {"d_k", dk}, {"d_v", dv}});
        if (values) check_finite("z", values, {{"b", g.batch_size}, {"h", g.num_heads}, {"d_k", dk}});
    }
    for (int64_t lane = 0; lane < c.lanes; ++lane) {
        std::memcpy(c.matrix->matrix_state(lane), keys + lane * dk * dv, sizeof(float) * dk * dv);
        if (values) std::memcpy(c.matrix->normalizer(lane), values + lane * dk, sizeof(float) * dk);
    }
}

int64_t MemoryCache::visible_size() const {
    CacheLock lock(impl().mu);  // counts, not slot rows: nothing to settle
    int64_t n = 0;
    for (int64_t len : impl().length) n = std::max(n, impl().visible_rows(len));
    return n;
}

int64_t MemoryCache::visible(float* keys, float* values, uint8_t* mask, int64_t rows) const {
    SettledLock lock(impl());
    const Impl& c = impl();
    const Config& g = c.cfg;
    const int64_t dk = g.head_dim, dv = g.value_dim, H = g.num_heads;
    const size_t kb = row_bytes(g.dtype, dk), vb = row_bytes(g.dtype, dv);
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
            put(c.sink_k.lane(lane) + s * kb, c.sink_v.lane(lane) + s * vb, g.dtype);
        int64_t f = c.folded(len);
        for (int64_t s = 0; c.slots && s < c.slots->visible_slots(f); ++s) {
            int64_t src = c.slots->slot_row(lane, f, s);
            put(static_cast<const uint8_t*>(c.slots->read_key(lane, src)),
                static_cast<const uint8_t*>(c.slots->slot_value(lane, src)), c.slots->slot_dtype());
        }
        int64_t held = c.window_held(len), first = len - c.sinks_held(len) - held;
        for (int64_t i = 0; i < held; ++i) {
            int64_t pos = window_row(c, lane, first, i);
            put(c.win_k.lane(lane) + pos * kb, c.win_v.lane(lane) + pos * vb, g.dtype);
        }
        std::memset(ko + row * dk, 0, sizeof(float) * (rows - row) * dk);  // the padding
        std::memset(vo + row * dv, 0, sizeof(float) * (rows - row) * dv);
    }
    return n;
}

void MemoryCache::reset() {
    SettledLock lock(impl());
    for (LaneBuffer* b : impl().buffers())
        if (b->bytes()) std::memset(b->data(), 0, b->bytes());
    for (int64_t& len : impl().length) len = 0;
    for (int64_t& p : impl().last_pos) p = 0;
}

void MemoryCache::reset_rows(const int64_t* rows, int64_t count) {
    SettledLock lock(impl());
    Impl& c = impl();
    const int64_t H = c.cfg.num_heads;
    check_rows("rows", rows, count, c.cfg.batch_size, true);
    for (int64_t i = 0; i < count; ++i) {
        for (LaneBuffer* buf : c.buffers())
            for (int64_t h = 0; h < H; ++h) buf->zero_lane(rows[i] * H + h);
        c.length[rows[i]] = 0;
        c.last_pos[rows[i]] = 0;
    }
}

std::vector<int64_t> MemoryCache::lengths() const {
    CacheLock lock(impl().mu);  // as visible_size's
    return impl().length;
}

std::vector<int64_t> MemoryCache::last_positions() const {
    CacheLock lock(impl().mu);  // as visible_size's
    return impl().last_pos;
}

size_t MemoryCache::nbytes() const {
    CacheLock lock(impl().mu);  // as visible_size's
    size_t total = sizeof(int64_t) * (impl().length.size() + impl().last_pos.size());
    for (const LaneBuffer* b : impl().buffers()) total += b->bytes();
    return total;
}

}  // namespace kvfold
