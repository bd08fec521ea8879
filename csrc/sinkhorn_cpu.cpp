// Batched log-domain Sinkhorn on the CPU.
//
// One sweep over the cost matrix per iteration. For each row i the sweep computes the
// max-shifted terms t_ij = exp((g_j - C_ij - max_j(g_j - C_ij)) / epsilon) and their sum S_i,
// which give the f update (a log-sum-exp, exact in the log domain) and the new plan's row,
// P_ij = t_ij * a_i / S_i; adding that row into per-thread column sums gives the column masses
// of the plan (f, g) without a second exp sweep over the columns. The column masses give the
// marginal error (the stopping test) and the g update through potential_update_from_mass.
// A column whose mass underflows (every term below the float range) takes the exact column
// log-sum-exp instead, so small epsilon never turns into inf or a uniform plan.
// Measured on a 2-core x86-64 CPU (n = m = 1024, float32, 1 thread): the two-sweep form (a
// row sweep for f, a sweep over a transposed copy for g) took 2.3 ns per cost entry per
// iteration; this one takes 1.27 ns (0.92 ns with the degree-5 exp of sinkhorn_math.h).
#include "sinkhorn_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "multiversion.h"
#include "sinkhorn_math.h"

namespace eotfast::cpu {
namespace {

// Below this many cost entries per thread, starting threads and meeting at two barriers per
// iteration costs more than the parallel sweep saves. Measured on a 2-core x86-64 CPU, 50
// iterations, 1 vs 2 threads: n = 128 (16k entries) 1.0 vs 1.5 ms, n = 181 (33k) 2.1 vs 2.3 ms,
// n = 256 (65k) 2.8 vs 1.6 ms.
constexpr int64_t kMinEntriesPerThread = int64_t{1} << 15;
// Spins before a waiting thread yields its core: a barrier is normally reached within
// microseconds, but yielding keeps an oversubscribed machine from stalling.
constexpr int kSpinsBeforeYield = 4096;

// Column masses below this are not trusted to a relative precision of the float type (their
// terms sit near the bottom of the exponent range), and take the exact log-sum-exp path.
template <class T>
constexpr T kTrustedMass = T(1e-25);
template <>
constexpr double kTrustedMass<double> = 1e-290;

// Row sweep over rows [r0, r1) of cost ([.., m], row-major), given g:
//   F_r = epsilon * (log a[r] - LSE_j((g_j - C_rj) / epsilon))  (exact log-domain update)
//   f[r] = (1 - w) f[r] + w F'_r   (w = relaxation, 1: plain; F' = F when balanced, else
//                                   epsilon * (log a[r] - lambda LSE), lambda the damping)
//   col_mass[j] += P_rj = exp((f_r + g_j - C_rj) / epsilon)     (the new plan's row)
// Returns sum_r (P_r. 1 - a_r exp(-F_r / reach))^2 of the new plan (F_r = f_r - epsilon
// log a_r), in double (0 up to
// rounding when w = 1 and reach = inf, where the target is a_r itself).
// `terms` is a scratch row of m entries that stays in L1 between the sweeps.
template <class T>
EOTFAST_HD double row_sweep_impl(const T* cost, int64_t m, int64_t r0, int64_t r1, const T* g,
                                 const T* a, T epsilon, T relaxation, T reach, T* f,
                                 T* col_mass, T* terms) {
  const T inv_epsilon = T(1) / epsilon;
  const T damping = unbalanced_damping(epsilon, reach);
  double row_squared_error = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = cost + r * m;
    // Max in cost units (epsilon > 0 keeps the argmax): one multiply less per entry.
    T vmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : vmax)
    for (int64_t j = 0; j < m; ++j) {
      const T v = g[j] - row[j];
      vmax = v > vmax ? v : vmax;
    }
    if (!(vmax > -std::numeric_limits<T>::infinity())) {
      // Every column has zero mass (or NaN crept in): the row can carry none either.
      f[r] = vmax;
      row_squared_error += static_cast<double>(a[r]) * a[r];
      continue;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < m; ++j) {
      terms[j] = exp_nonpositive((g[j] - row[j] - vmax) * inv_epsilon);
      sum += terms[j];
    }
    const T lse = vmax * inv_epsilon + std::log(sum);
    const T update = potential_update(std::log(a[r]), lse, epsilon);
    const T damped = damping == T(1) ? update : potential_update(std::log(a[r]), damping * lse, epsilon);
    // P_rj = terms_j * a_r / sum at f = update; the relaxed or damped f scales the row by
    // exp((f - update) / epsilon), which is 1 when w = 1 and reach = inf.
    // Plain where w = 1 or a potential is -inf (a point of zero mass: 0 * -inf is NaN).
    const bool plain = relaxation == T(1) || !std::isfinite(damped) || !std::isfinite(f[r]);
    const T relaxed = plain ? damped : (T(1) - relaxation) * f[r] + relaxation * damped;
    const T row_mass =
        relaxed == update ? a[r] : a[r] * std::exp((relaxed - update) * inv_epsilon);
    f[r] = relaxed;
    const double row_violation =
        static_cast<double>(row_mass) - unbalanced_target(a[r], relaxed, epsilon, reach);
    row_squared_error += row_violation * row_violation;
    const T row_scale = row_mass / sum;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) col_mass[j] += terms[j] * row_scale;
  }
  return row_squared_error;
}

