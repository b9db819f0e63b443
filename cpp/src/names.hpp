// An enum of the public API spelled by name (DType, Retain): one table of names in the enum's order
// serves both directions.
#pragma once

#include <cstddef>
#include <string>

#include "kvfold/kvfold.hpp"

namespace kvfold {

// The value whose name is `name`; else ValueError "<what>: expected <expected>, got '<name>'".
template <class E, size_t N>
E from_name(const char* const (&names)[N], const std::string& name, const char* what, const char* expected) {
    for (size_t i = 0; i < N; ++i)
        if (name == names[i]) return static_cast<E>(i);
    throw ValueError(std::string(what) + ": expected " + expected + ", got '" + name + "'");
}

// The name of `value`; the first name for a value outside the table.
template <class E, size_t N>
const char* to_name(const char* const (&names)[N], E value) {
    const auto i = static_cast<size_t>(value);
    return i < N ? names[i] : names[0];
}

}  // namespace kvfold
