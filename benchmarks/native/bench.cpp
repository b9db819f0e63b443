// Native benchmark harness: time per token of kvfold's hot paths without Python in the way.
// Build: cmake -B build-bench -DKVFOLD_BENCH=ON && cmake --build build-bench && build-bench/kvfold-bench
// (cmake --install installs it as kvfold-bench; see docs/native-bench.md)
// Usage: kvfold-bench [--threads N] [--backend NAME] [--chunk N] [--cpu-time] [substring of case names...]
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../../cpp/tests/fixtures.hpp"
#include "kernels/kernels.hpp"
#include "kvfold/kvfold.hpp"
#include "parallel.hpp"
#include "roofline.hpp"

using kvfold::Config;
using kvfold::MemoryCache;
using kvfold::RuleSpec;

namespace {

using fixtures::normal;
using fixtures::rule;

struct Case {
    std::string name;
    RuleSpec rule;
    int64_t heads, dim, window, sinks;
    kvfold::DType dtype;
    int64_t prefill;     // 0: one decode step (update + attend) per token; T: forward over T tokens
    bool gates = false;  // per-token decay and beta (per head), for the gated delta rule
    kvfold::RoPE rope{};
    kvfold::Retain retain = kvfold::Retain::fifo;
    bool varied_keys = false;  // each decode step a different key (a rule's work may depend on it)
};

bool cpu_time = false;  // --cpu-time: the calling thread's CPU time, blind to other processes

double now() {
    timespec ts;
    clock_gettime(cpu_time ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Seconds per call of each function: the best of 15 rounds of about 20 ms each, the functions
// taken in turn, so that on a machine shared with other work each still shows an undisturbed round,
// and the functions' best rounds come from the same stretch of time. A round starts after one
// untimed call: the function before it has left its own data in the caches.
std::vector<double> seconds_per_call(const std::vector<std::function<void()>>& fns) {
    std::vector<int64_t> calls(fns.size());
    for (size_t f = 0; f < fns.size(); ++f)
        for (double t0 = now(); now() - t0 < 0.02;) fns[f](), ++calls[f];
    std::vector<double> best(fns.size(), 1e30);
    for (int round = 0; round < 15; ++round)
        for (size_t f = 0; f < fns.size(); ++f) {
            if (fns.size() > 1) fns[f]();
            double start = now();
            for (int64_t i = 0; i < calls[f]; ++i) fns[f]();
            best[f] = std::min(best[f], (now() - start) / static_cast<double>(calls[f]));
        }
    return best;
}

// A case's seconds per step (or per prefill token), and when it was timed with a read loop, the
// loop's seconds per pass, from rounds between the case's.
struct Timing {
    double seconds = 0, read_seconds = 0;
};

Timing run(const Case& k, const kvfold::roofline::ReadLoop* reads) {
    Config c;
    c.num_heads = c.num_query_heads = k.heads;
    c.head_dim = c.value_dim = k.dim;
    c.window = k.window;
    c.sinks = k.sinks;
    c.dtype = k.dtype;
    c.rope = k.rope;
    c.retain = k.retain;
    MemoryCache cache(c, k.rule);
    const int64_t T = std::max<int64_t>(k.prefill, 1), n = k.heads * T * k.dim;
    auto q = normal(n, 1), kk = normal(n, 2), v = normal(n, 3);
    std::vector<float> out(n);
    auto timed = [&](std::function<void()> call, double per) {
        std::vector<std::function<void()>> fns{std::move(call)};
        if (reads) fns.push_back([&] { reads->read(); });
        const std::vector<double> best = seconds_per_call(fns);
        return Timing{best[0] / per, reads ? best[1] / static_cast<double>(reads->passes()) : 0.0};
    };
    // Gates as a gated delta layer makes them: log decays in [-0.5, 0), betas in (0, 1), unit keys.
    // (64 folds beyond the window, so that a memory of up to 64 slots is full)
    const int64_t fill_tokens = k.window + k.sinks + 64, gate_tokens = std::max(T, fill_tokens);
    std::vector<float> decay(k.heads * gate_tokens), beta(k.heads * gate_tokens);
    kvfold::TokenGates gates;
    if (k.gates) {
        std::mt19937 g(5);
        std::uniform_real_distribution<float> u(0.01f, 0.99f);
        for (float& x : decay) x = -0.5f * u(g);
        for (float& x : beta) x = u(g);
        gates.decay = decay.data();
        gates.beta = beta.data();
        for (int64_t row = 0; row < k.heads * T; ++row) {
            float norm = 0;
            for (int64_t i = 0; i < k.dim; ++i) norm += kk[row * k.dim + i] * kk[row * k.dim + i];
            for (int64_t i = 0; i < k.dim; ++i) kk[row * k.dim + i] /= std::sqrt(norm);
        }
    }
    if (k.prefill)
        return timed(
            [&] {
                cache.reset();
                cache.forward(q.data(), kk.data(), v.data(), T, out.data(), gates);
            },
            static_cast<double>(T));
    // Fill sinks and window first: a decode step then evicts, folds and attends over a full window.
    auto fill = normal(k.heads * fill_tokens * k.dim, 4);
    for (float& x : fill) x *= 0.1f;
    cache.update(fill.data(), fill.data(), fill_tokens, gates);
    if (!k.varied_keys) return timed([&] { cache.step(q.data(), kk.data(), v.data(), out.data(), gates); }, 1);
    // Keys drawn once (a generator in the timed loop would add its own cost), a pool a few times the
    // visible set, so that a step's key is not one the window or the slots hold already.
    const int64_t pool = 3 * (k.window + k.sinks + 64) + 1, row = k.heads * k.dim;
    const auto keys = normal(pool * row, 9);
    int64_t next = 0;
    return timed(
        [&] {
            cache.step(q.data(), keys.data() + next * row, v.data(), out.data(), gates);
            next = next + 1 == pool ? 0 : next + 1;
        },
        1);
}

// What one step of the case asks for, when the roofline models its rule.
std::optional<kvfold::roofline::StepWork> work_of(const Case& k) {
    try {
        return kvfold::roofline::step_work(k.rule.kind, k.heads, k.dim, k.window, k.sinks,
                                           static_cast<int64_t>(kvfold::dtype_size(k.dtype)),
                                           std::max<int64_t>(k.prefill, 1));
    } catch (const kvfold::ValueError&) {
        return std::nullopt;  // a rule the roofline does not model
    }
}

// The roofline column: the case's time bound (its bytes over the read bandwidth at its working-set
// size, or its FLOPs over the FMA peak, whichever is longer) over its measured time.
struct Bound {
    double seconds = 0;
    bool memory = false;
    double rate = 0;  // bytes/s or FLOP/s of the bound
};

Bound bound_of(const kvfold::roofline::StepWork& w, double bandwidth, double peak) {
    Bound b;
    b.memory = w.bytes / bandwidth >= w.flops / peak;
    b.seconds = b.memory ? w.bytes / bandwidth : w.flops / peak;
    b.rate = b.memory ? bandwidth : peak;
    return b;
}

std::vector<Case> cases() {
    using kvfold::DType;
    using kvfold::Retain;
    const auto f32 = DType::float32;
    const kvfold::RoPE rope{10000.0, 0, false};
    // GRU over concat(k, v) (D = 256), scaled as torch.nn.GRUCell's: one weight set shared by the
    // heads, or one per head (sets = 32).
    auto gru = [](int64_t sets) {
        RuleSpec s;
        s.kind = "gru";
        const int64_t D = 256, n = std::max<int64_t>(sets, 1) * 3 * D * D;
        std::vector<int64_t> shape{3 * D, D};
        if (sets) shape.insert(shape.begin(), sets);
        for (const char* name : {"weight_ih", "weight_hh"}) {
            const auto w = normal(n, name[7] == 'i' ? 7 : 8, 1.0f / 16);
            s.arrays[name] = kvfold::Array{shape, std::vector<double>(w.begin(), w.end())};
        }
        return s;
    };
    auto merge = [](double slots) {  // with the log-count bias, as rules.Merge has by default
        RuleSpec s = rule("merge", {{"slots", slots}});
        s.options["bias"] = "log_count";
        return s;
    };
    std::vector<Case> all = {
        {"decode cumulative w0", rule("cumulative"), 32, 128, 0, 0, f32, 0},
        {"decode moving(64) w0", rule("moving", {{"n", 64}}), 32, 128, 0, 0, f32, 0},
        {"decode ema(0.1) w0", rule("ema", {{"alpha", 0.1}}), 32, 128, 0, 0, f32, 0},
        {"decode gru w0", gru(0), 32, 128, 0, 0, f32, 0},
        {"decode gru per-head w0", gru(32), 32, 128, 0, 0, f32, 0},
        {"prefill gru w0 T64", gru(0), 32, 128, 0, 0, f32, 64},
        {"decode compressive(8x4) w0", rule("compressive", {{"slots", 8}, {"rate", 4}}), 32, 128, 0, 0, f32, 0},
        {"decode cumulative w256 s4", rule("cumulative"), 32, 128, 256, 4, f32, 0},
        {"decode cumulative w256 s4 f16", rule("cumulative"), 32, 128, 256, 4, DType::float16, 0},
        {"decode cumulative w256 s4 bf16", rule("cumulative"), 32, 128, 256, 4, DType::bfloat16, 0},
        {"decode drop w4096 s4", rule("drop"), 32, 128, 4096, 4, f32, 0},
        {"decode drop w256", rule("drop"), 32, 128, 256, 0, f32, 0, false, {}, Retain::fifo, true},
        {"decode merge(32) w0", merge(32), 32, 128, 0, 0, f32, 0, false, {}, Retain::fifo, true},
        {"decode merge(32) w256 s4", merge(32), 32, 128, 256, 4, f32, 0, false, {}, Retain::fifo, true},
        // The 256 rows of window 256 alone, as the evaluation's memory of 256 pairs spends them.
        {"decode merge(32) w220 s4", merge(32), 32, 128, 220, 4, f32, 0, false, {}, Retain::fifo, true},
        // The 292 rows merge(32) w256 s4 attends over, with nothing to fold: the rest of its time is the fold.
        {"decode drop w288 s4", rule("drop"), 32, 128, 288, 4, f32, 0, false, {}, Retain::fifo, true},
        {"decode merge(32) w256 s4 rope", merge(32), 32, 128, 256, 4, f32, 0, false, rope, Retain::fifo, true},
        {"decode merge(32) w256 s4 rope tova", merge(32), 32, 128, 256, 4, f32, 0, false, rope, Retain::tova, true},
        {"decode drop w256 tova", rule("drop"), 32, 128, 256, 0, f32, 0, false, {}, Retain::tova, true},
        {"decode drop w4096 s4 f16", rule("drop"), 32, 128, 4096, 4, DType::float16, 0},
        {"decode drop w4096 s4 int8", rule("drop"), 32, 128, 4096, 4, DType::int8, 0},
        {"decode drop w256 bf16", rule("drop"), 32, 128, 256, 0, DType::bfloat16, 0},
        {"decode drop w256 int8", rule("drop"), 32, 128, 256, 0, DType::int8, 0},
        {"decode drop w256 f16", rule("drop"), 32, 128, 256, 0, DType::float16, 0},
        {"decode drop w4096 s4 bf16", rule("drop"), 32, 128, 4096, 4, DType::bfloat16, 0},
        {"prefill cumulative w256 s4 T512", rule("cumulative"), 32, 128, 256, 4, f32, 512},
        {"prefill cumulative w256 s4 T2048", rule("cumulative"), 32, 128, 256, 4, f32, 2048},
        {"prefill ema w0 T2048", rule("ema", {{"alpha", 0.1}}), 32, 128, 0, 0, f32, 2048},
        {"decode linear", rule("linear"), 32, 128, 0, 0, f32, 0},
        {"decode gated_delta", rule("gated_delta"), 32, 128, 0, 0, f32, 0, true},
        {"decode gated_delta H8 (S in L2)", rule("gated_delta"), 8, 128, 0, 0, f32, 0, true},
        {"prefill linear T512", rule("linear"), 32, 128, 0, 0, f32, 512},
        {"prefill linear T2048", rule("linear"), 32, 128, 0, 0, f32, 2048},
        {"prefill gated_delta T512", rule("gated_delta"), 32, 128, 0, 0, f32, 512, true},
        {"prefill gated_delta T2048", rule("gated_delta"), 32, 128, 0, 0, f32, 2048, true},
        {"tiny ema H1 d8", rule("ema", {{"alpha", 0.1}}), 1, 8, 0, 0, f32, 0},
        {"tiny cumulative w16 H1 d8", rule("cumulative"), 1, 8, 16, 0, f32, 0},
    };
    return all;
}

// The chunked prefill's matrix products alone, at its shapes (chunks of 32, d = 128): the rate of
// arithmetic a prefill is bound by.
void matrix_product_rates(const std::vector<std::string>& filters) {
    struct Shape {
        const char* name;
        int64_t m, n, k;
        bool trans_a, lower_c;
    };
    const Shape shapes[] = {{"gemm Q S (32x128 by 128x128)", 32, 128, 128, false, false},
                            {"gemm K^T U (128x32 by 32x128)", 128, 128, 32, true, false},
                            {"gemm Q K^T (32x128 by 128x32, lower)", 32, 32, 128, false, true}};
    bool header = false;
    for (const Shape& s : shapes) {
        bool wanted = filters.empty();
        for (auto& f : filters) wanted |= std::string(s.name).find(f) != std::string::npos;
        if (!wanted) continue;
        if (!header) std::printf("\n%-36s %14s\n", "matrix product", "GFLOP/s"), header = true;
        auto a = normal(s.m * s.k, 5), b = normal(s.k * s.n, 6);
        std::vector<float> c(s.m * s.n);
        kvfold::Gemm g;
        g.m = s.m, g.n = s.n, g.k = s.k;
        g.a = a.data(), g.lda = s.trans_a ? s.m : s.k, g.b = b.data(), g.ldb = s.n, g.c = c.data(), g.ldc = s.n;
        g.trans_a = s.trans_a, g.lower_c = s.lower_c;
        const double flops = 2.0 * s.m * s.n * s.k * (s.lower_c ? 0.5 : 1.0);  // lower: the half that is wanted
        std::printf("%-36s %14.1f\n", s.name, flops / seconds_per_call({[&] { kvfold::kernels().gemm(g); }})[0] * 1e-9);
    }
}

int usage(std::FILE* to, int status, const char* bad = nullptr) {
    if (bad) std::fprintf(to, "kvfold-bench: unknown option or missing value: %s\n", bad);
    std::fprintf(to,
                 "usage: kvfold-bench [--threads N] [--backend NAME] [--chunk N] [--cpu-time] [NAME-SUBSTRING ...]\n"
                 "Times the cases whose names contain one of the substrings (all cases when none is given).\n");
    return status;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> filters;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--threads" && i + 1 < argc)
            kvfold::set_num_threads(std::atoi(argv[++i]));
        else if (a == "--chunk" && i + 1 < argc)
            kvfold::set_chunk_size(std::atoi(argv[++i]));
        else if (a == "--cpu-time")
            cpu_time = true;
        else if (a == "--backend" && i + 1 < argc)
            kvfold::set_simd_backend(argv[++i]);
        else if (a == "--help" || a == "-h")
            return usage(stdout, 0);
        else if (a.rfind("-", 0) == 0)  // an option misspelled or missing its value, not a case name
            return usage(stderr, 2, a.c_str());
        else
            filters.push_back(a);
    }
    std::printf("kvfold %s native benchmark: backend %s, %d thread(s), chunks of %d, %s; B=1, Hq=H\n",
                kvfold::version(), kvfold::simd_backend(), kvfold::get_num_threads(),
                static_cast<int>(kvfold::get_chunk_size()), cpu_time ? "CPU time" : "wall time");
    // The machine's limits, measured in the same run: the FMA peak of one core per backend, and
    // below, per case, the read bandwidth of one core at the case's working-set size.
    // The bounds are one core's: compare them with a run on one thread (--threads 1).
    std::printf("FMA peak of one core (GFLOP/s):");
    double peak = 0;
    for (const std::string& name : kvfold::available_backends()) {
        const double flops = kvfold::roofline::fma_peak(name, 0.3);
        std::printf(" %s %.1f", name.c_str(), flops * 1e-9);
        if (name == kvfold::simd_backend()) peak = flops;
    }
    if (kvfold::get_num_threads() > 1) std::printf("; bounds are one core's: compare them with --threads 1");
    std::printf("\n%-36s %14s %10s %9s  %s\n", "case", "us/token", "bound us", "of bound", "bound by");
    for (const Case& k : cases()) {
        bool wanted = filters.empty();
        for (auto& f : filters) wanted |= k.name.find(f) != std::string::npos;
        if (!wanted) continue;
        // The read bandwidth at the case's working set, in rounds between the case's own.
        const auto work = work_of(k);
        std::unique_ptr<kvfold::roofline::ReadLoop> reads;
        if (work) reads = std::make_unique<kvfold::roofline::ReadLoop>(std::max<int64_t>(64, work->footprint));
        const Timing t = run(k, reads.get());
        const double seconds = t.seconds;  // per step, or per prefill token
        if (!work) {
            std::printf("%-36s %14.3f %10s %9s\n", k.name.c_str(), seconds * 1e6, "-", "-");
            continue;
        }
        const Bound b = bound_of(*work, static_cast<double>(reads->bytes()) / t.read_seconds, peak);
        std::printf("%-36s %14.3f %10.3f %8.0f%%  %s %.1f %s\n", k.name.c_str(), seconds * 1e6, b.seconds * 1e6,
                    100 * b.seconds / seconds, b.memory ? "read" : "FMA", b.rate * 1e-9, b.memory ? "GB/s" : "GFLOP/s");
    }
    matrix_product_rates(filters);
    return 0;
}
