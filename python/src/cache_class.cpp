// The MemoryCache class: argument checks, then the core's work with the GIL released.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "arrays.hpp"
#include "cache_args.hpp"
#include "gil.hpp"
#include "in_flight.hpp"
#include "kvfold/kvfold.hpp"
#include "rule_spec.hpp"

namespace kvfold_py {

using kvfold::MemoryCache;

namespace {

// MemoryCache.step, and with Work false its cost from Python alone: the same checks, conversions,
// output array and GIL release around nothing (the benchmark's call-overhead line).
template <bool Work>
py::array step_call(MemoryCache& c, const py::handle& q_obj, const py::handle& k, const py::handle& v,
                    const py::object& decay, const py::object& beta, const py::object& out,
                    const py::object& positions) {
    InFlight busy(c);
    FloatArray q = read_query(c, q_obj);
    Tokens t = read_tokens(c, k, v);
    if (!t.single)
        throw kvfold::ValueError("k: step takes one token, shape (B, H, d_k); use forward for blocks, got " +
                                 shape_str(shape_of(t.k)));
    Gates gates = read_gates(c, decay, beta, t);
    PositionArray keep;
    const int64_t* p = read_positions(c, positions, t, keep);
    Output o = output(c, out);
    unalias(q, o);
    unalias(t.k, o);
    unalias(t.v, o);
    {
        ReleaseGil release;
        if (Work) c.step(q.data(), t.k.data(), t.v.data(), o.data, gates.view, p);
    }
    return o.array;
}

// A per-row property (MemoryCache::lengths, last_positions), read without the GIL, as a (B,) int64 array.
template <std::vector<int64_t> (MemoryCache::*Get)() const>
py::array_t<int64_t> per_row(const MemoryCache& c) {
    std::vector<int64_t> l;
    {
        ReleaseGil release;
        l = (c.*Get)();
    }
    py::array_t<int64_t> a(static_cast<py::ssize_t>(l.size()));
    std::copy(l.begin(), l.end(), a.mutable_data());
    return a;
}

}  // namespace

void bind_cache(py::module_& m) {
    py::class_<MemoryCache>(m, "MemoryCache", py::dynamic_attr())
        .def(py::init([](const py::tuple& spec, int64_t batch_size, int64_t num_heads, int64_t head_dim,
                         int64_t value_dim, int64_t num_query_heads, int64_t window, int64_t sinks, double scale,
                         const std::string& dtype, bool check_finite, const py::object& rope, const std::string& retain,
                         int64_t recent) {
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
                 if (!rope.is_none()) {  // (theta, dim, layout[, frequencies (empty: theta's)])
                     auto r = rope.cast<py::tuple>();
                     if (r.size() != 3 && r.size() != 4)
                         throw kvfold::TypeError("rope: expected (theta, dim, layout[, frequencies]), got " +
                                                 std::to_string(r.size()) + " items");
                     c.rope.theta = r[0].cast<double>();
                     c.rope.dim = r[1].cast<int64_t>();
                     const auto layout = r[2].cast<std::string>();
                     if (layout != "half" && layout != "interleaved")
                         throw kvfold::ValueError("rope: layout must be 'half' or 'interleaved', got '" + layout + "'");
                     c.rope.interleaved = layout == "interleaved";
                     if (r.size() == 4) c.rope.frequencies = r[3].cast<std::vector<double>>();
                 }
                 c.retain = kvfold::parse_retain(retain);
                 c.recent = recent;
                 return std::make_unique<MemoryCache>(c, make_spec(spec));
             }),
             py::arg("spec"), py::arg("batch_size"), py::arg("num_heads"), py::arg("head_dim"), py::arg("value_dim"),
             py::arg("num_query_heads"), py::arg("window"), py::arg("sinks"), py::arg("scale"), py::arg("dtype"),
             py::arg("check_finite"), py::arg("rope") = py::none(), py::arg("retain") = "fifo", py::arg("recent") = -1)
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
               const py::object& beta, const py::object& positions) {
                InFlight busy(c);
                Tokens t = read_tokens(c, k, v);
                Gates gates = read_gates(c, decay, beta, t);
                PositionArray keep;
                const int64_t* p = read_positions(c, positions, t, keep);
                ReleaseGil release;
                c.update(t.k.data(), t.v.data(), t.T, gates.view, p);
            },
            py::arg("k"), py::arg("v"), py::kw_only(), py::arg("decay") = py::none(), py::arg("beta") = py::none(),
            py::arg("positions") = py::none(),
            "Feed tokens in order: k (B, H, d_k), v (B, H, d_v) for one token, or (B, H, T, d) for a block.\n"
            "Matrix rules without constant gates take per-token decay (log-space; (B, H[, T]) or (B, H[, T], d_k))\n"
            "and beta ((B, H[, T])). positions: integers (B,) or (B, T), never decreasing per row; default: the\n"
            "tokens each row has seen.")
        .def(
            "attend",
            [](MemoryCache& c, const py::handle& q_obj, const py::object& out) {
                InFlight busy(c);
                FloatArray q = read_query(c, q_obj);
                Output o = output(c, out);
                unalias(q, o);
                {
                    ReleaseGil release;
                    c.attend(q.data(), o.data);
                }
                return o.array;
            },
            py::arg("q"), py::kw_only(), py::arg("out") = py::none(),
            "Softmax attention of q (B, Hq, d_k) over [sinks | memory | window]; returns (B, Hq, d_v) float32.")
        .def("step", &step_call<true>, py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(),
             py::arg("decay") = py::none(), py::arg("beta") = py::none(), py::arg("out") = py::none(),
             py::arg("positions") = py::none(),
             "Update with one token (and its decay/beta for matrix rules, its positions (B,)), then attend "
             "(the token sees itself).")
        .def("_step_overhead", &step_call<false>, py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(),
             py::arg("decay") = py::none(), py::arg("beta") = py::none(), py::arg("out") = py::none(),
             py::arg("positions") = py::none(),
             "step's checks, conversions and output, without the step: the cost of calling it from Python "
             "(the output is left unspecified).")
        .def(
            "forward",
            [](MemoryCache& c, const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj,
               const py::object& decay, const py::object& beta, const py::object& positions) {
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
                PositionArray keep;
                const int64_t* p = read_positions(c, positions, t, keep);
                auto out = new_floats({g.batch_size, g.num_query_heads, T, g.value_dim});
                {
                    ReleaseGil release;
                    c.forward(q.data(), t.k.data(), t.v.data(), T, out.mutable_data(), gates.view, p);
                }
                return out;
            },
            py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("decay") = py::none(),
            py::arg("beta") = py::none(), py::arg("positions") = py::none(),
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
                        {
                            ReleaseGil release;
                            c.memory(S.mutable_data(), nullptr);
                        }
                        return S;  // with the GIL: returning takes a reference
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
                    if (overlaps(k, v))
                        throw kvfold::ValueError(
                            "out: expected separate arrays for the keys and the values, got two that share memory");
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
        .def_property_readonly("visible_size",
                               py::cpp_function(&MemoryCache::visible_size, py::call_guard<ReleaseGil>()),
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
        .def("checkpoint", &MemoryCache::checkpoint, py::call_guard<ReleaseGil>(),
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
        .def_property_readonly("length", &per_row<&MemoryCache::lengths>, "Tokens seen per row, (B,) int64.")
        .def_property_readonly(
            "last_position", &per_row<&MemoryCache::last_positions>,
            "Each row's latest position, (B,) int64 (0 before its first token): positions= may not go below it.")
        .def_property_readonly(
            "nbytes", py::cpp_function(&MemoryCache::nbytes, py::call_guard<ReleaseGil>()),
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
        .def_property_readonly(
            "_rope",
            [](const MemoryCache& c) -> py::object {
                const kvfold::RoPE& r = c.config().rope;
                if (r.theta == 0) return py::none();
                return py::make_tuple(r.theta, r.dim, r.interleaved ? "interleaved" : "half",
                                      py::tuple(py::cast(r.frequencies)));
            },
            "(theta, dim (0: the whole head), layout, frequencies (empty: theta's)), or None without a RoPE.")
        .def_property_readonly(
            "retain", [](const MemoryCache& c) { return kvfold::retain_name(c.config().retain); },
            "Which window pair is folded when the window is full: 'fifo', 'tova' or 'h2o'.")
        .def_property_readonly(
            "recent",
            [](const MemoryCache& c) -> py::object {
                const auto& g = c.config();
                if (g.retain != kvfold::Retain::h2o) return py::none();
                return py::int_(g.recent == -1 ? g.window / 2 : g.recent);
            },
            "retain='h2o': the newest window pairs never folded; None otherwise.")
        .def_property_readonly("memory_slots", &MemoryCache::memory_slots, "Summary slots per row and head.")
        .def_property_readonly("matrix_memory", &MemoryCache::matrix_memory,
                               "True for the linear-attention family, whose memory is S (d_k x d_v) per head.")
        .def_property_readonly("_rule_spec", [](const MemoryCache& c) { return spec_tuple(c.rule()); });
}

}  // namespace kvfold_py
