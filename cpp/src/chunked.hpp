// Chunk-parallel folding of a matrix memory (the linear-attention family): n pairs folded one
// after another, each followed by reads of the memory, computed as small matrix products instead
// of n sweeps over S. See chunked.cpp for the algebra.
#pragma once

#include <cstdint>

namespace kvfold {

class Requests;  // platform.hpp

// One run of pairs for fold_chunked: S (d_k x d_v) takes pair i = (k_i, v_i) with its gates, for
// i = 0 .. n-1, per token t:
//   S_t = diag(exp(g_t)) S_{t-1} + k_t u_t^T,  u_t = v_t, or for the delta rules
//   u_t = beta_t (v_t - (diag(exp(g_t)) S_{t-1})^T k_t),
// and query j of pair t reads o = scale q^T S_t (divided by q^T z_t + eps when z is given, with
// z_t = z_{t-1} + k_t; no decay and no delta then).
struct ChunkInput {
    int64_t n = 0, dk = 0, dv = 0;
    const float* k = nullptr;  // n rows of d_k, k_row apart, features already applied
    const float* v = nullptr;  // n rows of d_v, v_row apart
    int64_t k_row = 0, v_row = 0;
    const float* decay = nullptr;  // log decays, n x d_k when decay_per_key, else n; null: none
    bool decay_per_key = false;
    const float* beta = nullptr;  // n; null: not a delta rule
    const float* q = nullptr;     // query j of pair t at q + j * q_head + t * q_row (d_k floats)
    int64_t nq = 0, q_row = 0, q_head = 0;
    float* out = nullptr;  // its answer at out + j * out_head + t * out_row (d_v floats)
    int64_t out_row = 0, out_head = 0;
    float scale = 1;
    float* S = nullptr;  // d_k x d_v, row-major
    float* z = nullptr;  // d_k, normalized linear attention only
    float eps = 0;
    Requests* ahead = nullptr;  // memory wanted next (the next run's rows): requested as the products go
};

void fold_chunked(const ChunkInput& in);

// Pairs per chunk (set_chunk_size in kvfold.hpp).
int64_t chunk_size();

}  // namespace kvfold
