// Slots in 16 or 8 bits: a fold updates float32 rows and rounds them back.
#include "rule.hpp"

#include <cstring>

#include "attention.hpp"
#include "scratch.hpp"

namespace kvfold {

void SlotRule::SlotEdit::widen() {
    const int64_t dk = rule_.dims_.dk, dv = rule_.dims_.dv;
    k_ = scratch<SlotEdit>(static_cast<size_t>(dk + dv));  // folds of different lanes run on different threads
    v_ = k_ + dk;
    load_row(k_, key_, dk, rule_.slot_dtype_);
    load_row(v_, value_, dv, rule_.slot_dtype_);
}

void SlotRule::SlotEdit::narrow() {
    store_row(key_, k_, rule_.dims_.dk, rule_.slot_dtype_);
    store_row(value_, v_, rule_.dims_.dv, rule_.slot_dtype_);
}

void SlotRule::set_position(int64_t lane, int64_t s, const float* key, double position) {
    float* row = scratch<Rope>(static_cast<size_t>(dims_.dk));  // key may be a SlotEdit's scratch
    std::memcpy(row, key, sizeof(float) * dims_.dk);
    dims_.rope->rotate_at(row, position);
    store_row(read_k_.lane(lane) + s * key_bytes(), row, dims_.dk, slot_dtype_);
    slot_pos_.lane<double>(lane)[s] = position;
}

void SlotRule::move_positions(int64_t lane, int64_t to, int64_t from, int64_t n) {
    if (!keeps_positions() || n <= 0) return;
    const size_t row = static_cast<size_t>(key_bytes());
    std::memmove(read_k_.lane(lane) + to * row, read_k_.lane(lane) + from * row, n * row);
    double* pos = slot_pos_.lane<double>(lane);
    std::memmove(pos + to, pos + from, sizeof(double) * n);
}

}  // namespace kvfold
