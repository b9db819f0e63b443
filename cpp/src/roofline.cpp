// The machine's limits, measured (FMA peak per SIMD backend, read bandwidth at a working-set size),
// and each benchmark case's bytes and FLOPs per step. See roofline.hpp.
#include "roofline.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "buffer.hpp"
#include "kernels/kernels.hpp"
#include "kernels/target.hpp"
#include "kvfold/kvfold.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace kvfold {
namespace roofline {
namespace {

// Independent FMA chains: 12 cover a 4-cycle latency on 2 FMA pipes with room to spare.
constexpr int kChains = 12;

// The baseline's vectors (no target region): SSE2 on x86-64 (a multiply, then an add), NEON on
// aarch64, one float elsewhere.
namespace base {
#if defined(__x86_64__) || defined(_M_X64)
struct V {
    using F = __m128;
    static constexpr int kLanes = 4;
    static F set1(float x) { return _mm_set1_ps(x); }
    static F load(const float* p) { return _mm_loadu_ps(p); }
    static F add(F a, F b) { return _mm_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
    static void store(float* p, F a) { _mm_storeu_ps(p, a); }
};
#elif defined(__aarch64__)
struct V {
    using F = float32x4_t;
    static constexpr int kLanes = 4;
    static F set1(float x) { return vdupq_n_f32(x); }
    static F load(const float* p) { return vld1q_f32(p); }
    static F add(F a, F b) { return vaddq_f32(a, b); }
    static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
    static void store(float* p, F a) { vst1q_f32(p, a); }
};
#else
struct V {
    using F = float;
    static constexpr int kLanes = 1;
    static F set1(float x) { return x; }
    static F load(const float* p) { return *p; }
    static F add(F a, F b) { return a + b; }
    static F fma(F a, F b, F c) { return a * b + c; }
    static void store(float* p, F a) { *p = a; }
};
#endif
#include "roofline-inl.hpp"
}  // namespace base

#if defined(__x86_64__) || defined(_M_X64)
KVFOLD_TARGET_BEGIN("avx2,fma")
namespace avx2 {
struct V {
    using F = __m256;
    static constexpr int kLanes = 8;
    static F set1(float x) { return _mm256_set1_ps(x); }
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
};
#include "roofline-inl.hpp"
}  // namespace avx2
KVFOLD_TARGET_END

KVFOLD_TARGET_BEGIN("avx512f,avx2,fma")
namespace avx512 {
struct V {
    using F = __m512;
    static constexpr int kLanes = 16;
    static F set1(float x) { return _mm512_set1_ps(x); }
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
};
#include "roofline-inl.hpp"
}  // namespace avx512
KVFOLD_TARGET_END
#endif

// Each backend's loops and its vector width in floats.
struct Loops {
    float (*fma_chains)(int64_t iterations, float a, float b);
    float (*read_passes)(const float* x, int64_t n, int64_t passes);
    int lanes;
};

Loops loops_for(const std::string& backend) {
#if defined(__x86_64__) || defined(_M_X64)
    if (backend == "avx512" || backend == "avx512bf16")  // the same float32 loops
        return {avx512::fma_chains<avx512::V>, avx512::read_passes<avx512::V>, 16};
    if (backend == "avx2") return {avx2::fma_chains<avx2::V>, avx2::read_passes<avx2::V>, 8};
#else
    (void)backend;  // one set of loops where there is one SIMD backend (NEON, or scalar)
#endif
    return {base::fma_chains<base::V>, base::read_passes<base::V>, base::V::kLanes};
}

Loops checked_loops(const std::string& backend) {
    const auto names = available_backends();
    if (std::find(names.begin(), names.end(), backend) == names.end()) {
        std::string list;
        for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
        throw ValueError("backend: expected one this machine runs (" + list + "), got '" + backend + "'");
    }
    return loops_for(backend);
}

void check_seconds(double seconds) {
    if (!(seconds > 0 && seconds <= 60))
        throw ValueError("seconds: expected a duration in (0, 60], got " + std::to_string(seconds));
}

volatile float sink;  // the loops' results land here, so no compiler drops the work

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// The best rate (units per second) of run(count), which does `count` units of work: short rounds
// (about 2 ms, or one call when that takes longer) for about `seconds`, so that on a machine shared
// with other work some rounds run undisturbed. count doubles from 1 until a call is long enough.
template <class Run>
double best_rate(const Run& run, double seconds) {
    constexpr double kRound = 0.002;
    int64_t count = 1;
    double took = 0;
    for (;;) {
        const double start = now();
        run(count);
        took = std::max(now() - start, 1e-9);
        if (took >= kRound / 2 || count >= (int64_t(1) << 40)) break;
        count *= 2;
    }
    double best = static_cast<double>(count) / took;
    if (took < kRound) count = static_cast<int64_t>(static_cast<double>(count) * kRound / took);
    const double end = now() + seconds;
    for (int rounds = 0; rounds < 3 || now() < end; ++rounds) {
        const double start = now();
        run(count);
        best = std::max(best, static_cast<double>(count) / std::max(now() - start, 1e-9));
    }
    return best;
}

}  // namespace

double fma_peak(const std::string& backend, double seconds) {
    check_seconds(seconds);
    const Loops loops = checked_loops(backend);
    // FLOPs per iteration: a multiply and an add in every lane of every chain.
    constexpr int64_t kIterationsPerCount = 1024;
    const double per_count = 2.0 * kChains * loops.lanes * kIterationsPerCount;
    return per_count *
           best_rate([&](int64_t count) { sink = loops.fma_chains(count * kIterationsPerCount, 0.999f, 1e-3f); },
                     seconds);
}

struct ReadLoop::Buffer {
    LaneBuffer data;
    int64_t floats = 0, passes = 0;
    Loops loops{};
};

ReadLoop::ReadLoop(int64_t bytes) : buffer_(std::make_unique<Buffer>()) {
    constexpr int64_t kMin = 64, kMax = int64_t(1) << 36, kBlock = 8 * 16 * sizeof(float), kCall = int64_t(8) << 20;
    if (bytes < kMin || bytes > kMax)
        throw ValueError("bytes: expected a buffer size in [64, 2^36], got " + std::to_string(bytes));
    Buffer& b = *buffer_;
    b.loops = loops_for(kernels().name);
    // Whole blocks of 8 of the widest vectors, so the loop has no tail.
    b.floats = round_up(static_cast<size_t>(bytes), kBlock) / sizeof(float);
    b.passes = std::max<int64_t>(1, kCall / this->bytes());
    b.data.plan(1, static_cast<size_t>(b.floats) * sizeof(float));
    b.data.allocate();
    sink = b.loops.read_passes(b.data.lane<float>(0), b.floats, 1);  // first touch: mapped before any timing
}

ReadLoop::~ReadLoop() = default;

int64_t ReadLoop::bytes() const { return buffer_->floats * static_cast<int64_t>(sizeof(float)); }

int64_t ReadLoop::passes() const { return buffer_->passes; }

void ReadLoop::read() const {
    sink = buffer_->loops.read_passes(buffer_->data.lane<float>(0), buffer_->floats, buffer_->passes);
}

StepWork step_work(const std::string& rule, int64_t heads, int64_t head_dim, int64_t window, int64_t sinks,
                   int64_t element_bytes, int64_t tokens) {
    const bool summary = rule == "drop" || rule == "cumulative" || rule == "ema";
    const bool matrix = rule == "linear" || rule == "gated" || rule == "delta" || rule == "gated_delta";
    if (!summary && !matrix)
        throw ValueError("rule: expected drop, cumulative, ema, linear, gated, delta or gated_delta, got '" + rule +
                         "'");
    auto at_least = [](const char* name, int64_t value, int64_t low) {
        if (value < low)
            throw ValueError(std::string(name) + ": expected an integer >= " + std::to_string(low) + ", got " +
                             std::to_string(value));
    };
    at_least("heads", heads, 1), at_least("head_dim", head_dim, 1), at_least("window", window, 0);
    at_least("sinks", sinks, 0), at_least("tokens", tokens, 1);
    if (element_bytes != 1 && element_bytes != 2 && element_bytes != 4)
        throw ValueError("element_bytes: expected 1, 2 or 4, got " + std::to_string(element_bytes));

    const double H = static_cast<double>(heads), d = static_cast<double>(head_dim);
    // int8 rows (q8_0) carry a float32 scale per 32 values: 1.125 bytes a value.
    const double e = element_bytes == 1 ? 1.125 : static_cast<double>(element_bytes), T = static_cast<double>(tokens);
    // Bytes are the bytes read: what a step writes goes to lines it has just read (S, the sums) or
    // is small beside its reads (the output, the new pair).
    const double inputs = 3 * 4 * H * d;  // q, k and v, float32, per token
    StepWork w;
    if (matrix) {
        // S (d x d per head, float32) read once per step, once per prefill at best. Multiply-adds
        // per element of S and token: update and read 2 (k v^T, q^T S); the delta rules 3 (also
        // k^T S). The gated rules' decay scales rows and is not counted.
        const double state = 4 * H * d * d;
        const double macs = rule == "delta" || rule == "gated_delta" ? 3 : 2;
        w.flops = 2 * macs * H * d * d;
        w.bytes = inputs + state / T;
        w.footprint = state + (tokens > 1 ? T * inputs : 0);
        return w;
    }
    // Summary memories: attention over the visible rows, a score and a weighted sum per row (2
    // multiply-adds per element); Cumulative and EMA keep one slot and float64 sums, read for each
    // pair they fold.
    const double slots = rule == "drop" ? 0 : 1, held = static_cast<double>(sinks + window);
    const double sums = slots * 2 * 8 * H * d;
    if (tokens == 1) {
        const double rows = held + slots;
        w.flops = 4 * H * d * rows;
        w.bytes = inputs + 2 * e * H * d * rows + sums;
        w.footprint = 2 * e * H * d * rows + sums;
        return w;
    }
    // A prefill's token t (1-based) sees min(t, sinks + window) rows and, once a pair has been
    // folded, the slot; averaged over the T tokens. The rows and the sums stay in cache from
    // token to token: what streams is the prefill's input.
    double rows = 0;
    for (int64_t t = 1; t <= tokens; ++t)
        rows += std::min(static_cast<double>(t), held) + (static_cast<double>(t) > held ? slots : 0);
    rows /= T;
    w.flops = 4 * H * d * rows;
    w.bytes = inputs;
    w.footprint = T * inputs;
    return w;
}

}  // namespace roofline
}  // namespace kvfold