EOTFAST_MULTIVERSION double row_sweep_f32(const float* cost, int64_t m, int64_t r0, int64_t r1,
                                          const float* g, const float* a, float epsilon,
                                          float relaxation, float reach, float* f,
                                          float* col_mass, float* terms) {
  return row_sweep_impl(cost, m, r0, r1, g, a, epsilon, relaxation, reach, f, col_mass, terms);
}

EOTFAST_MULTIVERSION double row_sweep_f64(const double* cost, int64_t m, int64_t r0,
                                          int64_t r1, const double* g, const double* a,
                                          double epsilon, double relaxation, double reach,
                                          double* f, double* col_mass, double* terms) {
  return row_sweep_impl(cost, m, r0, r1, g, a, epsilon, relaxation, reach, f, col_mass, terms);
}

inline double row_sweep(const float* cost, int64_t m, int64_t r0, int64_t r1, const float* g,
                        const float* a, float epsilon, float relaxation, float reach, float* f,
                        float* col_mass, float* terms) {
  return row_sweep_f32(cost, m, r0, r1, g, a, epsilon, relaxation, reach, f, col_mass, terms);
}

inline double row_sweep(const double* cost, int64_t m, int64_t r0, int64_t r1, const double* g,
                        const double* a, double epsilon, double relaxation, double reach,
                        double* f, double* col_mass, double* terms) {
  return row_sweep_f64(cost, m, r0, r1, g, a, epsilon, relaxation, reach, f, col_mass, terms);
}

// lse[j] = LSE_i((f_i - C_ij) / epsilon) for columns [j0, j1), streaming whole rows so the
// inner loops run over contiguous j: a max sweep, then a sum sweep. Used for the first g update
// (f = 0) and for single columns whose mass underflowed. `col_max` is scratch over [j0, j1).
template <class T>
void column_logsumexp(const T* cost, int64_t n, int64_t m, int64_t j0, int64_t j1, const T* f,
                      T epsilon, T* lse, T* col_max) {
  const T inv_epsilon = T(1) / epsilon;
  std::fill(col_max + j0, col_max + j1, -std::numeric_limits<T>::infinity());
  std::fill(lse + j0, lse + j1, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* row = cost + i * m;
    for (int64_t j = j0; j < j1; ++j) col_max[j] = std::max(col_max[j], f[i] - row[j]);
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* row = cost + i * m;
    for (int64_t j = j0; j < j1; ++j)
      lse[j] += exp_nonpositive((f[i] - row[j] - col_max[j]) * inv_epsilon);
  }
  for (int64_t j = j0; j < j1; ++j) lse[j] = col_max[j] * inv_epsilon + std::log(lse[j]);
}

// The potential of the first row that has one (f is -inf on rows of zero mass), or 0 when
// none does: the shift of the annealing gauge in solve_problem. Any row's potential is a valid
// shift, but f[0] was -inf whenever a[0] = 0, and g - inf turned the whole problem into -inf
// and NaN. Scans past the leading zero-mass rows only, usually none.
template <class T>
T gauge_shift(const T* f, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isfinite(f[i])) return f[i];
  return T(0);
}

// Sense-counting barrier for a team that meets twice per iteration: a futex-based barrier
// costs a system call per wait, which at ~0.5 ms per iteration would be measurable.
class SpinBarrier {
 public:
  explicit SpinBarrier(int team_size) : team_size_(team_size) {}

