#include "retention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "names.hpp"

namespace kvfold {

constexpr const char* kRetainNames[] = {"fifo", "tova", "h2o"};  // in Retain's order

Retain parse_retain(const std::string& name) {
    return from_name<Retain>(kRetainNames, name, "retain", "one of 'fifo', 'tova', 'h2o'");
}

const char* retain_name(Retain r) { return to_name(kRetainNames, r); }

int64_t checked_recent(const Config& c) {
    if (c.retain != Retain::fifo && c.retain != Retain::tova && c.retain != Retain::h2o)
        throw ValueError("retain: expected fifo, tova or h2o, got code " + std::to_string(static_cast<int>(c.retain)));
    if (c.retain != Retain::h2o) {
        if (c.recent != -1)
            throw ValueError("recent: only retain='h2o' keeps a recent part, got recent=" + std::to_string(c.recent) +
                             " with retain='" + retain_name(c.retain) + "'");
        return 0;
    }
    if (c.recent == -1) return c.window / 2;
    if (c.recent < 0 || c.recent > c.window)
        throw ValueError("recent: expected an integer in [0, window=" + std::to_string(c.window) + "], got " +
                         std::to_string(c.recent));
    return c.recent;
}

void check_memory_options(const MemoryCache::Impl& c) {
    const std::string& kind = c.spec.kind;
    if (c.rope.on() && !(c.slots && c.slots->averages_pairs()))
        throw ValueError("rope: the slots of the " + kind +
                         " rule are not averages of folded pairs, so they have no position to rotate at; rope works "
                         "with the rules whose slots are");
    if (c.retain != Retain::fifo && (c.matrix || c.rows))
        throw ValueError(std::string("retain: '") + retain_name(c.retain) + "' chooses which pair the " + kind +
                         " rule folds by attention weight; it works with the summary rules that fold pair by pair "
                         "(not the matrix rules, nor Custom), so expected retain='fifo' with this rule");
}

WindowPlace enter_window(MemoryCache::Impl& c, int64_t lane, int64_t j) {
    const int64_t W = c.cfg.window;
    if (c.retain == Retain::fifo) return {j % W, j >= W};
    int64_t* order = c.win_order.lane<int64_t>(lane);
    float* score = c.win_score.lane<float>(lane);
    const float unscored = std::numeric_limits<float>::quiet_NaN();
    if (j < W) {
        order[j] = j;
        score[j] = unscored;
        return {j, false};
    }
    // The candidates are the window's pairs, oldest first, then the new one; the new one is unscored,
    // so it is never the lowest, and (scanning the older ones only) it is never chosen.
    const int64_t older = std::min(W, W + 1 - c.recent);
    int64_t e = 0;
    float lowest = std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < older; ++i) {
        const float s = score[order[i]];
        if (s < lowest) lowest = s, e = i;  // NaN (unscored) is never lower; ties keep the oldest
    }
    const int64_t row = order[e];
    std::memmove(order + e, order + e + 1, sizeof(int64_t) * (W - 1 - e));
    order[W - 1] = row;
    score[row] = unscored;
    return {row, true};
}

int64_t window_row(const MemoryCache::Impl& c, int64_t lane, int64_t first, int64_t i) {
    if (c.retain == Retain::fifo) return (first + i) % c.cfg.window;
    return c.win_order.lane<int64_t>(lane)[i];
}

float* window_weights(MemoryCache::Impl& c, int64_t lane, int64_t held) {
    if (c.retain == Retain::fifo || held == 0) return nullptr;
    float* score = c.win_score.lane<float>(lane);
    for (int64_t r = 0; r < held; ++r)
        if (c.retain == Retain::tova || std::isnan(score[r])) score[r] = 0;
    return score;
}

void check_window_order(const MemoryCache::Impl& c) {
    if (c.retain == Retain::fifo || c.cfg.window == 0) return;
    std::vector<uint8_t> seen(static_cast<size_t>(c.cfg.window));
    for (int64_t lane = 0; lane < c.lanes; ++lane) {
        const int64_t held = c.window_held(c.length[lane / c.cfg.num_heads]);
        const int64_t* order = c.win_order.lane<int64_t>(lane);
        std::fill(seen.begin(), seen.end(), 0);
        for (int64_t i = 0; i < held; ++i) {
            if (order[i] < 0 || order[i] >= held || seen[order[i]])
                throw ValueError("the window order of lane " + std::to_string(lane) + " is not a permutation of its " +
                                 std::to_string(held) + " rows");
            seen[order[i]] = 1;
        }
    }
}

}  // namespace kvfold
