// Slots in 16 bits: a fold updates float32 rows and rounds them back.
#include "rule.hpp"

#include "attention.hpp"
#include "scratch.hpp"

namespace kvfold {

void Rule::SlotEdit::widen() {
    const int64_t dk = rule_.dims_.dk, dv = rule_.dims_.dv;
    k_ = scratch<SlotEdit>(static_cast<size_t>(dk + dv));  // folds of different lanes run on different threads
    v_ = k_ + dk;
    load_row(k_, key_, dk, rule_.slot_dtype_);
    load_row(v_, value_, dv, rule_.slot_dtype_);
}

void Rule::SlotEdit::narrow() {
    store_row(key_, k_, rule_.dims_.dk, rule_.slot_dtype_);
    store_row(value_, v_, rule_.dims_.dv, rule_.slot_dtype_);
}

}  // namespace kvfold
