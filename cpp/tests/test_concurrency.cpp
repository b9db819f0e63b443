// Calls from several threads: readers never see a reorder's half-done work, a Custom fold that comes
// back into its own cache (or into a cache waiting for it) is refused instead of hanging, and mixed
// mutations and reads leave a consistent state. Built with -fsanitize=thread, these are the race checks.
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "fixtures.hpp"
#include "kvfold/kvfold.hpp"

using namespace kvfold;

namespace {

Config small(int64_t batch = 2) { return fixtures::config(batch, 2, 4, 4, 4, 2, 1); }

void feed(MemoryCache& cache, int64_t T, unsigned seed) {
    const Config& c = cache.config();
    auto k = fixtures::normal(c.batch_size * c.num_heads * T * c.head_dim, seed);
    auto v = fixtures::normal(c.batch_size * c.num_heads * T * c.value_dim, seed + 1);
    cache.update(k.data(), v.data(), T);
}

// Every kind but GRU (learned weights) and Custom (Python), one example each.
std::vector<RuleSpec> every_kind() {
    RuleSpec gated_delta = fixtures::rule("gated_delta", {{"beta", 0.5}}), gated = fixtures::rule("gated");
    gated_delta.arrays["decay"] = gated.arrays["decay"] = Array{{2}, {-0.1, -0.2}};
    RuleSpec weighted = fixtures::rule("weighted");
    weighted.arrays["betas"] = Array{{3}, {0.5, 1.0, 2.0}};
    RuleSpec merge = fixtures::rule("merge", {{"slots", 2}});
    merge.options["bias"] = "log_count";
    return {fixtures::rule("drop"),
            fixtures::rule("cumulative"),
            fixtures::rule("moving", {{"n", 3}}),
            weighted,
            fixtures::rule("ema", {{"alpha", 0.3}}),
            fixtures::rule("compressive", {{"slots", 2}, {"rate", 2}}),
            merge,
            fixtures::rule("linear"),
            gated,
            fixtures::rule("delta", {{"beta", 0.5}}),
            gated_delta};
}

}  // namespace

TEST(threads_a_reorder_never_replaces_what_readers_read) {
    for (const RuleSpec& spec : every_kind()) {
        MemoryCache cache(small(), spec);
        feed(cache, 5, 1);
        const int64_t slots = cache.memory_slots();
        const bool matrix = cache.matrix_memory();
        std::atomic<bool> stop{false};
        std::thread reorderer([&] {
            const int64_t swap[2] = {1, 0};
            for (int i = 0; i < 300; ++i) cache.reorder(swap, 2);
            stop = true;
        });
        std::vector<float> keys(2 * 2 * 4 * 4), values(2 * 2 * 4 * 4);
        bool same = true;
        while (!stop) {
            same = same && cache.memory_slots() == slots && cache.matrix_memory() == matrix &&
                   cache.config().batch_size == 2 && cache.lengths().size() == 2;
            cache.memory(keys.data(), values.data());
        }
        reorderer.join();
        CHECK(same);
    }
}

TEST(threads_a_custom_fold_calling_its_own_cache_is_refused) {
    MemoryCache* self = nullptr;
    RuleSpec spec = fixtures::rule("custom", {{"slots", 1}});
    spec.custom = [&](const CustomCall&) { self->lengths(); };
    MemoryCache cache(small(1), spec);
    self = &cache;
    feed(cache, 3, 2);  // sink and window filled: nothing folded yet
    CHECK_THROWS(feed(cache, 1, 3), RuntimeError);
    CHECK(cache.lengths()[0] == 3);  // the refused update left nothing behind
}

TEST(threads_two_caches_whose_folds_call_each_other_do_not_deadlock) {
    MemoryCache* caches[2] = {nullptr, nullptr};
    std::atomic<int> inside{0};
    auto spec_calling = [&](int other) {
        RuleSpec spec = fixtures::rule("custom", {{"slots", 1}});
        spec.custom = [&, other](const CustomCall&) {
            inside.fetch_add(1);
            while (inside.load() < 2) std::this_thread::yield();  // both caches are folding now
            caches[other]->lengths();
        };
        return spec;
    };
    Config c = small(1);
    c.window = c.sinks = 0;
    MemoryCache a(c, spec_calling(1)), b(c, spec_calling(0));
    caches[0] = &a, caches[1] = &b;
    std::atomic<int> refused{0};
    auto run = [&](MemoryCache& cache, unsigned seed) {
        try {
            feed(cache, 1, seed);
        } catch (const RuntimeError&) {
            refused.fetch_add(1);
        }
    };
    std::thread first([&] { run(a, 4); });
    run(b, 5);
    first.join();
    CHECK(refused.load() == 1);  // the thread that would have closed the cycle
    CHECK(a.lengths()[0] + b.lengths()[0] == 1);
}

TEST(threads_mixing_mutations_and_reads) {
    for (const RuleSpec& spec : every_kind()) {
        MemoryCache cache(small(), spec);
        feed(cache, 6, 7);
        const Checkpoint cp = cache.checkpoint();
        std::atomic<int> errors{0};
        auto mutate = [&](unsigned seed) {
            const int64_t swap[2] = {1, 0}, row[1] = {1};
            for (int i = 0; i < 60; ++i) {
                switch ((seed + i) % 5) {
                    case 0: feed(cache, 1 + i % 3, seed + i); break;
                    case 1: cache.reorder(swap, 2); break;
                    case 2: cache.rollback(cp); break;
                    case 3: cache.reset_rows(row, 1); break;
                    default: cache.rollback_rows(cp, row, 1);
                }
            }
        };
        auto read = [&] {
            std::vector<float> q(2 * 4 * 4, 0.5f), out(2 * 4 * 4);
            const int64_t rows[2] = {1, 1};
            for (int i = 0; i < 60; ++i) {
                cache.attend(q.data(), out.data());
                const std::string state = cache.to_bytes();
                auto copy = MemoryCache::from_bytes(state.data(), state.size());
                if (copy->lengths().size() != 2) errors.fetch_add(1);
                auto part = cache.select(rows, 2);
                if (part->config().batch_size != 2) errors.fetch_add(1);
                MemoryCache whole(cache);
                if (whole.nbytes() != cache.nbytes()) errors.fetch_add(1);
            }
        };
        std::vector<std::thread> threads;
        threads.emplace_back(mutate, 11u);
        threads.emplace_back(mutate, 12u);
        threads.emplace_back(read);
        read();
        for (auto& t : threads) t.join();
        CHECK(errors.load() == 0);
    }
}
