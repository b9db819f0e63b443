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

// An array's shape (at most four axes), each axis with the name an index into it is printed with
// ("b=0, h=3, t=0, d_k=17": a single token's k has no T axis, so a bare index would mislead),
// held without a heap allocation: a decode step checks several.
struct Axis {
    const char* name;
    int64_t size;
};
class ArrayShape {
   public:
    ArrayShape(std::initializer_list<Axis> axes) : n_(std::min(axes.size(), sizeof axes_ / sizeof *axes_)) {
        std::copy_n(axes.begin(), n_, axes_);
    }
    const Axis* begin() const { return axes_; }
    const Axis* end() const { return axes_ + n_; }
    std::vector<int64_t> sizes() const;

   private:
    Axis axes_[4] = {};
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