  void wait() {
    if (team_size_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team_size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins >= kSpinsBeforeYield) std::this_thread::yield();
    }
  }

 private:
  const int team_size_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

std::pair<int64_t, int64_t> split_range(int64_t len, int rank, int parts) {
  return {len * rank / parts, len * (rank + 1) / parts};
}

template <class T>
struct Problem {
  const T* cost;  // [n, m]
  const T* a;     // [n]
  const T* b;     // [m]
  T epsilon;
  T epsilon_start;
  T* f;  // [n]
  T* g;  // [m]
  int64_t* n_iter;
  T* marginal_error;
};

// Scratch of one team of `team_size` threads.
template <class T>
struct Workspace {
  std::vector<T> col_mass;  // [team_size, m]: each member's share of the column masses
  std::vector<T> terms;     // [team_size, m]: each member's row of max-shifted terms
  std::vector<T> g_next;    // [m]: g after the update, while the stopping test reads g
  std::vector<T> col_max;   // [m]: scratch of column_logsumexp
  Workspace(int team_size, int64_t m)
      : col_mass(static_cast<size_t>(team_size * m)),
        terms(static_cast<size_t>(team_size * m)),
        g_next(m),
        col_max(m) {}
};

// Run by every member of a team (rank in [0, team_size)). Members own disjoint row and column
// stripes and meet at the barrier twice per iteration. One loop trip is POT's iteration in
// the other order: f = F(g) by the row sweep, the error of (f, g), then g = G(f).
template <class T>
void solve_problem(const Problem<T>& p, int64_t n, int64_t m, int64_t max_iter, double tol,
                   double scaling, double relaxation, double reach_double, Workspace<T>& ws,
                   SpinBarrier& barrier, double* partial_squared_error, int rank,
                   int team_size) {
  const auto [i0, i1] = split_range(n, rank, team_size);
  const auto [j0, j1] = split_range(m, rank, team_size);
  T* my_col_mass = ws.col_mass.data() + rank * m;
  T* my_terms = ws.terms.data() + rank * m;
  T* g = p.g;
  T* g_new = ws.g_next.data();
  const T reach = static_cast<T>(reach_double);
  const bool balanced = std::isinf(reach);

  // Epsilon scaling: iteration iter (from 1) runs at max(epsilon, epsilon_start *
  // scaling^(iter - 1)), the same value in every member of the team.
  auto epsilon_of = [&](int64_t iter) {
    const double annealed = static_cast<double>(p.epsilon_start) * std::pow(scaling, iter - 1);
    return std::max(p.epsilon, static_cast<T>(annealed));
  };
  T epsilon = epsilon_of(1);
  // Over-relaxation only at the target epsilon (the annealing iterations are plain), and
  // only while the error decreases: every kStallCheckRounds there, a problem whose error
  // has not gone below the last check's goes on plain (relaxation amplifies rounding noise:
  // in float32 at epsilon = 1e-3 std(cost) it stalled at 9e-4, the plain iteration at 1e-4).
  bool relaxing = true;
  double checkpoint = std::numeric_limits<double>::infinity();
  // Relaxation mixes the previous f into the new one, so it waits until the previous
  // iteration ran at the target too (and left f in the gauge below unshifted).
  bool previous_at_target = false;
  int64_t target_iterations = 0;  // iterations measured at the target epsilon
  double probe_error = std::numeric_limits<double>::infinity();
  auto relaxation_at = [&](T e) {
    const bool slow = relaxing && target_iterations >= kProbeRounds;
    return e <= p.epsilon && previous_at_target && slow ? static_cast<T>(relaxation) : T(1);
  };

  // POT starts from f = 0 and updates g first: g = epsilon * (log b - LSE_i(-C_ij / epsilon)).
  std::fill(p.f + i0, p.f + i1, T(0));
  barrier.wait();
  column_logsumexp(p.cost, n, m, j0, j1, p.f, epsilon, g, ws.col_max.data());
  for (int64_t j = j0; j < j1; ++j)
    g[j] = potential_update(std::log(p.b[j]), unbalanced_damping(epsilon, reach) * g[j], epsilon);
  barrier.wait();

  for (int64_t iter = 1;; ++iter) {
    std::fill(my_col_mass, my_col_mass + m, T(0));
    const T w = relaxation_at(epsilon);
    // While annealing, g absorbs f_0 (f + c, g - c is the same plan): f stays near 0 as it
    // does from POT's start. Without it the annealed f ended near the costs' size (2460 on
    // image costs, d = 3072), g's incremental float32 update froze and the error stalled at
    // 2.6e-4 at epsilon = 1e-3 std(cost), where the plain iteration reaches 1e-4. Unbalanced
    // problems have no such gauge freedom (the damped updates are not shift-equivariant).
    // f_0 is that of the first row with mass (gauge_shift): a row of zero mass has f = -inf.
    const bool regauge = balanced && !(epsilon <= p.epsilon);
    const T damping = unbalanced_damping(epsilon, reach);
    double squared_error =
        row_sweep(p.cost, m, i0, i1, g, p.a, epsilon, w, reach, p.f, my_col_mass, my_terms);
    barrier.wait();

    // Read after the barrier: the whole new f is written, the same shift in every member.
    const T shift = regauge ? gauge_shift(p.f, n) : T(0);
    for (int64_t j = j0; j < j1; ++j) {
      T mass = 0;
      for (int r = 0; r < team_size; ++r) mass += ws.col_mass[r * m + j];
      const double diff =
          static_cast<double>(mass) - unbalanced_target(p.b[j], g[j], epsilon, reach);
      squared_error += diff * diff;
      if (p.b[j] == T(0)) {
        g_new[j] = -std::numeric_limits<T>::infinity();
      } else if (mass >= kTrustedMass<T>) {
        g_new[j] = damping == T(1)
                       ? potential_update_from_mass(g[j], std::log(p.b[j]), mass, epsilon)
                       : potential_update(std::log(p.b[j]),
                                          damping * (std::log(mass) - g[j] / epsilon), epsilon);
      } else {
        column_logsumexp(p.cost, n, m, j, j + 1, p.f, epsilon, g_new, ws.col_max.data());
        g_new[j] = potential_update(std::log(p.b[j]), damping * g_new[j], epsilon);
      }
      if (w != T(1) && std::isfinite(g_new[j]) && std::isfinite(g[j]))
        g_new[j] = (T(1) - w) * g[j] + w * g_new[j];
      if (regauge) g_new[j] += shift;
    }
    partial_squared_error[rank] = squared_error;
    barrier.wait();

    squared_error = 0.0;
    for (int r = 0; r < team_size; ++r) squared_error += partial_squared_error[r];
    const double error = std::sqrt(squared_error);
    // A problem may stop on its error only at the target epsilon; stopped earlier by
    // max_iter, its potentials belong to a larger epsilon and the error says so (inf).
    const bool at_target = epsilon <= p.epsilon;
    previous_at_target = at_target;
    // Every member sums the same partials in the same order, so all take the same branch.
    if (at_target) {
      ++target_iterations;
      if (target_iterations == kProbeRounds / 2) probe_error = error;
      if (target_iterations == kProbeRounds &&
          error < probe_error * std::pow(kSlowRate, kProbeRounds / 2))
        relaxing = false;
    }
    if (target_iterations > kProbeRounds && iter % kStallCheckRounds == 0) {
      if (!(error < checkpoint)) relaxing = false;
      checkpoint = error;
    }
    if ((at_target && error < tol) || iter == max_iter || std::isnan(error)) {
      if (rank == 0) {
        *p.n_iter = iter;
        *p.marginal_error = static_cast<T>(
            at_target || std::isnan(error) ? error : std::numeric_limits<double>::infinity());
      }
      break;
    }
    // Safe without a barrier: the next row sweep reads all of g_new, written before the
    // barrier above; the old g is not read again before the barrier after that sweep.
    std::swap(g, g_new);
    epsilon = epsilon_of(iter + 1);
  }
  // The returned g may sit in the workspace buffer after an odd number of swaps.
  if (g != p.g) std::copy(g + j0, g + j1, p.g + j0);
}

