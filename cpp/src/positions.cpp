#include "positions.hpp"

#include <string>

namespace kvfold {

int64_t last_position(const MemoryCache::Impl& c, int64_t b) { return c.last_pos[b]; }

void check_positions(const MemoryCache::Impl& c, const Positions& p) {
    for (int64_t b = 0; b < c.cfg.batch_size; ++b)
        for (int64_t t = 0; t < p.T; ++t)
            if (p.at(b, t) < 0)
                throw ValueError("positions: expected integers >= 0, got " + std::to_string(p.at(b, t)) + " at row " +
                                 std::to_string(b) + ", token " + std::to_string(t));
    for (int64_t b = 0; b < c.cfg.batch_size; ++b) {
        int64_t last = last_position(c, b);
        for (int64_t t = 0; t < p.T; ++t) {
            const int64_t x = p.at(b, t);
            if (x < last)
                throw ValueError("positions: row " + std::to_string(b) + " goes backwards, from " +
                                 std::to_string(last) + " to " + std::to_string(x) + "; positions never decrease");
            last = x;
        }
    }
}

void record_positions(MemoryCache::Impl& c, const int64_t* given, int64_t T) {
    for (int64_t b = 0; b < c.cfg.batch_size; ++b) c.last_pos[b] = given ? given[b * T + T - 1] : c.length[b] - 1;
}

}  // namespace kvfold
