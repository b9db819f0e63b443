// Array conversion and shape checks shared by the bindings: any array-like in, C-order float32
// out, and error messages that name the argument, the expected shape and the one received.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "kvfold/kvfold.hpp"

namespace kvfold_py {

namespace py = pybind11;

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

using kvfold::shape_str;
std::vector<int64_t> shape_of(const py::array& a);
// Shape checks on the hot path allocate nothing (shape_of is for error messages).
bool shape_is(const py::array& a, std::initializer_list<int64_t> dims);
// Any array-like of real numbers as a C-contiguous float32 array; no copy when it already is one.
FloatArray as_floats(const char* name, const py::handle& obj);
// Checks a token block: (B, H, d) for one token or (B, H, T, d). Returns T, or 0 for the 3-D form.
int64_t check_tokens(const char* name, const py::array& a, int64_t B, int64_t H, int64_t d, const char* heads,
                     const char* dim, bool allow_single = true);
std::string type_name(const py::handle& obj);
py::array_t<float> copy_floats(std::vector<py::ssize_t> shape, const float* src);
// A new C-order float32 array, made straight through NumPy's C API.
py::array_t<float> new_floats(std::initializer_list<py::ssize_t> shape);
// An out= array must be exactly what the result would be: float32, C order, writable.
float* check_out(const py::object& out, std::initializer_list<int64_t> shape);
// Whether two C-contiguous arrays share any byte (an out= array that is also an input).
bool overlaps(const py::array& a, const py::array& b);
std::vector<int64_t> read_rows(const py::object& rows, const char* name = "rows");

}  // namespace kvfold_py
