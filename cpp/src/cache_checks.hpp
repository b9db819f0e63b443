// Checks of a cache's configuration and inputs, made before anything changes: each throws a
// ValueError naming the argument, what was expected and what was received.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "cache_impl.hpp"

namespace kvfold {

// An array's shape (at most four axes), held without a heap allocation: a decode step checks
// several.
class ArrayShape {
   public:
    ArrayShape(std::initializer_list<int64_t> axes) : n_(std::min(axes.size(), sizeof axes_ / sizeof *axes_)) {
        std::copy_n(axes.begin(), n_, axes_);
    }
    const int64_t* begin() const { return axes_; }
    const int64_t* end() const { return axes_ + n_; }
    std::vector<int64_t> axes() const { return {begin(), end()}; }

   private:
    int64_t axes_[4] = {};
    size_t n_;
};

std::string number_str(double x);
std::string describe(const Config& c);
void check_range(const char* name, int64_t value, int64_t lo, int64_t hi);
// Row indices in [0, batch), `count` of them (none only when allow_empty).
void check_rows(const char* name, const int64_t* rows, int64_t count, int64_t batch, bool allow_empty);
// Finite values (NaN or Inf named by their index in `shape`).
void check_finite(const char* name, const float* x, const ArrayShape& shape);

// A block of T tokens (k, v and the per-token gates the rule needs). values = false leaves k and v
// alone (the matrix model then checks them as it folds them: matrix_model.hpp).
void check_tokens(const MemoryCache::Impl& c, const float* k, const float* v, int64_t T, const TokenGates& gates,
                  bool values = true);
// Queries: (B, Hq, d_k) when T == 0, else (B, Hq, T, d_k).
void check_queries(const MemoryCache::Impl& c, const float* q, int64_t T);

}  // namespace kvfold
