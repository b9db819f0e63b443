// Text shared by the error messages of the core and of the Python module.
#include <string>
#include <vector>

#include "kvfold/kvfold.hpp"

namespace kvfold {

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace kvfold
