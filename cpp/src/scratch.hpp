// Per-thread scratch for the hot paths: a buffer that grows to the largest size asked of it, then
// never allocates again.
#pragma once

#include <cstddef>
#include <vector>

namespace kvfold {

// n floats of this thread's scratch for Owner (any type that names the user). Each owner has a
// buffer of its own, so a caller's scratch stays valid while the code it calls (a rule's fold
// under the cache's) takes its own; the next call for the same owner on this thread reuses it.
template <class Owner>
float* scratch(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

}  // namespace kvfold
