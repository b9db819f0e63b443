// kvfold._core: the only code that knows about Python. Converts and checks arrays (arrays.cpp),
// rule specs (rule_spec.cpp) and the cache class (cache_class.cpp); this file makes the module.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "arrays.hpp"
#include "gil.hpp"
#include "kvfold/kvfold.hpp"
#include "rule_spec.hpp"

namespace py = pybind11;
using namespace kvfold_py;
using kvfold::MemoryCache;

namespace kvfold_py {
void bind_cache(py::module_& m);
void bind_roofline(py::module_& m);
}  // namespace kvfold_py

PYBIND11_MODULE(_core, m) {
    m.doc() = "kvfold's C++ core. Use the kvfold package, not this module.";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const kvfold::TypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        } catch (const kvfold::RuntimeError& e) {
            PyErr_SetString(PyExc_RuntimeError, e.what());
        }
    });

    m.def("simd_backend", &kvfold::simd_backend,
          "Name of the SIMD kernels in use: scalar, avx2, avx512, avx512bf16 or neon.");
    m.def("available_backends", &kvfold::available_backends,
          "SIMD backends this machine can run, least capable first (avx512bf16 runs only when named).");
    m.def("_set_simd_backend", &kvfold::set_simd_backend, py::arg("name"));
    m.def(
        "_threads_without_gil", [] { return threads_without_gil.load(std::memory_order_relaxed); },
        "Threads inside kvfold's C++ work with the GIL released, right now (for tests).");
    m.def("_known_backends", &kvfold::known_backends);
    m.def("set_num_threads", &kvfold::set_num_threads, py::arg("num_threads"));
    m.def("get_num_threads", &kvfold::get_num_threads, "Threads a call may use, the calling thread included.");
    m.attr("MAX_THREADS") = kvfold::kMaxThreads;
    m.attr("MAX_CHUNK") = kvfold::kMaxChunk;
    m.attr("MAX_WINDOW") = kvfold::kMaxWindow;
    m.def("set_chunk_size", &kvfold::set_chunk_size, py::arg("chunk_size"));
    m.def("get_chunk_size", &kvfold::get_chunk_size, "Tokens per chunk when a matrix rule takes a block.");
    m.def("_set_min_shared_flops", &kvfold::set_min_shared_flops, py::arg("flops"),
          "The least work a call needs before it is shared out; returns the previous value (for tests).");
    m.def(
        "_check_rule", [](const py::tuple& spec) { kvfold::check_rule(make_spec(spec)); }, py::arg("spec"));
    m.attr("__version__") = kvfold::version();
    m.attr("STATE_HEADER") = MemoryCache::kStateHeader;
    m.def(
        "_state_size",
        [](const py::bytes& header) {
            std::string_view view = header;
            return MemoryCache::state_size(view.data(), view.size());
        },
        py::arg("header"), "The whole size a kvfold state declares in its header; ValueError if it is not one.");

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

    bind_cache(m);
    bind_roofline(m);
}
