// CUDA kernel: batched log-domain Sinkhorn with per-problem stopping decided on the device
// (op eotfast::sinkhorn_cuda). Only the per-element helpers exp_nonpositive and
// potential_update come from ../sinkhorn_math.h, the header the CPU kernels also use. The
// loops, the block and warp reductions, the thread layout and hence the float summation order
// are this file's own (and it is compiled with --use_fast_math), so the CPU tests against POT
// do not check this kernel's results.
#include <cuda_runtime.h>

#include <cmath>

#include "../sinkhorn_math.h"
#include "launchers.h"

namespace eotfast::cuda {
namespace {

// Threads per problem (8 warps, one block each): not tuned. One block per problem keeps a
// single large problem on one SM: 0.9 ms per iteration at n = 1024 on an H100 (bench/README.md).
constexpr int kSinkhornThreads = 256;
constexpr int kWarp = 32;

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kSinkhornThreads / kWarp; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// (1 - w) old + w new, and new itself where either is -inf (a point of zero mass: 0 * -inf
// would be NaN) or w = 1.
__device__ __forceinline__ float relax(float old, float updated, float w) {
  const bool plain = w == 1.f || old == -INFINITY || updated == -INFINITY;
  return plain ? updated : (1.f - w) * old + w * updated;
}

// log-sum-exp from the max and the sum of exp(z - max); a max of -inf (no mass) gives -inf.
__device__ __forceinline__ float logsumexp_from(float max, float sum) {
  return max == -INFINITY ? -INFINITY : max + logf(sum);
}

// One block per problem. A round: the column sweep computes g_next from f, and the column
// masses of the current plan (f, g), mass_j = exp(g_j / epsilon + lse_j), give its error for
// free; if that error is still >= tol the round commits g = g_next and sweeps the rows for f.
// Without a minimum-blocks hint, ptxas picked 48 registers (5 blocks of 256 threads per SM)
// and spilled 8 bytes on sm_90 (CUDA 13.0). Asking for those 5 blocks (at most 51 registers)
// keeps the occupancy and gives 48 registers without a spill on sm_80 and sm_90;
// tests/test_cuda_compile.py checks.
__global__ void __launch_bounds__(kSinkhornThreads, 5)
sinkhorn_kernel(const float* __restrict__ cost, const float* __restrict__ a,
                const float* __restrict__ b, const float* __restrict__ epsilon_per_problem,
                const float* __restrict__ epsilon_start_per_problem, float* __restrict__ f,
                float* __restrict__ g, float* __restrict__ g_next, int64_t* __restrict__ n_iter,
                float* __restrict__ marginal_error, int64_t n, int64_t m, int64_t max_iter,
                float tol, float scaling, float relaxation) {
  __shared__ double scratch[kSinkhornThreads / kWarp];
  const int64_t problem = blockIdx.x;
  cost += problem * n * m;
  a += problem * n;
  f += problem * n;
  b += problem * m;
  g += problem * m;
  g_next += problem * m;
  const float target_epsilon = epsilon_per_problem[problem];
  const float epsilon_start = epsilon_start_per_problem[problem];
  // Epsilon scaling: round k runs at max(target, epsilon_start * scaling^k).
  float epsilon = fmaxf(target_epsilon, epsilon_start);
  float inv_epsilon = 1.f / epsilon;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  for (int64_t i = threadIdx.x; i < n; i += kSinkhornThreads) f[i] = 0.f;  // POT's start
  for (int64_t j = threadIdx.x; j < m; j += kSinkhornThreads) g[j] = 0.f;
  __syncthreads();

  int64_t iteration = 0;
  // The row sweep of a round measures the rows of the plan whose columns the next round's
  // column sweep measures: each thread's share, carried over (lane 0 of each row's warp).
  double row_squared = 0.0;
  bool was_at_target = epsilon <= target_epsilon;
  // Over-relaxed at the target epsilon only, and only while the error decreases: every
  // kStallCheckRounds rounds there, an error not below the last check's ends it (the torch
  // reference's rule: relaxation amplifies rounding noise near the fixed point).
  bool relaxing = true;
  double checkpoint = INFINITY;
  int64_t target_rounds = 0;
  double probe_error = INFINITY;
  // The error is accumulated in float64: in float32 the squares of masses of 1e30 overflow to
  // inf and those of 1e-30 underflow to 0 (the tests check both against POT's measure).
  double error = INFINITY;
  while (true) {
    bool at_target = epsilon <= target_epsilon;
    const float w = at_target && relaxing && target_rounds >= kProbeRounds ? relaxation : 1.f;
    // Column sweep, a thread per column: consecutive threads read consecutive costs.
    double squared = row_squared;
    for (int64_t j = threadIdx.x; j < m; j += kSinkhornThreads) {
      float max = -INFINITY;
      for (int64_t i = 0; i < n; ++i) max = fmaxf(max, (f[i] - cost[i * m + j]) * inv_epsilon);
      float sum = 0.f;
      if (max != -INFINITY)
        for (int64_t i = 0; i < n; ++i)
          sum += exp_nonpositive((f[i] - cost[i * m + j]) * inv_epsilon - max);
      const float lse = logsumexp_from(max, sum);
      const float mass = expf(g[j] * inv_epsilon + lse);
      const double deviation = static_cast<double>(mass) - b[j];
      squared += deviation * deviation;
      g_next[j] = relax(g[j], potential_update(logf(b[j]), lse, epsilon), w);
    }
    squared = block_sum(squared, scratch);
    // The plan (f, g) measured at this round's epsilon (its rows at the previous round's): a
    // problem may stop on it only at the target epsilon; stopped by max_iter before, the
    // error is inf (the potentials belong to a larger epsilon).
    at_target = at_target && was_at_target;
    if (iteration > 0) error = at_target || isnan(squared) ? sqrt(squared) : INFINITY;
    if (at_target && iteration > 0) {
      ++target_rounds;
      if (target_rounds == kProbeRounds / 2) probe_error = error;
      if (target_rounds == kProbeRounds && error < probe_error * kSlowRatePower) relaxing = false;
    }
    if (at_target && target_rounds > kProbeRounds && iteration % kStallCheckRounds == 0) {
      if (!(error < checkpoint)) relaxing = false;
      checkpoint = error;
    }
    // Uniform over the block (every thread holds the same sum). NaN compares false: a
    // problem that went NaN stops and reports it.
    if (!((!at_target || error >= tol) && iteration < max_iter)) break;
    for (int64_t j = threadIdx.x; j < m; j += kSinkhornThreads) g[j] = g_next[j];
    __syncthreads();
    // Row sweep, a warp per row: lanes read consecutive costs.
    row_squared = 0.0;
    for (int64_t i = warp; i < n; i += kSinkhornThreads / kWarp) {
      const float* cost_row = cost + i * m;
      float max = -INFINITY;
      for (int64_t j = lane; j < m; j += kWarp)
        max = fmaxf(max, (g[j] - cost_row[j]) * inv_epsilon);
      max = warp_max(max);
      float sum = 0.f;
      if (max != -INFINITY)
        for (int64_t j = lane; j < m; j += kWarp)
          sum += exp_nonpositive((g[j] - cost_row[j]) * inv_epsilon - max);
      sum = warp_sum(sum);
      if (lane == 0) {
        // Relaxed f, and the row mass of the new plan (f, g) it gives: a_i when w = 1.
        const float lse = logsumexp_from(max, sum);
        const float relaxed = relax(f[i], potential_update(logf(a[i]), lse, epsilon), w);
        const double violation = static_cast<double>(expf(relaxed * inv_epsilon + lse)) - a[i];
        row_squared += violation * violation;
        f[i] = relaxed;
      }
    }
    was_at_target = epsilon <= target_epsilon;
    __syncthreads();
    ++iteration;
    epsilon = fmaxf(target_epsilon, epsilon_start * powf(scaling, static_cast<float>(iteration)));
    inv_epsilon = 1.f / epsilon;
  }
  if (threadIdx.x == 0) {
    n_iter[problem] = iteration;
    marginal_error[problem] = static_cast<float>(error);
  }
}

}  // namespace

void sinkhorn(const float* cost, const float* a, const float* b, const float* epsilon,
              const float* epsilon_start, float* f, float* g, float* g_next, int64_t* n_iter,
              float* marginal_error, int64_t batch, int64_t n, int64_t m, int64_t max_iter,
              float tol, float scaling, float relaxation, void* stream) {
  sinkhorn_kernel<<<static_cast<unsigned>(batch), kSinkhornThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(cost, a, b, epsilon, epsilon_start, f, g,
                                                         g_next, n_iter, marginal_error, n, m,
                                                         max_iter, tol, scaling, relaxation);
}

}  // namespace eotfast::cuda
