// kvfold._core: the only file that knows about Python. Converts and checks arrays, releases the
// GIL around the work, and turns the core's exceptions into ValueError / TypeError.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

#include "kvfold/kvfold.hpp"

namespace py = pybind11;
using kvfold::MemoryCache;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Releases the GIL around the C++ work and counts the threads inside such a section, which the
// tests read (holding the GIL) to see several caches compute at the same moment. (A Custom rule's
// fold takes the GIL back for its Python call while still counted.)
std::atomic<int> threads_without_gil{0};
struct ReleaseGil {
    py::gil_scoped_release release;
    ReleaseGil() { threads_without_gil.fetch_add(1, std::memory_order_relaxed); }
    ~ReleaseGil() { threads_without_gil.fetch_sub(1, std::memory_order_relaxed); }
    ReleaseGil(const ReleaseGil&) = delete;
    ReleaseGil& operator=(const ReleaseGil&) = delete;
};

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

std::vector<int64_t> shape_of(const py::array& a) { return std::vector<int64_t>(a.shape(), a.shape() + a.ndim()); }

// Shape checks on the hot path allocate nothing (shape_of is for error messages).
bool shape_is(const py::array& a, std::initializer_list<int64_t> dims) {
    if (a.ndim() != static_cast<py::ssize_t>(dims.size())) return false;
    const py::ssize_t* s = a.shape();
    for (int64_t d : dims)
        if (*s++ != d) return false;
    return true;
}

