// Calls in flight per cache, from sizing their arrays by its batch size until they return; read
// and written with the GIL held. A reorder that changes the batch size is refused while any is.
#pragma once

#include <cstdint>
#include <vector>

#include "kvfold/kvfold.hpp"

namespace kvfold_py {

// Counts a call on a cache in flight for its lifetime.
struct InFlight {
    const kvfold::MemoryCache* cache;
    explicit InFlight(const kvfold::MemoryCache& c);
    ~InFlight();
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
};

// MemoryCache.reorder: new row r is old row indices[r]; a change of batch size only while no other
// call is in flight.
void reorder(kvfold::MemoryCache& c, const std::vector<int64_t>& indices);

}  // namespace kvfold_py