template <class F>
void run_team(int team_size, F&& body) {
  std::vector<std::thread> helpers;
  helpers.reserve(team_size - 1);
  for (int rank = 1; rank < team_size; ++rank) helpers.emplace_back(body, rank);
  body(0);
  for (auto& t : helpers) t.join();
}

void check_args(const void* cost, const void* a, const void* b, const void* epsilon,
                const void* epsilon_start, const void* f, const void* g, const void* n_iter,
                const void* marginal_error, int64_t batch, int64_t n, int64_t m,
                int64_t max_iter, double tol, double scaling, double relaxation, double reach) {
  if (!cost || !a || !b || !epsilon || !epsilon_start || !f || !g || !n_iter ||
      !marginal_error)
    throw std::invalid_argument("sinkhorn_cpu: null data pointer");
  if (batch < 1 || n < 1 || m < 1)
    throw std::invalid_argument("sinkhorn_cpu: batch, n and m must be >= 1, got batch=" +
                                std::to_string(batch) + ", n=" + std::to_string(n) +
                                ", m=" + std::to_string(m));
  if (max_iter < 1)
    throw std::invalid_argument("sinkhorn_cpu: max_iter must be >= 1, got " +
                                std::to_string(max_iter));
  if (!(tol >= 0.0))
    throw std::invalid_argument("sinkhorn_cpu: tol must be >= 0, got " + std::to_string(tol));
  if (!(scaling > 0.0 && scaling < 1.0))
    throw std::invalid_argument("sinkhorn_cpu: scaling must be in (0, 1), got " +
                                std::to_string(scaling));
  if (!(relaxation >= 1.0 && relaxation < 2.0))
    throw std::invalid_argument("sinkhorn_cpu: relaxation must be in [1, 2), got " +
                                std::to_string(relaxation));
  if (!(reach > 0.0))
    throw std::invalid_argument("sinkhorn_cpu: reach must be > 0 (inf: balanced), got " +
                                std::to_string(reach));
}

}  // namespace

