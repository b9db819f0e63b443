// Checkpoints, rollback and batch operations. All of them work on Impl::buffers() and the row
// lengths only, so every rule's state is covered without the rule knowing.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cache_checks.hpp"
#include "cache_impl.hpp"

namespace kvfold {
namespace {

// The shortest decimal that reads back as x.
std::string number(double x) {
    char buf[32];
    for (int digits = 6; digits <= 17; ++digits) {
        std::snprintf(buf, sizeof buf, "%.*g", digits, x);
        if (std::strtod(buf, nullptr) == x) break;
    }
    return buf;
}

std::string describe_rule(const RuleSpec& s) {
    std::string out = s.kind + "(";
    bool first = true;
    for (const auto& [name, a] : s.arrays) {
        out += (first ? "" : ", ") + name + "=";
        first = false;
        if (a.shape.empty() && a.data.size() == 1) {
            out += number(a.data[0]);
            continue;
        }
        out += "[";
        for (size_t i = 0; i < a.data.size() && i < 8; ++i) out += (i ? ", " : "") + number(a.data[i]);
        out += a.data.size() > 8 ? ", ...]" : "]";
    }
    for (const auto& [name, value] : s.options) {
        out += (first ? "" : ", ") + name + "='" + value + "'";
        first = false;
    }
    return out + ")";
}

bool same_rule(const RuleSpec& a, const RuleSpec& b) {
    if (a.kind != b.kind || a.options != b.options || a.arrays.size() != b.arrays.size()) return false;
    for (const auto& [name, x] : a.arrays) {
        auto it = b.arrays.find(name);
        if (it == b.arrays.end() || it->second.shape != x.shape) return false;
        // Bitwise, so NaN-free parameters compare as values and -0.0 differs from 0.0 as the state does.
        if (std::memcmp(it->second.data.data(), x.data.data(), sizeof(double) * x.data.size()) != 0) return false;
    }
    return true;
}

std::string recent_str(const Config& c) {  // as the cache resolves it: -1 is window / 2 for h2o
    if (c.retain != Retain::h2o) return "None";
    return std::to_string(c.recent == -1 ? c.window / 2 : c.recent);
}

std::string describe_rope(const RoPE& r) {
    if (r.theta == 0) return "None";
    std::string text = "RoPE(theta=" + number(r.theta) + ", dim=" + (r.dim ? std::to_string(r.dim) : "None") +
                       ", layout=" + (r.interleaved ? "'interleaved'" : "'half'");
    if (!r.frequencies.empty()) {
        text += ", frequencies=(";
        for (size_t i = 0; i < r.frequencies.size(); ++i) text += (i ? ", " : "") + number(r.frequencies[i]);
        text += r.frequencies.size() == 1 ? ",)" : ")";
    }
    return text + ")";
}

// A configuration as the state depends on it: the effective scale, not how it was given.
struct Shape {
    Config cfg;
    RuleSpec spec;
    float scale;
    explicit Shape(const MemoryCache::Impl& c) : cfg(c.cfg), spec(c.spec), scale(c.scale) {}
};

// The first setting in which a and b differ, as {"name=a", "name=b"}; empty strings when none does.
std::pair<std::string, std::string> difference(const Shape& a, const Shape& b, bool ignore_batch) {
    auto field = [](const char* name, const std::string& x) { return std::string(name) + "=" + x; };
    struct Item {
        const char* name;
        std::string x, y;
    };
    const Config &p = a.cfg, &q = b.cfg;
    const Item items[] = {
        {"batch_size", ignore_batch ? "" : std::to_string(p.batch_size),
         ignore_batch ? "" : std::to_string(q.batch_size)},
        {"num_heads", std::to_string(p.num_heads), std::to_string(q.num_heads)},
        {"head_dim", std::to_string(p.head_dim), std::to_string(q.head_dim)},
        {"value_dim", std::to_string(p.value_dim), std::to_string(q.value_dim)},
        {"num_query_heads", std::to_string(p.num_query_heads), std::to_string(q.num_query_heads)},
        {"window", std::to_string(p.window), std::to_string(q.window)},
        {"sinks", std::to_string(p.sinks), std::to_string(q.sinks)},
        {"scale", number(a.scale), number(b.scale)},
        {"dtype", dtype_name(p.dtype), dtype_name(q.dtype)},
        {"check_finite", p.check_finite ? "True" : "False", q.check_finite ? "True" : "False"},
        {"rope", describe_rope(p.rope), describe_rope(q.rope)},
        {"retain", retain_name(p.retain), retain_name(q.retain)},
        {"recent", recent_str(p), recent_str(q)},
    };
    for (const Item& it : items)
        if (it.x != it.y) return {field(it.name, it.x), field(it.name, it.y)};
    if (!same_rule(a.spec, b.spec)) return {field("rule", describe_rule(a.spec)), field("rule", describe_rule(b.spec))};
    return {};
}

// A new state of `count` rows gathered from c; checks the size before allocating.
std::unique_ptr<MemoryCache::Impl> gather(const MemoryCache::Impl& c, const int64_t* rows, int64_t count) {
    Config g = c.cfg;
    g.batch_size = count;
    auto out = std::make_unique<MemoryCache::Impl>(g, c.spec);
    out->allocate();
    out->copy_rows_from(c, rows, count);
    return out;
}

}  // namespace

void MemoryCache::Impl::copy_rows_from(const Impl& src, const int64_t* src_rows, int64_t count, int64_t first) {
    const int64_t H = cfg.num_heads;
    auto dst_bufs = buffers();
    auto src_bufs = src.buffers();
    for (int64_t r = 0; r < count; ++r) {
        for (size_t i = 0; i < dst_bufs.size(); ++i)
            for (int64_t h = 0; h < H; ++h)
                dst_bufs[i]->copy_lane((first + r) * H + h, *src_bufs[i], src_rows[r] * H + h);
        length[first + r] = src.length[src_rows[r]];
        last_pos[first + r] = src.last_pos[src_rows[r]];
    }
}

void MemoryCache::Impl::swap_state(Impl& other) {
    // Buffer by buffer, the rule's too: the rule object stays, so a reader that holds no lock (the
    // rule's fixed traits, the configuration) never sees it replaced. Settings that do not change
    // are not written.
    auto mine = buffers(), theirs = other.buffers();
    for (size_t i = 0; i < mine.size(); ++i) mine[i]->swap(*theirs[i]);
    std::swap(length, other.length);
    std::swap(last_pos, other.last_pos);
    std::swap(slots_behind, other.slots_behind);
    if (cfg.batch_size != other.cfg.batch_size) {
        std::swap(cfg.batch_size, other.cfg.batch_size);
        std::swap(lanes, other.lanes);
        rule->set_lanes(lanes);
        other.rule->set_lanes(other.lanes);
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

void* Checkpoint::operator new(size_t size) {
    void* p = ::operator new(size);
    std::memset(p, 0, size);
    return p;
}
void Checkpoint::operator delete(void* p) { ::operator delete(p); }

const MemoryCache& Checkpoint::state() const {
    if (!state_) throw TypeError("Checkpoint: this object holds no state; make checkpoints with cache.checkpoint()");
    return *state_;
}
const Config& Checkpoint::config() const { return state().config(); }
const RuleSpec& Checkpoint::rule() const { return state().rule(); }
std::vector<int64_t> Checkpoint::lengths() const { return state().lengths(); }
size_t Checkpoint::nbytes() const { return state().nbytes(); }

Checkpoint MemoryCache::checkpoint() const {
    Checkpoint cp;
    cp.state_ = std::make_shared<const MemoryCache>(*this);  // the copy constructor locks this cache
    return cp;
}

namespace {
void check_restorable(const MemoryCache::Impl& src, const MemoryCache::Impl& c) {
    auto [theirs, ours] = difference(Shape(src), Shape(c), false);
    if (!theirs.empty())
        throw ValueError("checkpoint: taken from a cache with " + theirs + ", this cache has " + ours +
                         " (a checkpoint restores into a cache of the same configuration)");
}
const char* kEmptyCheckpoint = "checkpoint: expected a checkpoint taken with checkpoint(), got an empty one";
}  // namespace

// A checkpoint is never written after it is made, so its state is read without its lock.
void MemoryCache::rollback(const Checkpoint& cp) {
    if (!cp.state_) throw ValueError(kEmptyCheckpoint);
    const Impl& src = cp.state_->impl();
    SettledLock lock(impl());
    check_restorable(src, impl());
    impl().copy_state_from(src);
}

void MemoryCache::rollback_rows(const Checkpoint& cp, const int64_t* rows, int64_t count) {
    if (!cp.state_) throw ValueError(kEmptyCheckpoint);
    const Impl& src = cp.state_->impl();
    SettledLock lock(impl());
    check_restorable(src, impl());
    check_rows("rows", rows, count, impl().cfg.batch_size, true);
    for (int64_t i = 0; i < count; ++i) impl().copy_rows_from(src, rows + i, 1, rows[i]);
}

// ---------------------------------------------------------------------------------------------
// Batch operations

void MemoryCache::reorder(const int64_t* indices, int64_t count) {
    SettledLock lock(impl());
    check_rows("indices", indices, count, impl().cfg.batch_size, false);
    auto next = gather(impl(), indices, count);  // may throw; this cache is untouched until the swap
    impl().swap_state(*next);
}

std::unique_ptr<MemoryCache> MemoryCache::select(const int64_t* rows, int64_t count) const {
    SettledLock lock(impl());
    check_rows("rows", rows, count, impl().cfg.batch_size, false);
    return std::unique_ptr<MemoryCache>(new MemoryCache(gather(impl(), rows, count)));
}

std::unique_ptr<MemoryCache> MemoryCache::concat(const std::vector<const MemoryCache*>& caches) {
    if (caches.empty()) throw ValueError("caches: expected at least one cache, got none");
    for (size_t i = 0; i < caches.size(); ++i)
        if (!caches[i]) throw ValueError("caches[" + std::to_string(i) + "]: expected a cache, got null");
    // One cache is locked at a time, so concat([a, a]) and concurrent calls cannot deadlock.
    std::unique_ptr<Shape> first;
    std::vector<int64_t> batches;
    int64_t total = 0;
    for (size_t i = 0; i < caches.size(); ++i) {
        Impl& c = caches[i]->impl();
        SettledLock lock(c);
        if (!first) first = std::make_unique<Shape>(c);
        auto [theirs, expected] = difference(Shape(c), *first, true);
        if (!theirs.empty())
            throw ValueError("caches[" + std::to_string(i) + "]: expected " + expected + " like caches[0], got " +
                             theirs + " (caches to concatenate differ only in batch_size)");
        batches.push_back(c.cfg.batch_size);
        if (add_overflow(total, c.cfg.batch_size, &total))
            throw ValueError("caches: the batch sizes add up to more than 2^63 rows");
    }
    Config g = first->cfg;
    g.batch_size = total;
    auto out = std::make_unique<Impl>(g, first->spec);
    out->allocate();
    int64_t at = 0;
    std::vector<int64_t> rows;
    for (size_t i = 0; i < caches.size(); ++i) {
        Impl& c = caches[i]->impl();
        SettledLock lock(c);
        if (c.cfg.batch_size != batches[i])
            throw ValueError("caches[" + std::to_string(i) + "]: its batch size changed during concat");
        rows.resize(static_cast<size_t>(batches[i]));
        for (int64_t r = 0; r < batches[i]; ++r) rows[r] = r;
        out->copy_rows_from(c, rows.data(), batches[i], at);
        at += batches[i];
    }
    return std::unique_ptr<MemoryCache>(new MemoryCache(std::move(out)));
}

}  // namespace kvfold
