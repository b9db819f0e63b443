// The few things each compiler or OS spells differently: overflow-checked arithmetic, a prefetch
// hint, aligned allocation and the machine's memory. GCC and Clang (Linux, macOS, musl) take the
// builtins; MSVC (Windows) takes the portable branches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#if defined(_WIN32)
#include <malloc.h>
#endif
#if defined(_MSC_VER) && !defined(__clang__) && defined(_M_X64)
#include <immintrin.h>
#endif

namespace kvfold {

// *out = a * b (or a + b); true when the exact result does not fit in T.
template <class T>
bool mul_overflow(T a, T b, T* out) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_mul_overflow(a, b, out);
#else
    static_assert(std::is_unsigned<T>::value, "mul_overflow: unsigned types only without the builtin");
    *out = a * b;
    return a != 0 && *out / a != b;
#endif
}

template <class T>
bool add_overflow(T a, T b, T* out) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_add_overflow(a, b, out);
#else
    if (std::is_unsigned<T>::value) {
        *out = a + b;
        return *out < a;
    }
    if ((b > 0 && a > std::numeric_limits<T>::max() - b) || (b < 0 && a < std::numeric_limits<T>::min() - b))
        return true;
    *out = a + b;
    return false;
#endif
}

// Asks for the cache line at p ahead of a read (into L2 and closer).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p, 0, 2);
#elif defined(_M_X64)
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
    (void)p;
#endif
}

// Asks for the lines of [p, p + bytes) into L1, for data read within about a microsecond: with
// prefetch()'s hint, into L2, such reads still waited. Past the end of a buffer it never faults.
inline void prefetch_l1(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (size_t i = 0; i < bytes; i += 64) {
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(c + i, 0, 3);
#elif defined(_M_X64)
        _mm_prefetch(c + i, _MM_HINT_T0);
#endif
    }
}

// Ranges of memory wanted soon, requested a few cache lines at a time between pieces of other
// work. A burst of hundreds of requests stalls the core until the first ones arrive (each holds a
// line fill buffer for its trip to memory); spread out, they arrive while the work goes on.
class Requests {
   public:
    void add(const void* p, size_t bytes) {
        if (count_ < kRanges && bytes) ranges_[count_++] = {static_cast<const char*>(p), bytes};
    }
    // The next `lines` cache lines (fewer at the end).
    void some(int lines) {
        for (; lines > 0 && at_ < count_; --lines) {
            prefetch(ranges_[at_].p + offset_);
            offset_ += 64;
            if (offset_ >= ranges_[at_].bytes) ++at_, offset_ = 0;
        }
    }
    void rest() { some(std::numeric_limits<int>::max()); }

   private:
    static constexpr int kRanges = 16;  // more are left out: these are hints
    struct Range {
        const char* p;
        size_t bytes;
    };
    Range ranges_[kRanges] = {};
    int count_ = 0, at_ = 0;
    size_t offset_ = 0;
};

// Memory aligned to `align` (a power of two, a multiple of sizeof(void*)), or null; release it
// with aligned_free.
inline void* aligned_alloc_bytes(size_t align, size_t n) {
#if defined(_WIN32)
    return _aligned_malloc(n, align);
#else
    void* p = nullptr;
    return posix_memalign(&p, align, n) == 0 ? p : nullptr;
#endif
}

inline void aligned_free(void* p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    std::free(p);
#endif
}

// Bytes of physical memory, or SIZE_MAX when the OS does not say.
size_t physical_memory();

// The bytes this process may still allocate, as far as kvfold can tell, and what limits them: the
// machine's memory, a cgroup's memory limit, the address-space and data rlimits.
// `what` is a string literal: the value read once is a static that threads still running at exit
// may copy, so it must have nothing for a destructor to free.
struct MemoryLimit {
    size_t bytes = SIZE_MAX;
    const char* what = "this machine's memory";
    void at_most(size_t n, const char* why) {
        if (n < bytes) bytes = n, what = why;
    }
};
MemoryLimit memory_limit();

}  // namespace kvfold