template <class T>
void sinkhorn(const T* cost, const T* a, const T* b, const T* epsilon, const T* epsilon_start,
              T* f, T* g, int64_t* n_iter, T* marginal_error, int64_t batch, int64_t n,
              int64_t m, int64_t max_iter, double tol, double scaling, double relaxation,
              double reach, int num_threads) {
  check_args(cost, a, b, epsilon, epsilon_start, f, g, n_iter, marginal_error, batch, n, m,
             max_iter, tol, scaling, relaxation, reach);
  auto problem = [&](int64_t k) {
    return Problem<T>{cost + k * n * m, a + k * n,  b + k * m,  epsilon[k], epsilon_start[k],
                      f + k * n,        g + k * m,  n_iter + k, marginal_error + k};
  };
  int64_t threads = std::max(1, num_threads);
  threads = std::min(threads, std::max<int64_t>(1, batch * n * m / kMinEntriesPerThread));

  if (batch >= threads) {
    // Whole problems per thread, taken from a shared counter so that problems that converge
    // early free their thread for the rest.
    std::vector<Workspace<T>> workspaces;
    workspaces.reserve(threads);
    for (int64_t t = 0; t < threads; ++t) workspaces.emplace_back(1, m);
    std::atomic<int64_t> next_problem{0};
    run_team(static_cast<int>(threads), [&](int rank) {
      SpinBarrier alone(1);
      double squared_error = 0.0;
      for (int64_t k; (k = next_problem.fetch_add(1)) < batch;)
        solve_problem(problem(k), n, m, max_iter, tol, scaling, relaxation, reach,
                      workspaces[rank],
                      alone, &squared_error, 0, 1);
    });
  } else {
    // Fewer problems than threads: the team splits the rows and columns of each problem.
    threads = std::min({threads, n, m});
    Workspace<T> workspace(static_cast<int>(threads), m);
    SpinBarrier barrier(static_cast<int>(threads));
    std::vector<double> partial_squared_error(threads, 0.0);
    run_team(static_cast<int>(threads), [&](int rank) {
      for (int64_t k = 0; k < batch; ++k)
        solve_problem(problem(k), n, m, max_iter, tol, scaling, relaxation, reach, workspace,
                      barrier,
                      partial_squared_error.data(), rank, static_cast<int>(threads));
    });
  }
}

template void sinkhorn<float>(const float*, const float*, const float*, const float*,
                              const float*, float*, float*, int64_t*, float*, int64_t, int64_t,
                              int64_t, int64_t, double, double, double, double, int);
template void sinkhorn<double>(const double*, const double*, const double*, const double*,
                               const double*, double*, double*, int64_t*, double*, int64_t,
                               int64_t, int64_t, int64_t, double, double, double, double, int);

}  // namespace eotfast::cpu
