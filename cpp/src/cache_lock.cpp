#include "cache_lock.hpp"

#include <unordered_map>

#include "kvfold/kvfold.hpp"

namespace kvfold {

// Which cache each blocked thread waits for. Only threads that found a cache busy are here, and a
// thread registers (and checks for a cycle) under one lock, so the last thread to close a cycle
// always sees the others.
struct WaitGraph {
    std::mutex mu;
    std::unordered_map<std::thread::id, const CacheMutex*> waiting_for;

    // Whether waiting for `m` would make `me` wait for itself.
    bool closes_cycle(const CacheMutex* m, std::thread::id me) const {
        for (size_t hops = 0; m && hops <= waiting_for.size(); ++hops) {
            const std::thread::id holder = m->holder_.load(std::memory_order_acquire);
            if (holder == me) return true;
            auto it = waiting_for.find(holder);
            m = it == waiting_for.end() ? nullptr : it->second;
        }
        return false;
    }
};

namespace {
WaitGraph& wait_graph() {
    static WaitGraph* graph = new WaitGraph;  // never destroyed: threads may still wait at exit
    return *graph;
}
}  // namespace

void CacheMutex::lock() {
    const std::thread::id me = std::this_thread::get_id();
    if (holder_.load(std::memory_order_acquire) == me)
        throw RuntimeError(
            "MemoryCache: called from inside a Custom rule's fn while that cache is folding; fn must not use "
            "the cache it folds for");
    if (!mu_.try_lock()) {
        WaitGraph& g = wait_graph();
        {
            std::lock_guard<std::mutex> guard(g.mu);
            if (g.closes_cycle(this, me))
                throw RuntimeError(
                    "MemoryCache: this cache is busy in another thread whose Custom rule's fn waits for a cache this "
                    "thread holds; waiting would never end (Custom fns that call other caches deadlock this way)");
            g.waiting_for[me] = this;
        }
        mu_.lock();
        std::lock_guard<std::mutex> guard(g.mu);
        g.waiting_for.erase(me);
    }
    holder_.store(me, std::memory_order_release);
}

void CacheMutex::unlock() {
    holder_.store(std::thread::id(), std::memory_order_release);
    mu_.unlock();
}

}  // namespace kvfold
