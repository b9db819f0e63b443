// The roofline the benchmark prints: the machine's measured limits and each case's bytes and
// FLOPs per step (cpp/src/roofline.hpp), for kvfold.tools.roofline. Private to the benchmark.
#include "../../cpp/src/roofline.hpp"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "gil.hpp"

namespace py = pybind11;

namespace kvfold_py {

void bind_roofline(py::module_& m) {
    namespace rf = kvfold::roofline;
    m.def("_fma_peak", &rf::fma_peak, py::arg("backend"), py::arg("seconds"), py::call_guard<ReleaseGil>(),
          "FLOP/s of one core running independent FMA chains in the backend's vectors (best round).");
    py::class_<rf::ReadLoop>(m, "_ReadLoop",
                             "A buffer of `bytes` bytes, on huge pages when large, for timing reads beside a "
                             "benchmark case.")
        .def(py::init<int64_t>(), py::arg("bytes"))
        .def_property_readonly("bytes", &rf::ReadLoop::bytes, "Bytes one pass reads (whole blocks of vectors).")
        .def_property_readonly("passes", &rf::ReadLoop::passes, "Passes a read() makes: at least 8 MB.")
        .def("read", &rf::ReadLoop::read, py::call_guard<ReleaseGil>(), "Reads the whole buffer `passes` times.");
    m.def(
        "_step_work",
        [](const std::string& rule, int64_t heads, int64_t head_dim, int64_t window, int64_t sinks,
           int64_t element_bytes, int64_t tokens) {
            const rf::StepWork w = rf::step_work(rule, heads, head_dim, window, sinks, element_bytes, tokens);
            return std::make_tuple(w.bytes, w.flops, w.footprint);
        },
        py::arg("rule"), py::arg("heads"), py::arg("head_dim"), py::arg("window"), py::arg("sinks"),
        py::arg("element_bytes"), py::arg("tokens"),
        "(bytes, flops, footprint) of one decode step, or of one token of a prefill of `tokens` tokens.");
}

}  // namespace kvfold_py
