#include "rule_spec.hpp"

#include <memory>

#include "arrays.hpp"
#include "gil.hpp"

namespace kvfold_py {

namespace {

// One fold through the user's function (GIL held): copies in, checks what comes back, copies out.
void fold_with(const py::object& fn, const kvfold::CustomCall& c) {
    py::object result =
        fn(copy_floats({c.heads, c.slots, c.dk}, c.mem_k), copy_floats({c.heads, c.slots, c.dv}, c.mem_v),
           copy_floats({c.heads, c.dk}, c.k), copy_floats({c.heads, c.dv}, c.v), c.count);
    if (!(py::isinstance<py::tuple>(result) || py::isinstance<py::list>(result)) || py::len(result) != 2)
        throw kvfold::TypeError("Custom rule: fn must return a pair (new_mem_k, new_mem_v), got " + type_name(result) +
                                (py::isinstance<py::tuple>(result) || py::isinstance<py::list>(result)
                                     ? " of length " + std::to_string(py::len(result))
                                     : ""));
    auto take = [&](const char* name, py::handle x, const std::vector<int64_t>& want, const char* dim) {
        py::array a;
        try {
            a = py::array::ensure(x);
        } catch (py::error_already_set&) {
        }
        if (!a || a.dtype().kind() != 'f')
            throw kvfold::TypeError(std::string("Custom rule: fn's ") + name + " must be a float array, got " +
                                    (a ? "dtype " + std::string(py::str(a.dtype())) : type_name(x)));
        if (shape_of(a) != want)
            throw kvfold::ValueError(std::string("Custom rule: fn's ") + name + " must have shape (H=" +
                                     std::to_string(want[0]) + ", slots=" + std::to_string(want[1]) + ", " + dim + "=" +
                                     std::to_string(want[2]) + "), got " + shape_str(shape_of(a)));
        return as_floats(name, a);
    };
    FloatArray mk = take("new_mem_k", result[py::int_(0)], {c.heads, c.slots, c.dk}, "d_k");
    FloatArray mv = take("new_mem_v", result[py::int_(1)], {c.heads, c.slots, c.dv}, "d_v");
    std::copy(mk.data(), mk.data() + mk.size(), c.mem_k);
    std::copy(mv.data(), mv.data() + mv.size(), c.mem_v);
}

}  // namespace

// rules.Custom: the core calls the user's function with the GIL taken back (the binding released
// it around the work). Copies of a cache share the function object, which is released under the GIL.
kvfold::CustomFold custom_fold(const py::object& fn) {
    if (!PyCallable_Check(fn.ptr())) throw kvfold::TypeError("Custom: fn must be callable, got " + type_name(fn));
    std::shared_ptr<py::object> held(new py::object(fn), [](py::object* f) { with_gil([f] { delete f; }); });
    return [held](const kvfold::CustomCall& c) { with_gil([&] { fold_with(*held, c); }); };
}

kvfold::RuleSpec make_spec(const py::tuple& spec) {
    if (spec.size() != 4) throw kvfold::TypeError("rule: expected a kvfold rule");
    kvfold::RuleSpec s;
    s.kind = spec[0].cast<std::string>();
    for (auto item : spec[1].cast<py::dict>()) {
        auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(item.second);
        if (!a) throw kvfold::TypeError("rule parameter " + item.first.cast<std::string>() + ": expected numbers");
        kvfold::Array arr;
        arr.shape = shape_of(a);
        arr.data.assign(a.data(), a.data() + a.size());
        s.arrays[item.first.cast<std::string>()] = std::move(arr);
    }
    for (auto item : spec[2].cast<py::dict>())
        s.options[item.first.cast<std::string>()] = item.second.cast<std::string>();
    if (s.kind == "custom")
        s.custom = custom_fold(spec[3]);
    else if (!spec[3].is_none())
        throw kvfold::ValueError("rule: only Custom rules take a function, got one for the " + s.kind + " rule");
    return s;
}

py::tuple spec_tuple(const kvfold::RuleSpec& s) {
    py::dict arrays, options;
    for (const auto& [name, a] : s.arrays) {
        py::array_t<double> x(std::vector<py::ssize_t>(a.shape.begin(), a.shape.end()));
        std::copy(a.data.begin(), a.data.end(), x.mutable_data());
        arrays[py::str(name)] = x;
    }
    for (const auto& [name, v] : s.options) options[py::str(name)] = v;
    return py::make_tuple(s.kind, arrays, options, py::none());
}

}  // namespace kvfold_py
