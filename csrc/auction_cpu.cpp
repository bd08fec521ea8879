// Batched auction solver of the linear assignment problem on the CPU.
//
// Forward auction with epsilon scaling (Bertsekas 1988, 1992), Gauss-Seidel: one unassigned
// row bids at a time. A bid of row i scans its cost row once:
//   w1 = min_j (C_ij + p_j) at j1 (lowest j on ties),  w2 = min_{j != j1} (C_ij + p_j),
// raises p_j1 by (w2 - w1) + epsilon and takes j1 from its previous owner, who bids later.
// Each phase starts with every row unassigned and keeps the prices of the previous one; the
// phase at epsilon_final leaves epsilon-complementary slackness, hence the m * epsilon bound.
// The problem is padded to m x m with zero rows n..m-1, which are never stored: their bids
// scan the prices only.
//
// The bid's scan is the whole cost: one pass over the row that keeps, in 32 (float) or 16
// (double) lanes, the smallest value, the block where it was found and the second smallest
// value, written with GCC's vector extension (four 32-byte vectors of each) so that the lanes
// stay in registers; they are merged without branches once per bid. Measured on a 2-core AMD
// EPYC (Zen 5), n = m = 1024 image costs, float32, one thread, best of 25 solves of 27405 bids
// (scaling 0.2, epsilon_start = cost range / 8):
//   this scan                                           115-117 ns per bid (0.11 ns per entry)
//   two vector chains instead of four                   123-125 ns
//   lanes in arrays under `#pragma omp simd`             770 ns (GCC spilled them and turned
//                                                        the index select into masked stores)
//   a min/second-min pass, then a search for the column  +12% (microbenchmark, one row in L1)
//   an x86-64-v4 (AVX-512) build of the same code        189 ns, so the clones stop at AVX2
// Prefetching the next bidder's row changed nothing (the matrix sits in L3; the hardware
// prefetcher follows the row).
#include "auction_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "multiversion.h"

