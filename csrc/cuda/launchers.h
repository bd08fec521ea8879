// Launchers of the CUDA kernels (module eotfast._cuda). Every launcher enqueues on the given
// stream and returns at once: no host synchronization. Launch errors surface through
// cudaGetLastError, which the bindings turn into a RuntimeError.
#pragma once

#include <cstdint>

namespace eotfast::cuda {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// C[b, i, j] = ||x[b, i] - y[b, j]||^2 in float32; x [batch, n, d], y [batch, m, d] contiguous.
void cost_matrix(const void* x, const void* y, float* out, ElementType type, int64_t batch,
                 int64_t n, int64_t m, int64_t d, void* stream);

// Log-domain Sinkhorn on contiguous float32 [batch, n, m] problems, one thread block per
// problem, every iteration inside the kernel; each problem stops once ||P^T 1 - b||_2 < tol
// (or after max_iter iterations). g_next is [batch, m] scratch. Epsilon scaling: round k runs
// at max(epsilon, epsilon_start * scaling^k) and may stop only at the target epsilon, where
// every update is over-relaxed by `relaxation` in [1, 2).
void sinkhorn(const float* cost, const float* a, const float* b, const float* epsilon,
              const float* epsilon_start, float* f, float* g, float* g_next, int64_t* n_iter,
              float* marginal_error, int64_t batch, int64_t n, int64_t m, int64_t max_iter,
              float tol, float scaling, float relaxation, void* stream);

// cudaGetLastError as text, empty when there is none.
const char* last_error();

// Number of visible CUDA devices; 0 (not a crash) on a machine without a GPU or driver.
int device_count();

}  // namespace eotfast::cuda
