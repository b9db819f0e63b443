#include "parallel.hpp"

namespace kvfold {

void parallel_for(int64_t n, double, const std::function<void(int64_t, int64_t)>& fn) {
    if (n > 0) fn(0, n);
}

void set_num_threads(int) {}
int get_num_threads() { return 1; }

}  // namespace kvfold
