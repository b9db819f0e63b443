#include "arrays.hpp"

#include <cfloat>
#include <cmath>

namespace kvfold_py {

std::vector<int64_t> shape_of(const py::array& a) { return std::vector<int64_t>(a.shape(), a.shape() + a.ndim()); }

bool shape_is(const py::array& a, std::initializer_list<int64_t> dims) {
    if (a.ndim() != static_cast<py::ssize_t>(dims.size())) return false;
    const py::ssize_t* s = a.shape();
    for (int64_t d : dims)
        if (*s++ != d) return false;
    return true;
}

namespace {

// A numpy.ma.MaskedArray converts to its data with the mask dropped: refused rather than misread.
// Only an object that is not a plain ndarray is looked at, and numpy.ma is taken from the loaded
// modules (any masked array means it is loaded), never imported here: an import could wait on a
// lock that another thread holds together with the GIL.
void refuse_masked(const char* name, const py::handle& obj) {
    if (Py_TYPE(obj.ptr()) == reinterpret_cast<PyTypeObject*>(py::detail::npy_api::get().PyArray_Type_)) return;
    PyObject* ma = PyDict_GetItemString(PyImport_GetModuleDict(), "numpy.ma");  // borrowed
    if (!ma) return;
    py::object masked = py::reinterpret_borrow<py::object>(ma).attr("MaskedArray");
    if (PyObject_IsInstance(obj.ptr(), masked.ptr()) == 1)
        throw kvfold::TypeError(std::string(name) +
                                ": expected a plain array, got a numpy.ma.MaskedArray, whose mask "
                                "would be ignored (use .filled(value) or .compressed() first)");
}

}  // namespace

bool overlaps(const py::array& a, const py::array& b) {
    const char* pa = static_cast<const char*>(a.data());
    const char* pb = static_cast<const char*>(b.data());
    return a.nbytes() && b.nbytes() && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

FloatArray as_floats(const char* name, const py::handle& obj) {
    refuse_masked(name, obj);
    if (py::isinstance<FloatArray>(obj)) {
        auto a = py::reinterpret_borrow<py::array>(obj);
        if (a.flags() & py::array::c_style) return py::reinterpret_borrow<FloatArray>(obj);
    }
    py::array a;
    try {
        a = py::array::ensure(obj);
    } catch (py::error_already_set&) {
    }
    if (!a) throw kvfold::TypeError(std::string(name) + ": expected a numeric array, got " + type_name(obj));
    char kind = a.dtype().kind();
    if (kind != 'f' && kind != 'i' && kind != 'u') {
        // None, a string, a list of objects: no dtype of the caller's to name, so name what was passed
        if (!py::isinstance<py::array>(obj) && (kind == 'O' || kind == 'U' || kind == 'S'))
            throw kvfold::TypeError(std::string(name) + ": expected a numeric array, got " +
                                    (obj.is_none() ? std::string("None") : type_name(obj)));
        throw kvfold::TypeError(std::string(name) + ": expected real numbers (a float or integer dtype), got dtype " +
                                std::string(py::str(a.dtype())));
    }
    if (kind == 'f' && a.itemsize() > 4) {
        // Narrowed here rather than by NumPy, which warns on overflow: values beyond float32 become
        // +-Inf, which the finite check then reports by index.
        auto wide = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
        if (!wide)
            throw kvfold::ValueError(std::string(name) + ": could not convert dtype " +
                                     std::string(py::str(a.dtype())) + " to float32");
        FloatArray out(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
        const double* src = wide.data();
        float* dst = out.mutable_data();
        for (py::ssize_t i = 0; i < wide.size(); ++i) {
            double x = src[i];
            dst[i] = x > FLT_MAX ? INFINITY : x < -FLT_MAX ? -INFINITY : static_cast<float>(x);
        }
        return out;
    }
    auto out = FloatArray::ensure(a);
    if (!out)
        throw kvfold::ValueError(std::string(name) + ": could not convert dtype " + std::string(py::str(a.dtype())) +
                                 " to float32");
    return out;
}

int64_t check_tokens(const char* name, const py::array& a, int64_t B, int64_t H, int64_t d, const char* heads,
                     const char* dim, bool allow_single) {
    const py::ssize_t n = a.ndim(), *s = a.shape();
    bool ok3 = allow_single && n == 3 && s[0] == B && s[1] == H && s[2] == d;
    bool ok4 = n == 4 && s[0] == B && s[1] == H && s[3] == d;
    if (ok4 && s[2] == 0)
        throw kvfold::ValueError(std::string(name) + ": expected at least one token (T >= 1), got shape " +
                                 shape_str(shape_of(a)));
    if (ok3) return 0;
    if (ok4) return s[2];
    std::string want = "(B=" + std::to_string(B) + ", " + heads + "=" + std::to_string(H) + ", ";
    std::string msg = std::string(name) + ": expected shape ";
    if (allow_single) msg += want + dim + "=" + std::to_string(d) + ") for one token or ";
    msg += want + "T, " + dim + "=" + std::to_string(d) + ")" + (allow_single ? " for a block" : "");
    throw kvfold::ValueError(msg + ", got " + shape_str(shape_of(a)));
}

std::string type_name(const py::handle& obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

py::array_t<float> copy_floats(std::vector<py::ssize_t> shape, const float* src) {
    py::array_t<float> a(shape);
    std::copy(src, src + a.size(), a.mutable_data());
    return a;
}

py::array_t<float> new_floats(std::initializer_list<py::ssize_t> shape) {
    auto& api = py::detail::npy_api::get();
    Py_intptr_t dims[8];
    int nd = 0;
    for (py::ssize_t d : shape) dims[nd++] = d;
    PyObject* a = api.PyArray_NewFromDescr_(api.PyArray_Type_, py::dtype::of<float>().release().ptr(), nd, dims,
                                            nullptr, nullptr, 0, nullptr);
    if (!a) throw py::error_already_set();
    return py::reinterpret_steal<py::array_t<float>>(a);
}

// An out= array must be exactly what the result would be: float32, C order, writable.
float* check_out(const py::object& out, std::initializer_list<int64_t> shape) {
    if (!py::isinstance<py::array>(out))
        throw kvfold::TypeError("out: expected a numpy.ndarray, got " + type_name(out));
    auto a = py::reinterpret_borrow<py::array>(out);
    if (!a.dtype().is(py::dtype::of<float>()))
        throw kvfold::TypeError("out: expected dtype float32, got " + std::string(py::str(a.dtype())));
    if (!shape_is(a, shape))
        throw kvfold::ValueError("out: expected shape " + shape_str(shape) + ", got " + shape_str(shape_of(a)));
    if (!(a.flags() & py::array::c_style) || !a.writeable())
        throw kvfold::ValueError("out: expected a writable C-contiguous array");
    return static_cast<float*>(a.mutable_data());
}

std::vector<int64_t> read_rows(const py::object& rows, const char* name) {
    refuse_masked(name, rows);
    py::array a;
    try {
        a = py::array::ensure(rows);
    } catch (py::error_already_set&) {
    }
    if (!a || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u' && a.size() > 0))
        throw kvfold::TypeError(std::string(name) + ": expected a sequence of integer row indices, got " +
                                std::string(py::str(py::repr(rows))));
    if (a.ndim() == 0)
        throw kvfold::TypeError(std::string(name) + ": expected a sequence of integer row indices, got a single " +
                                type_name(rows) + " " + std::string(py::str(py::repr(rows))) + " (write [" +
                                std::string(py::str(py::repr(rows))) + "] for one row)");
    if (a.ndim() > 1)
        throw kvfold::ValueError(std::string(name) + ": expected a 1-D sequence, got shape " + shape_str(shape_of(a)));
    auto r = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    return std::vector<int64_t>(r.data(), r.data() + r.size());
}

}  // namespace kvfold_py
