// Slots in 16 bits: a fold updates float32 rows and rounds them back.
#include "rule.hpp"

#include <vector>

#include "attention.hpp"

namespace kvfold {

Rule::SlotEdit::SlotEdit(Rule& rule, int64_t lane, int64_t s)
    : rule_(rule),
      key_(rule.slot_k_.lane(lane) + s * rule.dims_.dk * rule.slot_bytes()),
      value_(rule.slot_v_.lane(lane) + s * rule.dims_.dv * rule.slot_bytes()) {
    const DType t = rule.slot_dtype();
    if (t == DType::float32) {
        k_ = static_cast<float*>(key_);
        v_ = static_cast<float*>(value_);
        return;
    }
    thread_local std::vector<float> rows;  // folds of different lanes run on different threads
    rows.resize(static_cast<size_t>(rule.dims_.dk + rule.dims_.dv));
    k_ = rows.data();
    v_ = rows.data() + rule.dims_.dk;
    load_row(k_, key_, rule.dims_.dk, t);
    load_row(v_, value_, rule.dims_.dv, t);
}

void Rule::SlotEdit::store() {
    const DType t = rule_.slot_dtype();
    if (t == DType::float32) return;
    store_row(key_, k_, rule_.dims_.dk, t);
    store_row(value_, v_, rule_.dims_.dv, t);
}

}  // namespace kvfold
