// Calls in flight per cache (in_flight.hpp).
#include "in_flight.hpp"

#include <string>
#include <utility>

#include "gil.hpp"

namespace kvfold_py {

using kvfold::MemoryCache;

namespace {

// A short list: it holds one entry per cache that some thread is calling right now.
std::vector<std::pair<const MemoryCache*, int>>& calls_in_flight() {
    static auto* calls = new std::vector<std::pair<const MemoryCache*, int>>;  // never destroyed, as in dispatch.cpp
    return *calls;
}
bool in_flight(const MemoryCache& c) {
    for (const auto& entry : calls_in_flight())
        if (entry.first == &c) return true;
    return false;
}

}  // namespace

InFlight::InFlight(const MemoryCache& c) : cache(&c) {
    for (auto& entry : calls_in_flight())
        if (entry.first == cache) {
            ++entry.second;
            return;
        }
    calls_in_flight().emplace_back(cache, 1);
}

InFlight::~InFlight() {
    auto& calls = calls_in_flight();
    for (auto& entry : calls)
        if (entry.first == cache && --entry.second == 0) {
            entry = calls.back();
            calls.pop_back();
            return;
        }
}

void reorder(MemoryCache& c, const std::vector<int64_t>& indices) {
    const auto n = static_cast<int64_t>(indices.size());
    if (n == c.config().batch_size) {  // same shape: other threads' calls stay valid
        InFlight busy(c);              // and no other thread may change the batch meanwhile
        ReleaseGil release;
        c.reorder(indices.data(), n);
        return;
    }
    // The GIL stays held, so no call can size its arrays by the old batch size meanwhile.
    if (in_flight(c))
        throw kvfold::ValueError("indices: cannot change the batch size from " + std::to_string(c.config().batch_size) +
                                 " to " + std::to_string(n) + " while another thread is using this cache");
    c.reorder(indices.data(), n);
}

}  // namespace kvfold_py
