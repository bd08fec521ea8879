// Python bindings of the CUDA kernels (module eotfast._cuda). Like eotfast._C it takes raw
// pointers, sizes and the caller's stream handle (torch.cuda.current_stream().cuda_stream),
// so it links no libtorch. Importing it needs no GPU: nothing touches the driver until a
// function is called.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace py = pybind11;
using eotfast::cuda::ElementType;

namespace {

// The cost kernel puts one block per 16 rows of x (kTile in sinkhorn_cuda.cu) on grid axis y,
// which CUDA limits to 65535 blocks.
constexpr int64_t kCostMatrixMaxN = 65535 * 16;

template <class T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void require_device() {
  if (eotfast::cuda::device_count() == 0)
    throw std::runtime_error("eotfast._cuda: no CUDA device is visible to this process");
}

void check_sizes(int64_t batch, int64_t n, int64_t m) {
  if (batch < 1 || n < 1 || m < 1)
    throw std::invalid_argument("batch, n and m must be >= 1");
  if (batch > 2147483647) throw std::invalid_argument("batch must be < 2^31");
}

void raise_launch_error() {
  const std::string error = eotfast::cuda::last_error();
  if (!error.empty()) throw std::runtime_error("eotfast._cuda kernel launch failed: " + error);
}

void cost_matrix(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, int element_type,
                 int64_t batch, int64_t n, int64_t m, int64_t d, std::uintptr_t stream) {
  require_device();
  check_sizes(batch, n, m);
  if (d < 1) throw std::invalid_argument("d must be >= 1");
  if (element_type < 0 || element_type > 2)
    throw std::invalid_argument("element_type must be 0 (float32), 1 (float16), 2 (bfloat16)");
  // The batch has no such limit: the kernel strides over the problems beyond gridDim.z.
  if (n > kCostMatrixMaxN)
    throw std::invalid_argument("cost_matrix: n (points in x) must be <= " +
                                std::to_string(kCostMatrixMaxN) + ", got " + std::to_string(n));
  eotfast::cuda::cost_matrix(ptr<const void>(x), ptr<const void>(y), ptr<float>(out),
                             static_cast<ElementType>(element_type), batch, n, m, d,
                             ptr<void>(stream));
  raise_launch_error();
}

void sinkhorn(std::uintptr_t cost, std::uintptr_t a, std::uintptr_t b, std::uintptr_t epsilon,
              std::uintptr_t epsilon_start, std::uintptr_t f, std::uintptr_t g,
              std::uintptr_t g_next, std::uintptr_t n_iter, std::uintptr_t marginal_error,
              int64_t batch, int64_t n, int64_t m, int64_t max_iter, double tol, double scaling,
              double relaxation, std::uintptr_t stream) {
  require_device();
  check_sizes(batch, n, m);
  if (max_iter < 1) throw std::invalid_argument("max_iter must be >= 1");
  if (!(scaling > 0.0 && scaling < 1.0)) throw std::invalid_argument("scaling must be in (0, 1)");
  if (!(relaxation >= 1.0 && relaxation < 2.0))
    throw std::invalid_argument("relaxation must be in [1, 2)");
  eotfast::cuda::sinkhorn(ptr<const float>(cost), ptr<const float>(a), ptr<const float>(b),
                          ptr<const float>(epsilon), ptr<const float>(epsilon_start),
                          ptr<float>(f), ptr<float>(g), ptr<float>(g_next), ptr<int64_t>(n_iter),
                          ptr<float>(marginal_error), batch, n, m, max_iter,
                          static_cast<float>(tol), static_cast<float>(scaling),
                          static_cast<float>(relaxation), ptr<void>(stream));
  raise_launch_error();
}

}  // namespace

PYBIND11_MODULE(_cuda, module) {
  module.doc() = "eotfast CUDA kernels; use them through eotfast's public functions.";
  module.def("device_count", &eotfast::cuda::device_count,
             "Visible CUDA devices (0 without a GPU or driver; never raises).");
  module.def("cost_matrix", &cost_matrix, py::arg("x"), py::arg("y"), py::arg("out"),
             py::arg("element_type"), py::arg("batch"), py::arg("n"), py::arg("m"),
             py::arg("d"), py::arg("stream"));
  module.def("sinkhorn_float32", &sinkhorn, py::arg("cost"), py::arg("a"),
             py::arg("b"), py::arg("epsilon"), py::arg("epsilon_start"), py::arg("f"),
             py::arg("g"), py::arg("g_next"), py::arg("n_iter"), py::arg("marginal_error"),
             py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("max_iter"), py::arg("tol"),
             py::arg("scaling"), py::arg("relaxation"), py::arg("stream"));
}
