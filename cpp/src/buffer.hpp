// Aligned storage split into equal per-lane slices. A lane is one (batch row, KV head).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "kvfold/kvfold.hpp"
#include "platform.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvfold {

constexpr size_t kAlign = 64;
constexpr size_t kHugePage = size_t(2) << 20;

inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// What a buffer holds, for checking a state read from bytes: values that finite inputs keep finite
// (rows of d values in a storage dtype, float32 or float64 numbers, float32 attention scores, NaN
// for a pair not scored yet), or anything else.
struct Holds {
    enum Kind : uint8_t { other, rows, f32, f64, scores } kind = other;
    DType dtype = DType::float32;  // of the rows
    int64_t d = 0;                 // values per row
};
inline Holds rows_of(DType dtype, int64_t d) { return {Holds::rows, dtype, d}; }
constexpr Holds kFloat32{Holds::f32}, kFloat64{Holds::f64}, kScores{Holds::scores};

// Every buffer of a cache is a LaneBuffer: sized first (plan), allocated once (allocate), never
// grown. Reset, copy, reorder and the state format treat all of them alike.
class LaneBuffer {
   public:
    LaneBuffer() = default;
    LaneBuffer(const LaneBuffer&) = delete;
    LaneBuffer& operator=(const LaneBuffer&) = delete;
    ~LaneBuffer() { aligned_free(data_); }

    void plan(int64_t lanes, size_t bytes_per_lane, Holds holds = {}) {
        holds_ = holds;
        lanes_ = lanes;
        lane_bytes_ = bytes_per_lane;
        stride_ = bytes_per_lane ? round_up(bytes_per_lane, kAlign) : 0;
    }
    // SIZE_MAX when the size does not fit in memory at all.
    size_t planned_bytes() const {
        size_t n;
        return mul_overflow(stride_, static_cast<size_t>(lanes_), &n) ? SIZE_MAX : n;
    }

    void release() {
        aligned_free(data_);
        data_ = nullptr;
    }

    void allocate() {
        release();
        size_t n = planned_bytes();
        if (n == 0) return;
        // Buffers of megabytes (long windows) are streamed through at every step: on 2 MB pages
        // the walk does not miss the TLB every 4 KB.
        const bool large = n >= kHugePage;
        void* p = aligned_alloc_bytes(large ? kHugePage : kAlign, n);
        if (!p) throw std::bad_alloc();
        data_ = static_cast<uint8_t*>(p);
#if defined(MADV_HUGEPAGE)
        // Only whole huge pages inside the buffer, so it never holds more memory than it says.
        if (large) madvise(data_, n / kHugePage * kHugePage, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
        std::memset(data_, 0, n);
    }

    int64_t lanes() const { return lanes_; }
    size_t stride() const { return stride_; }
    size_t lane_bytes() const { return lane_bytes_; }  // without the alignment padding
    Holds holds() const { return holds_; }
    size_t bytes() const { return data_ ? planned_bytes() : 0; }
    uint8_t* data() { return data_; }
    const uint8_t* data() const { return data_; }

    template <class T = uint8_t>
    T* lane(int64_t i) {
        return reinterpret_cast<T*>(data_ + stride_ * static_cast<size_t>(i));
    }
    template <class T = uint8_t>
    const T* lane(int64_t i) const {
        return reinterpret_cast<const T*>(data_ + stride_ * static_cast<size_t>(i));
    }
    void zero_lane(int64_t i) {
        if (stride_) std::memset(lane(i), 0, stride_);
    }
    // Copies lane `from` of `src` (a buffer planned alike, up to its lane count) into lane `to`.
    void copy_lane(int64_t to, const LaneBuffer& src, int64_t from) {
        if (stride_) std::memcpy(lane(to), src.lane(from), stride_);
    }
    void swap(LaneBuffer& o) noexcept {
        std::swap(data_, o.data_);
        std::swap(lanes_, o.lanes_);
        std::swap(lane_bytes_, o.lane_bytes_);
        std::swap(stride_, o.stride_);
        std::swap(holds_, o.holds_);
    }

   private:
    uint8_t* data_ = nullptr;
    int64_t lanes_ = 0;
    size_t lane_bytes_ = 0;
    size_t stride_ = 0;
    Holds holds_;
};

}  // namespace kvfold
