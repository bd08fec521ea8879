// Batched log-domain Sinkhorn on the CPU.
#pragma once

#include <cstdint>

namespace eotfast::cpu {

// Solves `batch` independent entropic OT problems.
//
// cost            [batch, n, m]  row-major, finite
// a, b            [batch, n], [batch, m]  nonnegative marginals of equal mass
// epsilon         [batch]  absolute entropic regularization, > 0
// epsilon_start   [batch]  epsilon scaling: iteration k (from 1) runs at
//                          max(epsilon, epsilon_start * scaling^(k - 1)); = epsilon: plain
// relaxation      over-relaxation w in [1, 2) of every update at the target epsilon:
//                  f <- (1 - w) f + w F(g), g <- (1 - w) g + w G(f); 1: plain Sinkhorn
// reach           rho > 0 of unbalanced OT (KL(P 1 | a) and KL(P^T 1 | b) penalized by rho
//                  instead of enforced): every update damped, f <- rho / (rho + epsilon) F(g);
//                  inf: balanced (a and b then of equal mass)
// f, g            [batch, n], [batch, m]  out: dual potentials in cost units
// n_iter          [batch]  out: iterations done (one g update + one f update each)
// marginal_error  [batch]  out: sqrt(||P 1 - a e^(-f / rho)||^2 + ||P^T 1 - b e^(-g / rho)||^2)
//                          of the returned plan, the distance to the fixed point's marginals
//                          (a and b when balanced; the rows exact up to rounding without
//                          over-relaxation)
//
// Each problem stops on its own once its marginal error is below `tol` (checked every
// iteration at no extra cost: the column masses it needs are summed during the f update's
// sweep), or after max_iter iterations; with epsilon scaling only once at the target epsilon
// (stopped by max_iter before that, the error is inf: the potentials belong to a larger
// epsilon). Work is split over `num_threads` threads: over
// problems when the batch is at least the thread count, otherwise over the rows and columns
// of each problem.
template <class T>
void sinkhorn(const T* cost, const T* a, const T* b, const T* epsilon, const T* epsilon_start,
              T* f, T* g, int64_t* n_iter, T* marginal_error, int64_t batch, int64_t n,
              int64_t m, int64_t max_iter, double tol, double scaling, double relaxation,
              double reach, int num_threads);

}  // namespace eotfast::cpu
