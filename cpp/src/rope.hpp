// RoPE in the cache: the angles of a position and the rotation of a key by them.
#pragma once

#include <cstdint>
#include <vector>

#include "kvfold/kvfold.hpp"

namespace kvfold {

class Rope {
   public:
    Rope() = default;
    // Checks `rope` against the head size (ValueError naming theta, dim or frequencies); an empty Rope when
    // rope.theta == 0.
    Rope(const RoPE& rope, int64_t head_dim);

    bool on() const { return pairs_ > 0; }
    int64_t pairs() const { return pairs_; }  // pairs of dimensions rotated

    // cos and sin (pairs() floats each) of position p's angles, p * f_i (see RoPE), computed in
    // float64 and rounded once.
    void angles(double p, float* cos, float* sin) const;
    // x (a key) turned by the angles whose cos and sin are given.
    void rotate(float* x, const float* cos, const float* sin) const;
    // x turned by the angles of position p (p may be negative or fractional).
    void rotate_at(float* x, double p) const;

   private:
    uint64_t id_ = 0;  // which RoPE the kept angles belong to
    int64_t pairs_ = 0;
    bool interleaved_ = false;
    std::vector<double> inv_freq_;
};

}  // namespace kvfold
