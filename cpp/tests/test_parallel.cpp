// The thread pool: every item runs exactly once, whatever the thread count; jobs nest and throw
// safely; a cache's results do not depend on the thread count.
#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../src/parallel.hpp"
#include "check.hpp"
#include "fixtures.hpp"
#include "kvfold/kvfold.hpp"

using namespace kvfold;

namespace {
struct RestoreThreads {
    int before = get_num_threads();
    ~RestoreThreads() { set_num_threads(before); }
};
}  // namespace

TEST(parallel_for_runs_every_item_once) {
    RestoreThreads restore;
    for (int threads : {1, 2, 3, 8}) {
        set_num_threads(threads);
        for (int64_t n : {int64_t(1), int64_t(2), int64_t(7), int64_t(100), int64_t(1000)}) {
            std::vector<std::atomic<int>> hits(n);
            parallel_for(n, 1e6, [&](int64_t lo, int64_t hi) {
                CHECK(0 <= lo && lo < hi && hi <= n);
                for (int64_t i = lo; i < hi; ++i) hits[i].fetch_add(1);
            });
            for (auto& h : hits) CHECK(h.load() == 1);
        }
    }
}

TEST(parallel_for_nests_and_reports_errors) {
    RestoreThreads restore;
    set_num_threads(4);
    std::atomic<int64_t> total{0};
    parallel_for(8, 1e6, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)  // a job's own parallel_for runs on its thread
            parallel_for(10, 1e6, [&](int64_t a, int64_t b) { total.fetch_add(b - a); });
    });
    CHECK(total.load() == 80);
    CHECK_THROWS(parallel_for(16, 1e6,
                              [&](int64_t lo, int64_t) {
                                  if (lo == 0) throw std::runtime_error("piece 0 fails");
                              }),
                 std::runtime_error);
    int64_t after = 0;  // the pool still works
    parallel_for(4, 1e6, [&](int64_t lo, int64_t hi) {
        static std::mutex mu;
        std::lock_guard<std::mutex> lock(mu);
        after += hi - lo;
    });
    CHECK(after == 4);
    CHECK_THROWS(set_num_threads(0), ValueError);
    CHECK_THROWS(set_num_threads(kMaxThreads + 1), ValueError);
}

TEST(cache_results_do_not_depend_on_threads) {
    RestoreThreads restore;
    const double before = set_min_shared_flops(0);  // every call with two lanes or more is shared
    const Config c = fixtures::config(2, 4, 8, 64, 64, 70, 2);
    RuleSpec rule;
    rule.kind = "cumulative";
    const int64_t T = 90, nk = 2 * 4 * T * 64, nq = 2 * 8 * T * 64;
    std::mt19937 g(7);
    std::normal_distribution<float> d;
    std::vector<float> q(nq), k(nk), v(nk);
    for (std::vector<float>* x : {&q, &k, &v})
        for (float& f : *x) f = d(g);
    std::vector<std::vector<float>> outs;
    std::vector<std::string> states;
    for (int threads : {1, 2, 5}) {
        set_num_threads(threads);
        MemoryCache cache(c, rule);
        std::vector<float> out(nq);
        cache.forward(q.data(), k.data(), v.data(), T, out.data());
        std::vector<float> step(2 * 8 * 64);
        cache.step(q.data(), k.data(), v.data(), step.data());
        out.insert(out.end(), step.begin(), step.end());
        outs.push_back(out);
        states.push_back(cache.to_bytes());
    }
    for (size_t i = 1; i < outs.size(); ++i) {
        CHECK(std::memcmp(outs[i].data(), outs[0].data(), sizeof(float) * outs[0].size()) == 0);
        CHECK(states[i] == states[0]);
    }
    set_min_shared_flops(before);
}
