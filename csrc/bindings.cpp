// Python bindings of the CPU kernels (module eotfast._C).
//
// The functions take raw data pointers (tensor.data_ptr()) and sizes instead of tensors, so
// the extension needs no libtorch to build or load. The Python wrappers in eotfast/ check
// dtype, device, contiguity and shapes before calling; the C++ side re-checks sizes and
// raises ValueError (std::invalid_argument) rather than touching memory it was not given.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "auction_cpu.h"
#include "sinkhorn_cpu.h"

namespace py = pybind11;

namespace {

template <class T>
void sinkhorn(std::uintptr_t cost, std::uintptr_t a, std::uintptr_t b,
              std::uintptr_t epsilon, std::uintptr_t epsilon_start, std::uintptr_t f,
              std::uintptr_t g, std::uintptr_t n_iter, std::uintptr_t marginal_error,
              int64_t batch, int64_t n, int64_t m, int64_t max_iter, double tol, double scaling,
              double relaxation, double reach, int num_threads) {
  eotfast::cpu::sinkhorn<T>(
      reinterpret_cast<const T*>(cost), reinterpret_cast<const T*>(a),
      reinterpret_cast<const T*>(b), reinterpret_cast<const T*>(epsilon),
      reinterpret_cast<const T*>(epsilon_start), reinterpret_cast<T*>(f),
      reinterpret_cast<T*>(g), reinterpret_cast<int64_t*>(n_iter),
      reinterpret_cast<T*>(marginal_error), batch, n, m, max_iter, tol, scaling, relaxation,
      reach, num_threads);
}

template <class T>
void def_sinkhorn(py::module_& module, const char* name) {
  module.def(name, &sinkhorn<T>, py::arg("cost"), py::arg("a"), py::arg("b"),
             py::arg("epsilon"), py::arg("epsilon_start"), py::arg("f"), py::arg("g"),
             py::arg("n_iter"), py::arg("marginal_error"), py::arg("batch"), py::arg("n"),
             py::arg("m"), py::arg("max_iter"), py::arg("tol"), py::arg("scaling"),
             py::arg("relaxation"), py::arg("reach"), py::arg("num_threads"),
             // The solve can take a while; other Python threads (data loading) go on meanwhile.
             py::call_guard<py::gil_scoped_release>(),
             "Batched log-domain Sinkhorn on contiguous CPU buffers (see csrc/sinkhorn_cpu.h).");
}

template <class T>
void auction(std::uintptr_t cost, std::uintptr_t prices_in, std::uintptr_t epsilon_start,
             std::uintptr_t epsilon_final, double scaling, int64_t max_bids,
             std::uintptr_t assignment, std::uintptr_t prices, std::uintptr_t epsilon,
             std::uintptr_t n_bids, int64_t batch, int64_t n, int64_t m, int num_threads) {
  eotfast::cpu::auction<T>(
      reinterpret_cast<const T*>(cost), reinterpret_cast<const T*>(prices_in),
      reinterpret_cast<const T*>(epsilon_start), reinterpret_cast<const T*>(epsilon_final),
      static_cast<T>(scaling), max_bids, reinterpret_cast<int64_t*>(assignment),
      reinterpret_cast<T*>(prices), reinterpret_cast<T*>(epsilon),
      reinterpret_cast<int64_t*>(n_bids), batch, n, m, num_threads);
}

template <class T>
void def_auction(py::module_& module, const char* name) {
  module.def(name, &auction<T>, py::arg("cost"), py::arg("prices_in"), py::arg("epsilon_start"),
             py::arg("epsilon_final"), py::arg("scaling"), py::arg("max_bids"),
             py::arg("assignment"), py::arg("prices"), py::arg("epsilon"), py::arg("n_bids"),
             py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("num_threads"),
             py::call_guard<py::gil_scoped_release>(),
             "Batched auction assignment on contiguous CPU buffers (see csrc/auction_cpu.h).");
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "eotfast C++ CPU kernels; use them through eotfast's public functions.";
  def_sinkhorn<float>(module, "sinkhorn_float32");
  def_sinkhorn<double>(module, "sinkhorn_float64");
  def_auction<float>(module, "auction_float32");
  def_auction<double>(module, "auction_float64");
}