namespace eotfast::cpu {
namespace {

// Index of a column in the scan's lanes: as wide as T, so that a vector of indices has as
// many lanes as a vector of values and the selects need no widening.
template <class T>
using LaneIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// 32-byte vectors (GCC's vector extension): one AVX2 register in the x86-64-v3 clone, two SSE
// registers in the baseline one.
template <class T>
struct Simd;
template <>
struct Simd<float> {
  typedef float Value __attribute__((vector_size(32)));
  typedef int32_t Index __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double Value __attribute__((vector_size(32)));
  typedef int64_t Index __attribute__((vector_size(32)));
};

// Independent vector accumulators of the scan: the running minimum is a dependency chain of
// one compare and select per vector, which four chains keep off the critical path.
constexpr int kChains = 4;

// Below this many cost entries in the whole batch, one thread solves every problem: starting
// and joining a second thread costs about what it would save. Measured on the 2-core CPU
// (shared with other jobs), two random n x n problems, epsilon 1 to 1e-4, 1 vs 2 threads:
// n = 128 (33k entries) 275 vs 278 us, n = 160 (51k) 363 vs 365 us, n = 181 (66k) 534 vs
// 362 us, n = 256 (131k) 737 vs 447 us.
constexpr int64_t kMinEntriesForThreads = int64_t{1} << 16;

template <class T>
struct Bid {
  T w1;        // min_j (C_ij + p_j)
  T w2;        // min over the other columns
  int64_t j1;  // the column of w1, lowest on ties
};

// An unaligned vector load. The vector goes out through a reference: returning a 32-byte
// vector by value from a function compiled without AVX draws GCC's ABI warning (-Wpsabi).
template <class V, class T>
inline __attribute__((always_inline)) void load(V& v, const T* at) {
  __builtin_memcpy(&v, at, sizeof(v));
}

// The bid of one row: `row` is its cost row, or null for a padding row (zero cost).
// Lane l of the scan sees the columns j = l mod (kChains * W); it keeps the smallest value,
// the start of the block where it was found (its column is that plus l) and the second
// smallest value. Strict comparisons keep the lowest column of a lane on ties.
template <class T, bool kZeroRow>
inline __attribute__((always_inline)) Bid<T> scan_impl(const T* row, const T* price,
                                                       int64_t m) {
  using V = typename Simd<T>::Value;
  using I = typename Simd<T>::Index;
  using J = LaneIndex<T>;
  constexpr int W = sizeof(V) / sizeof(T);
  constexpr int L = W * kChains;
  constexpr T inf = std::numeric_limits<T>::infinity();
  V best[kChains], second[kChains];
  I where[kChains];
  for (int k = 0; k < kChains; ++k) {
    best[k] = V{} + inf;
    second[k] = V{} + inf;
    where[k] = I{};
  }
  auto block_step = [&](const T* row_block, const T* price_block, int64_t j) {
    const I block = I{} + static_cast<J>(j);
#pragma GCC unroll 4
    for (int k = 0; k < kChains; ++k) {
      V v, c;
      load(v, price_block + k * W);
      if (!kZeroRow) {
        load(c, row_block + k * W);
        v += c;
      }
      const auto better = v < best[k];
      const V larger = better ? best[k] : v;  // max(v, best): the second if v is the new best
      second[k] = larger < second[k] ? larger : second[k];
      where[k] = better ? block : where[k];
      best[k] = better ? v : best[k];
    }
  };
  int64_t j = 0;
  for (; j + L <= m; j += L) block_step(kZeroRow ? nullptr : row + j, price + j, j);
  if (j < m) {
    // The last partial block, padded with +inf (which never updates a lane).
    T tail[L];
    const T zero[L] = {};
    for (int l = 0; l < L; ++l)
      tail[l] = j + l < m ? (kZeroRow ? T(0) : row[j + l]) + price[j + l] : inf;
    block_step(zero, tail, j);
  }
  // Merge without branches: w1 over all lanes, j1 the lowest column holding it, w2 the
  // smallest of that lane's second and every other lane's best.
  V low = best[0];
  for (int k = 1; k < kChains; ++k) low = best[k] < low ? best[k] : low;
  T w1 = low[0];
  for (int w = 1; w < W; ++w) w1 = low[w] < w1 ? low[w] : w1;
  I lane = I{};
  for (int w = 0; w < W; ++w) lane[w] = static_cast<J>(w);
  I column[kChains];
  I first = I{} + std::numeric_limits<J>::max();
  for (int k = 0; k < kChains; ++k) {
    column[k] = where[k] + lane + static_cast<J>(k * W);
    const I candidate = best[k] == w1 ? column[k] : std::numeric_limits<J>::max();
    first = candidate < first ? candidate : first;
  }
  J j1 = first[0];
  for (int w = 1; w < W; ++w) j1 = first[w] < j1 ? first[w] : j1;
  V rest = V{} + inf;
  for (int k = 0; k < kChains; ++k) {
    const V other = column[k] == j1 ? second[k] : best[k];
    rest = other < rest ? other : rest;
  }
  T w2 = rest[0];
  for (int w = 1; w < W; ++w) w2 = rest[w] < w2 ? rest[w] : w2;
  return {w1, w2, static_cast<int64_t>(j1)};
}

EOTFAST_MULTIVERSION Bid<float> scan_f32(const float* row, const float* price, int64_t m) {
  return row ? scan_impl<float, false>(row, price, m) : scan_impl<float, true>(row, price, m);
}

EOTFAST_MULTIVERSION Bid<double> scan_f64(const double* row, const double* price, int64_t m) {
  return row ? scan_impl<double, false>(row, price, m) : scan_impl<double, true>(row, price, m);
}

inline Bid<float> scan(const float* row, const float* price, int64_t m) {
  return scan_f32(row, price, m);
}

inline Bid<double> scan(const double* row, const double* price, int64_t m) {
  return scan_f64(row, price, m);
}

// State of one problem, reused by a thread for the problems it takes.
struct Workspace {
  std::vector<int32_t> owner;       // [m]: row holding column j, -1 if none
  std::vector<int32_t> column_of;   // [m]: column held by padded row i, -1 if none
  std::vector<int32_t> unassigned;  // [m]: ring of rows waiting to bid
  explicit Workspace(int64_t m) : owner(m), column_of(m), unassigned(m) {}
};

struct Outcome {
  int64_t bids;
  bool finished;  // false: stopped by max_bids or by a price leaving T's range
};

// Runs the phases of one problem on `price` (in/out); leaves ws.column_of filled for the real
// rows that hold a column.
template <class T>
Outcome solve_problem(const T* cost, T* price, T epsilon_start, T epsilon_final, T scaling,
                      int64_t max_bids, int64_t n, int64_t m, Workspace& ws) {
  int32_t* owner = ws.owner.data();
  int32_t* column_of = ws.column_of.data();
  int32_t* queue = ws.unassigned.data();
  int64_t bids = 0;
  T epsilon = std::max(epsilon_final, epsilon_start);
  for (;;) {
    std::fill(owner, owner + m, -1);
    std::fill(column_of, column_of + m, -1);
    // Rows bid in increasing order, then in the order they lost their column (a FIFO ring:
    // at most m rows wait). Measured against a LIFO stack on n = m = 1024 image costs: 3-7%
    // fewer bids over nine epsilon schedules (27405 vs 28641 at scaling 0.2), same time per bid.
    for (int64_t k = 0; k < m; ++k) queue[k] = static_cast<int32_t>(k);
    int64_t head = 0, waiting = m;
    while (waiting > 0) {
      if (bids == max_bids) return {bids, false};
      const int32_t i = queue[head];
      head = head + 1 == m ? 0 : head + 1;
      --waiting;
      const Bid<T> bid = scan(i < n ? cost + i * m : nullptr, price, m);
      // C + p overflowed: no finite price separates the rows (and j1 may be no column).
      if (!std::isfinite(bid.w1)) return {bids, false};
      const T w2 = m > 1 ? bid.w2 : bid.w1;
      const T old_price = price[bid.j1];
      T new_price = old_price + ((w2 - bid.w1) + epsilon);
      // An increment below half the price's ulp rounds away: step to the next float instead,
      // so every bid raises a price and the phase terminates.
      if (!(new_price > old_price))
        new_price = std::nextafter(old_price, std::numeric_limits<T>::infinity());
      // Overflow (or a NaN from an infinite C + p): no finite price separates the rows.
      if (!std::isfinite(new_price)) return {bids, false};
      price[bid.j1] = new_price;
      ++bids;
      const int32_t previous = owner[bid.j1];
      owner[bid.j1] = i;
      column_of[i] = static_cast<int32_t>(bid.j1);
      if (previous >= 0) {
        column_of[previous] = -1;
        const int64_t tail = head + waiting;
        queue[tail < m ? tail : tail - m] = previous;
        ++waiting;
      }
    }
    if (!(epsilon > epsilon_final)) return {bids, true};
    // A scaling within an ulp of 1 would round epsilon * scaling back to epsilon forever.
    T next = epsilon * scaling;
    if (!(next < epsilon)) next = std::nextafter(epsilon, T(0));
    epsilon = std::max(epsilon_final, next);
  }
}

template <class T>
void check_args(const T* cost, const T* prices_in, const T* epsilon_start,
                const T* epsilon_final, T scaling, int64_t max_bids, const int64_t* assignment,
                const T* prices, const T* epsilon, const int64_t* n_bids, int64_t batch,
                int64_t n, int64_t m) {
  if (!cost || !prices_in || !epsilon_start || !epsilon_final || !assignment || !prices ||
      !epsilon || !n_bids)
    throw std::invalid_argument("auction_cpu: null data pointer");
  if (batch < 1 || n < 1 || m < n)
    throw std::invalid_argument(
        "auction_cpu: need batch >= 1 and 1 <= n <= m (each row gets its own column), got "
        "batch=" + std::to_string(batch) + ", n=" + std::to_string(n) +
        ", m=" + std::to_string(m));
  if (m > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("auction_cpu: m must be < 2^31, got " + std::to_string(m));
  if (!(scaling > T(0) && scaling < T(1)))
    throw std::invalid_argument(
        "auction_cpu: scaling must be in (0, 1) in the cost's precision, got " +
        std::to_string(scaling));
  if (max_bids < 1)
    throw std::invalid_argument("auction_cpu: max_bids must be >= 1, got " +
                                std::to_string(max_bids));
  for (int64_t k = 0; k < batch; ++k) {
    const T start = epsilon_start[k];
    const T final_ = epsilon_final[k];
    if (!(final_ > T(0) && std::isfinite(final_) && start >= final_ && std::isfinite(start)))
      throw std::invalid_argument(
          "auction_cpu: problem " + std::to_string(k) +
          " needs finite epsilons with 0 < epsilon_final <= epsilon_start, got epsilon_start=" +
          std::to_string(start) + ", epsilon_final=" + std::to_string(final_));
  }
}

}  // namespace

template <class T>
void auction(const T* cost, const T* prices_in, const T* epsilon_start, const T* epsilon_final,
             T scaling, int64_t max_bids, int64_t* assignment, T* prices, T* epsilon,
             int64_t* n_bids, int64_t batch, int64_t n, int64_t m, int num_threads) {
  check_args(cost, prices_in, epsilon_start, epsilon_final, scaling, max_bids, assignment,
             prices, epsilon, n_bids, batch, n, m);
  int64_t threads = std::min<int64_t>(std::max(1, num_threads), batch);
  if (batch * n * m < kMinEntriesForThreads) threads = 1;

  // Workspaces are allocated here, so that an allocation failure throws in the caller's
  // thread and not in a helper (where it would terminate the process).
  std::vector<Workspace> workspaces(threads, Workspace(m));
  // Whole problems per thread, taken from a shared counter: a problem that needs few bids
  // frees its thread for the next one.
  std::atomic<int64_t> next_problem{0};
  auto work = [&](int64_t rank) {
    Workspace& ws = workspaces[rank];
    for (int64_t k; (k = next_problem.fetch_add(1)) < batch;) {
      T* price = prices + k * m;
      std::copy(prices_in + k * m, prices_in + (k + 1) * m, price);
      const Outcome out = solve_problem(cost + k * n * m, price, epsilon_start[k],
                                        epsilon_final[k], scaling, max_bids, n, m, ws);
      int64_t* columns = assignment + k * n;
      for (int64_t i = 0; i < n; ++i) columns[i] = ws.column_of[i];
      if (!out.finished) {
        // Still an injection: the real rows without a column take the columns no real row
        // holds, in increasing order (padding rows give theirs up).
        int64_t j = 0;
        for (int64_t i = 0; i < n; ++i) {
          if (columns[i] >= 0) continue;
          while (ws.owner[j] >= 0 && ws.owner[j] < n) ++j;
          columns[i] = j++;
        }
      }
      epsilon[k] = out.finished ? epsilon_final[k] : std::numeric_limits<T>::infinity();
      n_bids[k] = out.bids;
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  for (int64_t rank = 1; rank < threads; ++rank) helpers.emplace_back(work, rank);
  work(0);
  for (auto& t : helpers) t.join();
}

template void auction<float>(const float*, const float*, const float*, const float*, float,
                             int64_t, int64_t*, float*, float*, int64_t*, int64_t, int64_t,
                             int64_t, int);
template void auction<double>(const double*, const double*, const double*, const double*,
                              double, int64_t, int64_t*, double*, double*, int64_t*, int64_t,
                              int64_t, int64_t, int);

}  // namespace eotfast::cpu
