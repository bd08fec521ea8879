// Python bindings of the CPU kernels (module eotfast._C).
//
// The functions take raw data pointers (tensor.data_ptr()) and sizes instead of tensors, so
// the extension needs no libtorch to build or load. The Python wrappers in eotfast/ check
// dtype, device, contiguity and shapes before calling; the C++ side re-checks sizes and
// raises ValueError (std::invalid_argument) rather than touching memory it was not given.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "sinkhorn_cpu.h"

namespace py = pybind11;

namespace {

template <class T>
void sinkhorn(std::uintptr_t cost, std::uintptr_t a, std::uintptr_t b,
                  std::uintptr_t epsilon, std::uintptr_t f, std::uintptr_t g,
                  std::uintptr_t n_iter, std::uintptr_t marginal_error, int64_t batch, int64_t n,
                  int64_t m, int64_t max_iter, double tol, int num_threads) {
  eotfast::cpu::sinkhorn<T>(
      reinterpret_cast<const T*>(cost), reinterpret_cast<const T*>(a),
      reinterpret_cast<const T*>(b), reinterpret_cast<const T*>(epsilon),
      reinterpret_cast<T*>(f), reinterpret_cast<T*>(g), reinterpret_cast<int64_t*>(n_iter),
      reinterpret_cast<T*>(marginal_error), batch, n, m, max_iter, tol, num_threads);
}

template <class T>
void def_sinkhorn(py::module_& module, const char* name) {
  module.def(name, &sinkhorn<T>, py::arg("cost"), py::arg("a"), py::arg("b"),
             py::arg("epsilon"), py::arg("f"), py::arg("g"), py::arg("n_iter"),
             py::arg("marginal_error"), py::arg("batch"), py::arg("n"), py::arg("m"),
             py::arg("max_iter"), py::arg("tol"), py::arg("num_threads"),
             // The solve can take a while; other Python threads (data loading) go on meanwhile.
             py::call_guard<py::gil_scoped_release>(),
             "Batched log-domain Sinkhorn on contiguous CPU buffers (see csrc/sinkhorn_cpu.h).");
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "eotfast C++ CPU kernels; use them through eotfast's public functions.";
  def_sinkhorn<float>(module, "sinkhorn_float32");
  def_sinkhorn<double>(module, "sinkhorn_float64");
}
