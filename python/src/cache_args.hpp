// The arguments of MemoryCache's methods, read and checked: tokens, gates, positions, queries and
// the out= array.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "arrays.hpp"
#include "kvfold/kvfold.hpp"

namespace kvfold_py {

struct Tokens {
    FloatArray k, v;
    int64_t T;    // tokens per row
    bool single;  // given as (B, H, d)
};

// k and v: (B, H, d) for one token or (B, H, T, d) for a block, the same tokens in both.
Tokens read_tokens(const kvfold::MemoryCache& c, const py::handle& k_obj, const py::handle& v_obj);

// Per-token gates of the matrix rules, shaped like the tokens: decay (B, H[, T]) per head or
// (B, H[, T], d_k) per key dimension, beta (B, H[, T]).
struct Gates {
    py::object decay, beta;  // the arrays behind view, kept alive (a default FloatArray would allocate one)
    kvfold::TokenGates view;
};

Gates read_gates(const kvfold::MemoryCache& c, const py::object& decay, const py::object& beta, const Tokens& t);

// positions=: integers (B,) for one token, (B, T) for a block, as int64; null when not given.
using PositionArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
const int64_t* read_positions(const kvfold::MemoryCache& c, const py::object& obj, const Tokens& t,
                              PositionArray& keep);

// q (B, Hq, d_k) of one token.
FloatArray read_query(const kvfold::MemoryCache& c, const py::handle& q_obj);

// The (B, Hq, d_v) result of attend and step: a new array, or the caller's out= array checked.
struct Output {
    py::array array;
    float* data;
};

Output output(const kvfold::MemoryCache& c, const py::object& out);

// An input that shares memory with out= (attend(q, out=q)) is read from a copy: the work writes out
// while it still reads its inputs.
void unalias(FloatArray& x, const Output& o);

}  // namespace kvfold_py