// Any array-like of real numbers as a C-contiguous float32 array; no copy when it already is one.
FloatArray as_floats(const char* name, const py::handle& obj) {
    if (py::isinstance<FloatArray>(obj)) {
        auto a = py::reinterpret_borrow<py::array>(obj);
        if (a.flags() & py::array::c_style) return py::reinterpret_borrow<FloatArray>(obj);
    }
    py::array a;
    try {
        a = py::array::ensure(obj);
    } catch (py::error_already_set&) {
    }
    if (!a)
        throw kvfold::TypeError(std::string(name) + ": expected a numeric array, got " +
                                std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    char kind = a.dtype().kind();
    if (kind != 'f' && kind != 'i' && kind != 'u')
        throw kvfold::TypeError(std::string(name) + ": expected real numbers (a float or integer dtype), got dtype " +
                                std::string(py::str(a.dtype())));
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

// Checks a token block: (B, H, d) for one token or (B, H, T, d). Returns T, or 0 for the 3-D form.
int64_t check_tokens(const char* name, const py::array& a, int64_t B, int64_t H, int64_t d, const char* heads,
                     const char* dim, bool allow_single = true) {
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

// rules.Custom: the core calls the user's function with the GIL taken back (the binding released
// it around the work). Copies of a cache share the function object, which is released under the GIL.
kvfold::CustomFold custom_fold(const py::object& fn) {
    if (!PyCallable_Check(fn.ptr())) throw kvfold::TypeError("Custom: fn must be callable, got " + type_name(fn));
    std::shared_ptr<py::object> held(new py::object(fn), [](py::object* f) {
        py::gil_scoped_acquire gil;
        delete f;
    });
    return [held](const kvfold::CustomCall& c) {
        py::gil_scoped_acquire gil;
        py::object result =
            (*held)(copy_floats({c.heads, c.slots, c.dk}, c.mem_k), copy_floats({c.heads, c.slots, c.dv}, c.mem_v),
                    copy_floats({c.heads, c.dk}, c.k), copy_floats({c.heads, c.dv}, c.v), c.count);
        if (!(py::isinstance<py::tuple>(result) || py::isinstance<py::list>(result)) || py::len(result) != 2)
            throw kvfold::TypeError("Custom rule: fn must return a pair (new_mem_k, new_mem_v), got " +
                                    type_name(result) +
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
                                         std::to_string(want[0]) + ", slots=" + std::to_string(want[1]) + ", " + dim +
                                         "=" + std::to_string(want[2]) + "), got " + shape_str(shape_of(a)));
            return as_floats(name, a);
        };
        FloatArray mk = take("new_mem_k", result[py::int_(0)], {c.heads, c.slots, c.dk}, "d_k");
        FloatArray mv = take("new_mem_v", result[py::int_(1)], {c.heads, c.slots, c.dv}, "d_v");
        std::copy(mk.data(), mk.data() + mk.size(), c.mem_k);
        std::copy(mv.data(), mv.data() + mv.size(), c.mem_v);
    };
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

// A new C-order float32 array, made straight through NumPy's C API: small calls are dominated by
// such overheads, and pybind11's shape containers allocate.
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
        throw kvfold::TypeError("out: expected a numpy.ndarray, got " +
                                std::string(py::str(py::type::handle_of(out).attr("__name__"))));
    auto a = py::reinterpret_borrow<py::array>(out);
    if (!a.dtype().is(py::dtype::of<float>()))
        throw kvfold::TypeError("out: expected dtype float32, got " + std::string(py::str(a.dtype())));
    if (!shape_is(a, shape))
        throw kvfold::ValueError("out: expected shape " + shape_str(shape) + ", got " + shape_str(shape_of(a)));
    if (!(a.flags() & py::array::c_style) || !a.writeable())
        throw kvfold::ValueError("out: expected a writable C-contiguous array");
    return static_cast<float*>(a.mutable_data());
}

struct Tokens {
    FloatArray k, v;
    int64_t T;    // tokens per row
    bool single;  // given as (B, H, d)
};

Tokens read_tokens(const MemoryCache& c, const py::handle& k_obj, const py::handle& v_obj) {
    const auto& g = c.config();
    Tokens t{as_floats("k", k_obj), as_floats("v", v_obj), 0, false};
    int64_t tk = check_tokens("k", t.k, g.batch_size, g.num_heads, g.head_dim, "H", "d_k");
    int64_t tv = check_tokens("v", t.v, g.batch_size, g.num_heads, g.value_dim, "H", "d_v");
    if ((tk == 0) != (tv == 0) || tk != tv)
        throw kvfold::ValueError("v: expected the same tokens as k " + shape_str(shape_of(t.k)) + ", got shape " +
                                 shape_str(shape_of(t.v)));
    t.single = tk == 0;
    t.T = t.single ? 1 : tk;
    return t;
}

// Per-token gates of the matrix rules, shaped like the tokens: decay (B, H[, T]) per head or
// (B, H[, T], d_k) per key dimension, beta (B, H[, T]).
struct Gates {
    py::object decay, beta;  // the arrays behind view, kept alive (a default FloatArray would allocate one)
    kvfold::TokenGates view;
};

Gates read_gates(const MemoryCache& c, const py::object& decay, const py::object& beta, const Tokens& t) {
    if (decay.is_none() && beta.is_none()) return {};  // the common case costs nothing
    const auto& g = c.config();
    std::vector<int64_t> head{g.batch_size, g.num_heads};
    std::string want = "(B=" + std::to_string(g.batch_size) + ", H=" + std::to_string(g.num_heads);
    if (!t.single) {
        head.push_back(t.T);
        want += ", T=" + std::to_string(t.T);
    }
    std::vector<int64_t> key = head;
    key.push_back(g.head_dim);
    const std::string per = t.single ? " for one token" : " for a block";
    Gates out;
    if (!decay.is_none()) {
        FloatArray a = as_floats("decay", decay);
        auto s = shape_of(a);
        if (s != head && s != key)
            throw kvfold::ValueError("decay: expected shape " + want + ") per head or " + want +
                                     ", d_k=" + std::to_string(g.head_dim) + ") per key dimension" + per + ", got " +
                                     shape_str(s));
        out.view.decay = a.data();
        out.view.decay_per_key = s == key;
        out.decay = std::move(a);
    }
    if (!beta.is_none()) {
        FloatArray a = as_floats("beta", beta);
        if (shape_of(a) != head)
            throw kvfold::ValueError("beta: expected shape " + want + ")" + per + ", got " + shape_str(shape_of(a)));
        out.view.beta = a.data();
        out.beta = std::move(a);
    }
    return out;
}

FloatArray read_query(const MemoryCache& c, const py::handle& q_obj) {
    const auto& g = c.config();
    FloatArray q = as_floats("q", q_obj);
    if (!shape_is(q, {g.batch_size, g.num_query_heads, g.head_dim}))
        throw kvfold::ValueError("q: expected shape (B=" + std::to_string(g.batch_size) +
                                 ", Hq=" + std::to_string(g.num_query_heads) + ", d_k=" + std::to_string(g.head_dim) +
                                 "), got " + shape_str(shape_of(q)));
    return q;
}

std::vector<int64_t> read_rows(const py::object& rows, const char* name = "rows") {
    py::array a;
    try {
        a = py::array::ensure(rows);
    } catch (py::error_already_set&) {
    }
    if (!a || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u' && a.size() > 0))
        throw kvfold::TypeError(std::string(name) + ": expected a sequence of integer row indices, got " +
                                std::string(py::str(py::repr(rows))));
    if (a.ndim() > 1)
        throw kvfold::ValueError(std::string(name) + ": expected a 1-D sequence, got shape " + shape_str(shape_of(a)));
    auto r = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    return std::vector<int64_t>(r.data(), r.data() + r.size());
}

// Calls in flight per cache, from sizing their arrays by its batch size until they return; read
// and written with the GIL held. A reorder that changes the batch size is refused while any is.
// A short list: it holds one entry per cache that some thread is calling right now.
std::vector<std::pair<const MemoryCache*, int>>& calls_in_flight() {
    static std::vector<std::pair<const MemoryCache*, int>> calls;
    return calls;
}
bool in_flight(const MemoryCache& c) {
    for (const auto& entry : calls_in_flight())
        if (entry.first == &c) return true;
    return false;
}
struct InFlight {
    const MemoryCache* cache;
    explicit InFlight(const MemoryCache& c) : cache(&c) {
        for (auto& entry : calls_in_flight())
            if (entry.first == cache) {
                ++entry.second;
                return;
            }
        calls_in_flight().emplace_back(cache, 1);
    }
    ~InFlight() {
        auto& calls = calls_in_flight();
        for (auto& entry : calls)
            if (entry.first == cache && --entry.second == 0) {
                entry = calls.back();
                calls.pop_back();
                return;
            }
    }
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
};

void reorder(MemoryCache& c, const std::vector<int64_t>& indices) {
    const auto n = static_cast<int64_t>(indices.size());
    if (n == c.config().batch_size) {  // same shape: other threads' calls stay valid
        InFlight busy(c);              // and no other thread may change the batch meanwhile
        ReleaseGil release;
        c.reorder(indices.data(), n);
        return;
    }
    // The GIL stays held, so no call can size its arrays by the old batch size meanwhile.
    if (in_flight(c))
        throw kvfold::ValueError("indices: cannot change the batch size from " + std::to_string(c.config().batch_size) +
                                 " to " + std::to_string(n) + " while another thread is using this cache");
    c.reorder(indices.data(), n);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "kvfold's C++ core. Use the kvfold package, not this module.";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const kvfold::TypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        }
    });

    m.def("simd_backend", &kvfold::simd_backend, "Name of the SIMD kernels in use: scalar, avx2, avx512 or neon.");
    m.def("available_backends", &kvfold::available_backends, "SIMD backends this machine can run, best last.");
    m.def("_set_simd_backend", &kvfold::set_simd_backend, py::arg("name"));
    m.def(
        "_threads_without_gil", [] { return threads_without_gil.load(std::memory_order_relaxed); },
        "Threads inside kvfold's C++ work with the GIL released, right now (for tests).");
    m.def("_known_backends", &kvfold::known_backends);
    m.def("set_num_threads", &kvfold::set_num_threads, py::arg("num_threads"));
    m.def("get_num_threads", &kvfold::get_num_threads, "Threads a call may use, the calling thread included.");
    m.attr("MAX_THREADS") = kvfold::kMaxThreads;
    m.attr("MAX_CHUNK") = kvfold::kMaxChunk;
    m.def("set_chunk_size", &kvfold::set_chunk_size, py::arg("chunk_size"));
    m.def("get_chunk_size", &kvfold::get_chunk_size, "Tokens per chunk when a matrix rule takes a block.");
    m.def("_set_min_shared_flops", &kvfold::set_min_shared_flops, py::arg("flops"),
          "The least work a call needs before it is shared out; returns the previous value (for tests).");
    m.def(
        "_check_rule", [](const py::tuple& spec) { kvfold::check_rule(make_spec(spec)); }, py::arg("spec"));
    m.attr("__version__") = kvfold::version();

    py::class_<kvfold::Checkpoint>(m, "Checkpoint", "An immutable snapshot of a cache; see MemoryCache.checkpoint.")
        .def_property_readonly("batch_size", [](const kvfold::Checkpoint& cp) { return cp.config().batch_size; })
        .def_property_readonly(
            "length",
            [](const kvfold::Checkpoint& cp) {
                auto l = cp.lengths();
                py::array_t<int64_t> a(static_cast<py::ssize_t>(l.size()));
                std::copy(l.begin(), l.end(), a.mutable_data());
                return a;
            },
            "Tokens seen per row when the checkpoint was taken, (B,) int64.")
        .def_property_readonly("nbytes", &kvfold::Checkpoint::nbytes, "Bytes the checkpoint holds.")
        .def_property_readonly("_rule_spec", [](const kvfold::Checkpoint& cp) { return spec_tuple(cp.rule()); });

    py::class_<MemoryCache>(m, "MemoryCache", py::dynamic_attr())
        .def(py::init([](const py::tuple& spec, int64_t batch_size, int64_t num_heads, int64_t head_dim,
                         int64_t value_dim, int64_t num_query_heads, int64_t window, int64_t sinks, double scale,
                         const std::string& dtype, bool check_finite) {
                 kvfold::Config c;
                 c.batch_size = batch_size;
                 c.num_heads = num_heads;
                 c.head_dim = head_dim;
                 c.value_dim = value_dim;
                 c.num_query_heads = num_query_heads;
                 c.window = window;
                 c.sinks = sinks;
                 c.scale = scale;
                 c.dtype = kvfold::parse_dtype(dtype);
                 c.check_finite = check_finite;
                 return std::make_unique<MemoryCache>(c, make_spec(spec));
             }),
             py::arg("spec"), py::arg("batch_size"), py::arg("num_heads"), py::arg("head_dim"), py::arg("value_dim"),
             py::arg("num_query_heads"), py::arg("window"), py::arg("sinks"), py::arg("scale"), py::arg("dtype"),
             py::arg("check_finite"))
        .def(py::init([](const MemoryCache& other) {
                 ReleaseGil release;  // a Custom rule's fold may hold the cache and wait for the GIL
                 return std::make_unique<MemoryCache>(other);
             }),
             py::arg("other"))
        .def(py::init([](const MemoryCache& other, const py::object& rows) {
                 auto r = read_rows(rows);
                 ReleaseGil release;
                 return other.select(r.data(), static_cast<int64_t>(r.size()));
             }),
             py::arg("other"), py::arg("rows"))
        .def(py::init([](const std::vector<const MemoryCache*>& caches) {
                 ReleaseGil release;
                 return MemoryCache::concat(caches);
             }),
             py::arg("caches"))
        .def(py::init([](const py::bytes& data) {
                 std::string_view view = data;
                 ReleaseGil release;
                 return MemoryCache::from_bytes(view.data(), view.size());
             }),
             py::arg("data"))
        .def(
            "update",
            [](MemoryCache& c, const py::handle& k, const py::handle& v, const py::object& decay,
               const py::object& beta) {
                InFlight busy(c);
                Tokens t = read_tokens(c, k, v);
                Gates gates = read_gates(c, decay, beta, t);
                ReleaseGil release;
                c.update(t.k.data(), t.v.data(), t.T, gates.view);
            },
            py::arg("k"), py::arg("v"), py::kw_only(), py::arg("decay") = py::none(), py::arg("beta") = py::none(),
            "Feed tokens in order: k (B, H, d_k), v (B, H, d_v) for one token, or (B, H, T, d) for a block.\n"
            "Matrix rules without constant gates take per-token decay (log-space; (B, H[, T]) or (B, H[, T], d_k))\n"
            "and beta ((B, H[, T])).")
        .def(
            "attend",
            [](MemoryCache& c, const py::handle& q_obj, const py::object& out) {
                InFlight busy(c);
                const auto& g = c.config();
                FloatArray q = read_query(c, q_obj);
                py::array result = out.is_none() ? py::array(new_floats({g.batch_size, g.num_query_heads, g.value_dim}))
                                                 : py::reinterpret_borrow<py::array>(out);
                float* o = out.is_none() ? static_cast<float*>(result.mutable_data())
                                         : check_out(result, {g.batch_size, g.num_query_heads, g.value_dim});
                {
                    ReleaseGil release;
                    c.attend(q.data(), o);
                }
                return result;
            },
            py::arg("q"), py::kw_only(), py::arg("out") = py::none(),
            "Softmax attention of q (B, Hq, d_k) over [sinks | memory | window]; returns (B, Hq, d_v) float32.")
        .def(
            "step",
            [](MemoryCache& c, const py::handle& q_obj, const py::handle& k, const py::handle& v,
               const py::object& decay, const py::object& beta, const py::object& out) {
                InFlight busy(c);
                const auto& g = c.config();
                FloatArray q = read_query(c, q_obj);
                Tokens t = read_tokens(c, k, v);
                if (!t.single)
                    throw kvfold::ValueError(
                        "k: step takes one token, shape (B, H, d_k); use forward for blocks, got " +
                        shape_str(shape_of(t.k)));
                Gates gates = read_gates(c, decay, beta, t);
                py::array result = out.is_none() ? py::array(new_floats({g.batch_size, g.num_query_heads, g.value_dim}))
                                                 : py::reinterpret_borrow<py::array>(out);
                float* o = out.is_none() ? static_cast<float*>(result.mutable_data())
                                         : check_out(result, {g.batch_size, g.num_query_heads, g.value_dim});
                {
                    ReleaseGil release;
                    c.step(q.data(), t.k.data(), t.v.data(), o, gates.view);
                }
                return result;
            },
            py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("decay") = py::none(),
            py::arg("beta") = py::none(), py::arg("out") = py::none(),
            "Update with one token (and its decay/beta for matrix rules), then attend (the token sees itself).")
        .def(
            "forward",
            [](MemoryCache& c, const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj,
               const py::object& decay, const py::object& beta) {
                InFlight busy(c);
                const auto& g = c.config();
                FloatArray q = as_floats("q", q_obj);
                int64_t T = check_tokens("q", q, g.batch_size, g.num_query_heads, g.head_dim, "Hq", "d_k", false);
                Tokens t = read_tokens(c, k_obj, v_obj);
                if (t.single || t.T != T)
                    throw kvfold::ValueError("k: expected shape (B=" + std::to_string(g.batch_size) +
                                             ", H=" + std::to_string(g.num_heads) + ", T=" + std::to_string(T) +
                                             ", d_k=" + std::to_string(g.head_dim) + ") to match q, got " +
                                             shape_str(shape_of(t.k)));
                Gates gates = read_gates(c, decay, beta, t);
                auto out = new_floats({g.batch_size, g.num_query_heads, T, g.value_dim});
                {
                    ReleaseGil release;
                    c.forward(q.data(), t.k.data(), t.v.data(), T, out.mutable_data(), gates.view);
                }
                return out;
            },
            py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("decay") = py::none(),
            py::arg("beta") = py::none(),
            "q (B, Hq, T, d_k), k (B, H, T, d_k), v (B, H, T, d_v) -> (B, Hq, T, d_v): a loop of step "
            "(matrix rules run it chunked: equal to float rounding).")
        .def(
            "memory",
            [](const MemoryCache& c) -> py::object {
                InFlight busy(c);
                const auto& g = c.config();
                if (c.matrix_memory()) {
                    auto S = new_floats({g.batch_size, g.num_heads, g.head_dim, g.value_dim});
                    if (!c.matrix_normalized()) {
                        ReleaseGil release;
                        c.memory(S.mutable_data(), nullptr);
                        return S;
                    }
                    auto z = new_floats({g.batch_size, g.num_heads, g.head_dim});
                    {
                        ReleaseGil release;
                        c.memory(S.mutable_data(), z.mutable_data());
                    }
                    return py::make_tuple(S, z);
                }
                int64_t S = c.memory_slots();
                auto k = new_floats({g.batch_size, g.num_heads, S, g.head_dim});
                auto v = new_floats({g.batch_size, g.num_heads, S, g.value_dim});
                {
                    ReleaseGil release;
                    c.memory(k.mutable_data(), v.mutable_data());
                }
                return py::make_tuple(k, v);
            },
            "Copies of the memory slots, oldest first: keys (B, H, slots, d_k), values (B, H, slots, d_v).\n"
            "Matrix rules: S (B, H, d_k, d_v), or (S, z) with z (B, H, d_k) when normalized.")
        .def(
            "load_memory",
            [](MemoryCache& c, const py::handle& S_obj, const py::object& z_obj) {
                InFlight busy(c);
                const auto& g = c.config();
                if (!c.matrix_memory()) c.load_memory(nullptr, nullptr);  // raises: only matrix rules take a state
                FloatArray S = as_floats("S", S_obj);
                std::vector<int64_t> want{g.batch_size, g.num_heads, g.head_dim, g.value_dim};
                if (shape_of(S) != want)
                    throw kvfold::ValueError("S: expected shape (B=" + std::to_string(want[0]) +
                                             ", H=" + std::to_string(want[1]) + ", d_k=" + std::to_string(want[2]) +
                                             ", d_v=" + std::to_string(want[3]) + "), got " + shape_str(shape_of(S)));
                FloatArray z;
                if (!z_obj.is_none()) {
                    z = as_floats("z", z_obj);
                    if (shape_of(z) != std::vector<int64_t>{g.batch_size, g.num_heads, g.head_dim})
                        throw kvfold::ValueError("z: expected shape (B=" + std::to_string(want[0]) +
                                                 ", H=" + std::to_string(want[1]) + ", d_k=" + std::to_string(want[2]) +
                                                 "), got " + shape_str(shape_of(z)));
                }
                const float* z_data = z_obj.is_none() ? nullptr : z.data();
                ReleaseGil release;
                c.load_memory(S.data(), z_data);
            },
            py::arg("S"), py::arg("z") = py::none(),
            "Matrix rules: set the memory S (B, H, d_k, d_v) (and z (B, H, d_k) when normalized), e.g. an ONNX\n"
            "LinearAttention present_state, to continue from it.")
        .def(
            "visible",
            [](const MemoryCache& c, const py::object& out) {
                InFlight busy(c);
                const auto& g = c.config();
                py::array k, v;
                int64_t rows;
                if (out.is_none()) {
                    ReleaseGil release;
                    rows = c.visible_size();
                } else {
                    if (!py::isinstance<py::tuple>(out) || py::len(out) != 2 ||
                        !py::isinstance<py::array>(out[py::int_(0)]) || !py::isinstance<py::array>(out[py::int_(1)]))
                        throw kvfold::TypeError("out: expected a tuple (keys, values) of numpy arrays");
                    k = out[py::int_(0)];
                    v = out[py::int_(1)];
                    if (k.ndim() != 4)
                        throw kvfold::ValueError("out: expected keys of shape (B, H, rows, d_k), got shape " +
                                                 shape_str(shape_of(k)));
                    rows = k.shape(2);
                }
                while (true) {
                    if (out.is_none()) {
                        k = new_floats({g.batch_size, g.num_heads, rows, g.head_dim});
                        v = new_floats({g.batch_size, g.num_heads, rows, g.value_dim});
                    }
                    float* kd = check_out(k, {g.batch_size, g.num_heads, rows, g.head_dim});
                    float* vd = check_out(v, {g.batch_size, g.num_heads, rows, g.value_dim});
                    py::array_t<bool> mask(std::vector<py::ssize_t>{g.batch_size, rows});
                    auto* md = reinterpret_cast<uint8_t*>(mask.mutable_data());
                    int64_t n;
                    {
                        ReleaseGil release;
                        n = c.visible(kd, vd, md, rows);
                    }
                    if (n <= rows) return py::make_tuple(k, v, mask);
                    if (!out.is_none())
                        throw kvfold::ValueError("out: expected room for the " + std::to_string(n) +
                                                 " visible pairs per head, got arrays of " + std::to_string(rows));
                    rows = n;  // another thread fed tokens in between: size again
                }
            },
            py::kw_only(), py::arg("out") = py::none(),
            "The visible set [sinks | slots | window] per row, oldest first, padded: keys (B, H, n, d_k), "
            "values (B, H, n, d_v), mask (B, n). out=(keys, values): float32 arrays with room for at least n\n"
            "rows per head (keys (B, H, rows, d_k)) are filled instead (padding rows with zeros) and returned.")
        .def_property_readonly(
            "visible_size",
            [](const MemoryCache& c) {
                ReleaseGil release;
                return c.visible_size();
            },
            "Pairs in the largest row's visible set: the n of visible().")
        .def(
            "reset",
            [](MemoryCache& c, const py::object& rows) {
                if (rows.is_none()) {
                    ReleaseGil release;
                    c.reset();
                    return;
                }
                auto r = read_rows(rows);
                ReleaseGil release;
                c.reset_rows(r.data(), static_cast<int64_t>(r.size()));
            },
            py::arg("rows") = py::none(), "Back to empty, for all rows or the given rows.")
        .def(
            "checkpoint",
            [](const MemoryCache& c) {
                ReleaseGil release;
                return c.checkpoint();
            },
            "An immutable snapshot of the state; rollback restores it. Costs one copy of the state.")
        .def(
            "rollback",
            [](MemoryCache& c, const kvfold::Checkpoint& cp, const py::object& rows) {
                if (rows.is_none()) {
                    ReleaseGil release;
                    c.rollback(cp);
                    return;
                }
                auto r = read_rows(rows);
                ReleaseGil release;
                c.rollback_rows(cp, r.data(), static_cast<int64_t>(r.size()));
            },
            py::arg("checkpoint"), py::arg("rows") = py::none(),
            "Restore a checkpoint bit-exactly, for all rows or the given rows.")
        .def(
            "reorder", [](MemoryCache& c, const py::object& indices) { reorder(c, read_rows(indices, "indices")); },
            py::arg("indices"),
            "In place: new row r is old row indices[r]; indices may repeat, the batch size may change.")
        .def(
            "to_bytes",
            [](const MemoryCache& c) {
                std::string s;
                {
                    ReleaseGil release;
                    s = c.to_bytes();
                }
                return py::bytes(s);
            },
            "The cache's configuration and state in kvfold's versioned binary format.")
        .def_property_readonly(
            "length",
            [](const MemoryCache& c) {
                std::vector<int64_t> l;
                {
                    ReleaseGil release;
                    l = c.lengths();
                }
                py::array_t<int64_t> a(static_cast<py::ssize_t>(l.size()));
                std::copy(l.begin(), l.end(), a.mutable_data());
                return a;
            },
            "Tokens seen per row, (B,) int64.")
        .def_property_readonly(
            "nbytes",
            [](const MemoryCache& c) {
                ReleaseGil release;
                return c.nbytes();
            },
            "Bytes held by the cache; fixed at construction, changed only by a reorder that changes the batch size.")
        .def_property_readonly("batch_size", [](const MemoryCache& c) { return c.config().batch_size; })
        .def_property_readonly("num_heads", [](const MemoryCache& c) { return c.config().num_heads; })
        .def_property_readonly("head_dim", [](const MemoryCache& c) { return c.config().head_dim; })
        .def_property_readonly("value_dim", [](const MemoryCache& c) { return c.config().value_dim; })
        .def_property_readonly("num_query_heads", [](const MemoryCache& c) { return c.config().num_query_heads; })
        .def_property_readonly("window", [](const MemoryCache& c) { return c.config().window; })
        .def_property_readonly("sinks", [](const MemoryCache& c) { return c.config().sinks; })
        .def_property_readonly("scale", [](const MemoryCache& c) { return c.scale(); })
        .def_property_readonly("dtype", [](const MemoryCache& c) { return kvfold::dtype_name(c.config().dtype); })
        .def_property_readonly("check_finite", [](const MemoryCache& c) { return c.config().check_finite; })
        .def_property_readonly("memory_slots", &MemoryCache::memory_slots, "Summary slots per row and head.")
        .def_property_readonly("matrix_memory", &MemoryCache::matrix_memory,
                               "True for the linear-attention family, whose memory is S (d_k x d_v) per head.")
        .def_property_readonly("_rule_spec", [](const MemoryCache& c) { return spec_tuple(c.rule()); });
}
