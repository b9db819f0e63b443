// Rules cross the binding as (kind, arrays, options, fn) tuples; this converts them to and from
// the core's RuleSpec, and wraps a rules.Custom function as the core's CustomFold.
#pragma once

#include <pybind11/pybind11.h>

#include "kvfold/kvfold.hpp"

namespace kvfold_py {

namespace py = pybind11;

kvfold::CustomFold custom_fold(const py::object& fn);
kvfold::RuleSpec make_spec(const py::tuple& spec);
py::tuple spec_tuple(const kvfold::RuleSpec& s);

}  // namespace kvfold_py
