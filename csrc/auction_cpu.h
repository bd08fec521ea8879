// Batched auction solver of the linear assignment problem on the CPU.
#pragma once

#include <cstdint>

namespace eotfast::cpu {

// Solves `batch` independent min-cost assignment problems: each of the n rows of a problem
// gets a distinct column of m (n <= m), minimizing sum_i C[i, sigma(i)]. Forward auction with
// epsilon scaling (Bertsekas), one bidder at a time, on the square m x m problem padded with
// m - n rows of zero cost (not stored).
//
// cost           [batch, n, m]  row-major, finite
// prices_in      [batch, m]  initial column prices (zeros: cold start); read only
// epsilon_start  [batch]  epsilon of the first phase, >= epsilon_final
// epsilon_final  [batch]  epsilon of the last phase, > 0
// scaling        in (0, 1): phase k runs at max(epsilon_final, epsilon_start * scaling^k)
// max_bids       >= 1: cap on the bids of one problem over all its phases
// assignment     [batch, n]  out: column of each row, distinct within a problem
// prices         [batch, m]  out: final prices (may alias nothing else)
// epsilon        [batch]  out: epsilon_final, or +inf where max_bids stopped the problem
// n_bids         [batch]  out: bids made
//
// Guarantee: sum_i C[i, assignment_i] <= optimum + m * epsilon (epsilon-complementary
// slackness of the padded problem), up to the rounding of C + p in T. A problem stopped by
// max_bids (or by prices leaving T's finite range) still returns an injection: its unassigned
// rows take the free columns in increasing order, and its epsilon is +inf.
//
// Problems are spread over `num_threads` threads (one problem per thread at a time); a single
// problem runs on one thread. Throws std::invalid_argument on inconsistent sizes or epsilons.
template <class T>
void auction(const T* cost, const T* prices_in, const T* epsilon_start, const T* epsilon_final,
             T scaling, int64_t max_bids, int64_t* assignment, T* prices, T* epsilon,
             int64_t* n_bids, int64_t batch, int64_t n, int64_t m, int num_threads);

}  // namespace eotfast::cpu
