// Splits independent work items (lanes) over the worker threads.
#pragma once

#include <cstdint>
#include <functional>

namespace kvfold {

// Runs fn(begin, end) over [0, n) in contiguous pieces. `flops_per_item` estimates the work of one
// item; small jobs run on the calling thread so one thread never pays for the pool.
void parallel_for(int64_t n, double flops_per_item, const std::function<void(int64_t, int64_t)>& fn);

void set_num_threads(int n);
int get_num_threads();

}  // namespace kvfold
