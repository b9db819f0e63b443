// Checks of a cache's configuration and inputs (cache_checks.hpp).
#include "cache_checks.hpp"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "parallel.hpp"

namespace kvfold {

std::vector<int64_t> ArrayShape::sizes() const {
    std::vector<int64_t> s;
    for (const Axis& a : *this) s.push_back(a.size);
    return s;
}

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

namespace {

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

// Flat index i of an array of `shape`, as "[b=0, h=3, d_k=17]".
std::string index_str(int64_t i, const ArrayShape& shape) {
    const std::vector<int64_t> sizes = shape.sizes();
    std::vector<int64_t> index(sizes.size());
    for (size_t a = sizes.size(), rest = static_cast<size_t>(i); a-- > 0;) {
        index[a] = static_cast<int64_t>(rest % sizes[a]);
        rest /= sizes[a];
    }
    std::string s = "[";
    for (size_t a = 0; a < index.size(); ++a)
        s += (a ? ", " : "") + std::string(shape.begin()[a].name) + "=" + std::to_string(index[a]);
    return s + "]";
}

// The values of an array of `shape`; a shape whose count int64 cannot hold is no array's.
int64_t count(const char* name, const ArrayShape& shape) {
    int64_t n = 1;
    for (const Axis& a : shape)
        if (mul_overflow(n, a.size, &n))
            throw ValueError(std::string(name) + ": an array of shape " + shape_str(shape.sizes()) +
                             " has more values than int64 counts");
    return n;
}

}  // namespace

void check_finite(const char* name, const float* x, const ArrayShape& shape) {
    if (all_finite(x, count(name, shape))) return;
    int64_t i = 0;
    while (std::isfinite(x[i])) ++i;
    throw ValueError(std::string(name) + ": expected finite values, got " + (std::isnan(x[i]) ? "NaN" : "Inf") +
                     " at " + index_str(i, shape) + " (check_finite=False skips this check)");
}

namespace {

// Finite values in [lo, hi]: gates whose meaning has a range.
void check_within(const char* name, const float* x, const ArrayShape& shape, float lo, float hi, const char* why) {
    const int64_t n = count(name, shape);
    for (int64_t i = 0; i < n; ++i)
        if (!(x[i] >= lo && x[i] <= hi))
            throw ValueError(std::string(name) + ": expected values in [" + number_str(lo) + ", " + number_str(hi) +
                             "] (" + why + "), got " + number_str(x[i]) + " at " + index_str(i, shape) +
                             " (check_finite=False skips this check)");
}

// Finite values that the storage dtype holds: float16 rounds |x| >= 65520 to Inf, bfloat16 rounds
// |x| >= 0x7f7f8000 (about 3.3961e38) to Inf; int8 scales hold every finite value.
void check_storable(const char* name, const float* x, const ArrayShape& shape, DType dtype) {
    if (dtype == DType::float32 || dtype == DType::int8) return;
    const uint32_t limit = dtype == DType::float16 ? 0x477FF000u : 0x7F7F8000u;  // 65520.0f, bf16 halfway to Inf
    const int64_t n = count(name, shape);
    // Each piece is first asked whether any magnitude reaches the limit, by a signed compare (the
    // magnitude's bits are below 2^31) and an or: a loop that vectorizes with SSE2 alone.
    constexpr int64_t kPiece = 4096;
    for (int64_t at = 0; at < n; at += kPiece) {
        const int64_t m = std::min(kPiece, n - at);
        int32_t over = 0;
        for (int64_t j = 0; j < m; ++j) {
            int32_t bits;
            std::memcpy(&bits, x + at + j, sizeof bits);
            over |= (bits & 0x7FFFFFFF) >= static_cast<int32_t>(limit);
        }
        if (!over) continue;
        for (int64_t i = at;; ++i) {
            uint32_t bits;
            std::memcpy(&bits, x + i, sizeof bits);
            if ((bits & 0x7FFFFFFFu) >= limit)
                throw ValueError(std::string(name) + ": expected values that " + dtype_name(dtype) +
                                 " storage holds (|x| < " + (dtype == DType::float16 ? "65520" : "3.3961e38") +
                                 "), got " + number_str(x[i]) + " at " + index_str(i, shape) +
                                 ", which it would store as Inf (check_finite=False skips this check)");
        }
    }
}

// Per-token gates are given exactly when the rule needs them (as ONNX LinearAttention does).
void check_gates(const MemoryCache::Impl& c, const TokenGates& gates, int64_t T) {
    const MatrixRule* r = c.matrix;
    const std::string& kind = c.spec.kind;
    const char* names[2] = {"decay", "beta"};
    const bool given[2] = {gates.decay != nullptr, gates.beta != nullptr};
    const bool needed[2] = {r && r->takes_decay(), r && r->takes_beta()};
    const bool used[2] = {r && r->uses_decay(), r && r->uses_beta()};
    for (int i = 0; i < 2; ++i) {
        const std::string name = names[i];
        if (given[i] && !needed[i]) {
            if (!r) throw ValueError(name + ": the " + kind + " rule takes no per-token gates, got " + name);
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
    const int64_t B = c.cfg.batch_size, H = c.cfg.num_heads;
    if (gates.decay) {
        const ArrayShape shape = gates.decay_per_key ? ArrayShape{{"b", B}, {"h", H}, {"t", T}, {"d_k", c.cfg.head_dim}}
                                                     : ArrayShape{{"b", B}, {"h", H}, {"t", T}};
        check_finite("decay", gates.decay, shape);
        check_within("decay", gates.decay, shape, -FLT_MAX, 0, kDecayRange);
    }
    if (gates.beta) {
        const ArrayShape shape{{"b", B}, {"h", H}, {"t", T}};
        check_finite("beta", gates.beta, shape);
        check_within("beta", gates.beta, shape, 0, 2, kBetaRange);
    }
}

}  // namespace

void check_rows(const char* name, const int64_t* rows, int64_t count, int64_t batch, bool allow_empty) {
    if (count < 0)
        throw ValueError(std::string(name) + ": expected a count of rows >= 0, got " + std::to_string(count));
    if (count == 0 && !allow_empty) throw ValueError(std::string(name) + ": expected at least one row index, got none");
    for (int64_t i = 0; i < count; ++i)
        if (rows[i] < 0 || rows[i] >= batch)
            throw ValueError(std::string(name) + ": expected row indices in [0, " + std::to_string(batch) + "), got " +
                             std::to_string(rows[i]) + " at position " + std::to_string(i));
}

// Validates a block of tokens before anything changes.
void check_tokens(const MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                  bool values) {
    if (T < 1) throw ValueError("k: expected at least one token (T >= 1), got T=" + std::to_string(T));
    for (int64_t b = 0; b < c.cfg.batch_size; ++b)
        if (T > MemoryCache::Impl::kMaxLength - c.length[b])
            throw ValueError("k: expected at most " + std::to_string(MemoryCache::Impl::kMaxLength - c.length[b]) +
                             " tokens (a row holds at most 2^62, row " + std::to_string(b) + " has " +
                             std::to_string(c.length[b]) + "), got T=" + std::to_string(T));
    const Config& g = c.cfg;
    const ArrayShape ks{{"b", g.batch_size}, {"h", g.num_heads}, {"t", T}, {"d_k", g.head_dim}};
    const ArrayShape vs{{"b", g.batch_size}, {"h", g.num_heads}, {"t", T}, {"d_v", g.value_dim}};
    count("k", ks);  // shapes int64 counts: no index overflows
    count("v", vs);
    check_gates(c, gates, T);
    if (!c.cfg.check_finite || !values) return;
    check_finite("k", k, ks);
    check_finite("v", v, vs);
    check_storable("k", k, ks, g.dtype);
    check_storable("v", v, vs, g.dtype);
}

void check_queries(const MemoryCache::Impl& c, const float* q, int64_t T) {
    const Config& g = c.cfg;
    count("q", {{"b", g.batch_size}, {"hq", g.num_query_heads}, {"t", std::max<int64_t>(T, 1)}, {"d_k", g.head_dim}});
    if (!c.cfg.check_finite) return;
    if (T == 0)
        check_finite("q", q, {{"b", g.batch_size}, {"hq", g.num_query_heads}, {"d_k", g.head_dim}});
    else
        check_finite("q", q, {{"b", g.batch_size}, {"hq", g.num_query_heads}, {"t", T}, {"d_k", g.head_dim}});
}

}  // namespace kvfold
