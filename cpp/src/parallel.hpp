// Splits independent work items (lanes: batch row x KV head) over a pool of worker threads.
//
// Every item is computed the same way whichever thread runs it, so results never depend on the
// thread count. One thread never pays for the pool: a job too small to share, or any job when the
// thread count is 1, runs straight on the calling thread, with no lock, no atomic write and no
// allocation.
#pragma once

#include <cstdint>

#include "kvfold/kvfold.hpp"  // set_num_threads, get_num_threads

namespace kvfold {

// A borrowed callable fn(begin, end): no copy, no allocation.
class RangeFn {
   public:
    template <class F>
    explicit RangeFn(F& f)
        : obj_(&f), call_([](void* o, int64_t begin, int64_t end) { (*static_cast<F*>(o))(begin, end); }) {}
    void operator()(int64_t begin, int64_t end) const { call_(obj_, begin, end); }

   private:
    void* obj_;
    void (*call_)(void*, int64_t, int64_t);
};

namespace detail {
bool worth_sharing(int64_t n, double flops_per_item);  // more than one thread and enough work
void run_shared(int64_t n, const RangeFn& fn);

}  // namespace detail

// Runs fn(begin, end) over [0, n) in contiguous pieces. `flops_per_item` estimates the work of one
// item, which decides whether waking other threads pays.
template <class F>
void parallel_for(int64_t n, double flops_per_item, F&& fn) {
    if (n <= 0) return;
    if (detail::worth_sharing(n, flops_per_item))
        detail::run_shared(n, RangeFn(fn));
    else
        fn(int64_t(0), n);
}

}  // namespace kvfold
