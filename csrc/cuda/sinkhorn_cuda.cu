// CUDA kernels: batched squared-distance cost matrix and log-domain Sinkhorn with per-problem
// stopping decided on the device. The per-element exp and the potential updates come from
// ../sinkhorn_math.h, the header the CPU kernels use, so the CPU tests against POT exercise
// the same arithmetic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "../sinkhorn_math.h"
#include "sinkhorn_cuda.h"

namespace eotfast::cuda {
namespace {

constexpr int kTile = 16;              // cost kernel: 16 x 16 outputs per block, 16 features
constexpr int kSinkhornThreads = 256;  // sinkhorn kernel: threads per problem (8 warps)
constexpr int kWarp = 32;
constexpr int64_t kMaxGridZ = 65535;   // CUDA's limit on gridDim.z (and y)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Shared-memory tiles of x and y; every thread owns one output and accumulates, besides the
// dot product, the squared norms of its row and column from the same tiles (float32).
// Grid axis z holds at most 65535 blocks, so each block strides over the problems: any batch
// size runs, with gridDim.z = min(batch, 65535).
template <class T>
__global__ void cost_matrix_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                   float* __restrict__ out, int64_t batch_count, int64_t n,
                                   int64_t m, int64_t d) {
  __shared__ float x_tile[kTile][kTile + 1];  // +1: no shared-memory bank conflicts
  __shared__ float y_tile[kTile][kTile + 1];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t row = row0 + threadIdx.y, col = col0 + threadIdx.x;
  for (int64_t batch = blockIdx.z; batch < batch_count; batch += gridDim.z) {
    const T* x_batch = x + batch * n * d;
    const T* y_batch = y + batch * m * d;
    float dot = 0.f, x_sq = 0.f, y_sq = 0.f;
    for (int64_t k0 = 0; k0 < d; k0 += kTile) {
      const int64_t k = k0 + threadIdx.x;
      const int64_t x_row = row0 + threadIdx.y, y_row = col0 + threadIdx.y;
      x_tile[threadIdx.y][threadIdx.x] =
          (x_row < n && k < d) ? to_float(x_batch[x_row * d + k]) : 0.f;
      y_tile[threadIdx.y][threadIdx.x] =
          (y_row < m && k < d) ? to_float(y_batch[y_row * d + k]) : 0.f;
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTile; ++kk) {
        const float xv = x_tile[threadIdx.y][kk], yv = y_tile[threadIdx.x][kk];
        dot = fmaf(xv, yv, dot);
        x_sq = fmaf(xv, xv, x_sq);
        y_sq = fmaf(yv, yv, y_sq);
      }
      // Also orders the last tile's reads before the next problem's first writes.
      __syncthreads();
    }
    if (row < n && col < m)
      out[(batch * n + row) * m + col] = fmaxf(x_sq + y_sq - 2.f * dot, 0.f);
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kSinkhornThreads / kWarp; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// log-sum-exp from the max and the sum of exp(z - max); a max of -inf (no mass) gives -inf.
__device__ __forceinline__ float logsumexp_from(float max, float sum) {
  return max == -INFINITY ? -INFINITY : max + logf(sum);
}

// One block per problem. A round: the column sweep computes g_next from f, and the column
// masses of the current plan (f, g) give its error for free (mass_j = exp(g_j/eps + lse_j));
// if that error is still >= tol the round commits g = g_next and sweeps the rows for f.
// Without a minimum-blocks hint, ptxas picked 48 registers (5 blocks of 256 threads per SM)
// and spilled 8 bytes on sm_90 (CUDA 13.0). Asking for those 5 blocks (at most 51 registers)
// keeps the occupancy and gives 48 registers without a spill on sm_80 and sm_90;
// tests/test_cuda_compile.py checks.
__global__ void __launch_bounds__(kSinkhornThreads, 5)
sinkhorn_log_kernel(const float* __restrict__ cost, const float* __restrict__ a,
                    const float* __restrict__ b, const float* __restrict__ eps_per_problem,
                    float* __restrict__ f, float* __restrict__ g, float* __restrict__ g_next,
                    int64_t* __restrict__ n_iter, float* __restrict__ marginal_error, int64_t n,
                    int64_t m, int64_t max_iter, float tol) {
  __shared__ float scratch[kSinkhornThreads / kWarp];
  const int64_t problem = blockIdx.x;
  cost += problem * n * m;
  a += problem * n;
  f += problem * n;
  b += problem * m;
  g += problem * m;
  g_next += problem * m;
  const float eps = eps_per_problem[problem];
  const float inv_eps = 1.f / eps;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  for (int64_t i = threadIdx.x; i < n; i += kSinkhornThreads) f[i] = 0.f;  // POT's start
  for (int64_t j = threadIdx.x; j < m; j += kSinkhornThreads) g[j] = 0.f;
  __syncthreads();

  int64_t iteration = 0;
  float error = INFINITY;
  while (true) {
    // Column sweep, a thread per column: consecutive threads read consecutive costs.
    float squared = 0.f;
    for (int64_t j = threadIdx.x; j < m; j += kSinkhornThreads) {
      float max = -INFINITY;
      for (int64_t i = 0; i < n; ++i) max = fmaxf(max, (f[i] - cost[i * m + j]) * inv_eps);
      float sum = 0.f;
      if (max != -INFINITY)
        for (int64_t i = 0; i < n; ++i)
          sum += exp_nonpositive((f[i] - cost[i * m + j]) * inv_eps - max);
      const float lse = logsumexp_from(max, sum);
      const float mass = expf(g[j] * inv_eps + lse);
      squared += (mass - b[j]) * (mass - b[j]);
      g_next[j] = potential_update(logf(b[j]), lse, eps);
    }
    squared = block_sum(squared, scratch);
    if (iteration > 0) error = sqrtf(squared);
    // Uniform over the block (every thread holds the same sum). NaN compares false: a
    // problem that went NaN stops and reports it.
    if (!(error >= tol && iteration < max_iter)) break;
    for (int64_t j = threadIdx.x; j < m; j += kSinkhornThreads) g[j] = g_next[j];
    __syncthreads();
    // Row sweep, a warp per row: lanes read consecutive costs.
    for (int64_t i = warp; i < n; i += kSinkhornThreads / kWarp) {
      const float* cost_row = cost + i * m;
      float max = -INFINITY;
      for (int64_t j = lane; j < m; j += kWarp) max = fmaxf(max, (g[j] - cost_row[j]) * inv_eps);
      max = warp_max(max);
      float sum = 0.f;
      if (max != -INFINITY)
        for (int64_t j = lane; j < m; j += kWarp)
          sum += exp_nonpositive((g[j] - cost_row[j]) * inv_eps - max);
      sum = warp_sum(sum);
      if (lane == 0) f[i] = potential_update(logf(a[i]), logsumexp_from(max, sum), eps);
    }
    __syncthreads();
    ++iteration;
  }
  if (threadIdx.x == 0) {
    n_iter[problem] = iteration;
    marginal_error[problem] = error;
  }
}

}  // namespace

void cost_matrix(const void* x, const void* y, float* out, ElementType type, int64_t batch,
                 int64_t n, int64_t m, int64_t d, void* stream) {
  const dim3 block(kTile, kTile);
  // The kernel strides over the problems beyond gridDim.z (CUDA's limit on axis z).
  const dim3 grid(static_cast<unsigned>((m + kTile - 1) / kTile),
                  static_cast<unsigned>((n + kTile - 1) / kTile),
                  static_cast<unsigned>(batch < kMaxGridZ ? batch : kMaxGridZ));
  auto s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case ElementType::kFloat32:
      cost_matrix_kernel<<<grid, block, 0, s>>>(static_cast<const float*>(x),
                                                static_cast<const float*>(y), out, batch, n, m,
                                                d);
      break;
    case ElementType::kFloat16:
      cost_matrix_kernel<<<grid, block, 0, s>>>(static_cast<const __half*>(x),
                                                static_cast<const __half*>(y), out, batch, n, m,
                                                d);
      break;
    case ElementType::kBFloat16:
      cost_matrix_kernel<<<grid, block, 0, s>>>(static_cast<const __nv_bfloat16*>(x),
                                                static_cast<const __nv_bfloat16*>(y), out, batch,
                                                n, m, d);
      break;
  }
}

void sinkhorn_log(const float* cost, const float* a, const float* b, const float* eps, float* f,
                  float* g, float* g_next, int64_t* n_iter, float* marginal_error, int64_t batch,
                  int64_t n, int64_t m, int64_t max_iter, float tol, void* stream) {
  sinkhorn_log_kernel<<<static_cast<unsigned>(batch), kSinkhornThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(
      cost, a, b, eps, f, g, g_next, n_iter, marginal_error, n, m, max_iter, tol);
}

const char* last_error() {
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? "" : cudaGetErrorString(status);
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

}  // namespace eotfast::cuda
