// Per-element helpers of log-domain Sinkhorn: bit_cast, exp_nonpositive, potential_update and
// potential_update_from_mass, and the over-relaxation rule's constants. They are the only code
// the C++ CPU kernels (sinkhorn_cpu.cpp) and the CUDA kernel (cuda/sinkhorn_cuda.cu, which uses
// exp_nonpositive and potential_update) share. The loops, reductions, thread layout and float summation order are each backend's
// own, and nvcc compiles these helpers with --use_fast_math, so the CPU tests against POT
// check the shared helpers' source but not the CUDA kernel's results.
//
// Notation (POT's sinkhorn_log, with potentials in cost units):
//   plan      P_ij = exp((f_i + g_j - C_ij) / epsilon)
//   g update  g_j  = epsilon * (log b_j - LSE_i((f_i - C_ij) / epsilon))
//   f update  f_i  = epsilon * (log a_i - LSE_j((g_j - C_ij) / epsilon))
// One iteration is a g update followed by an f update, so after it the row marginals are
// exact (up to rounding, and unless the update is over-relaxed) and the column marginals carry
// the remaining error.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define EOTFAST_HD __host__ __device__ __forceinline__
#else
#define EOTFAST_HD inline __attribute__((always_inline))
#endif

namespace eotfast {

// The over-relaxation rule (eotfast/ops/common.py holds these constants and the torch
// reference states the rule; tests/test_sinkhorn.py::test_relaxation_constants_agree keeps
// these copies equal to them). A problem makes kProbeRounds plain iterations at the target
// epsilon and relaxes only if its error fell by less than kSlowRate per iteration over their
// second half; every kStallCheckRounds iterations there, an error not below the last check's
// turns relaxation off.
constexpr int64_t kStallCheckRounds = 32;
constexpr int64_t kProbeRounds = 16;
constexpr double kSlowRate = 0.8;
// kSlowRate^(kProbeRounds / 2), for the CUDA kernel's probe test (0.8^8).
constexpr double kSlowRatePower = 0.16777216;

// Reinterprets the bits of a float as an integer or back. __builtin_bit_cast (GCC >= 11,
// Clang, nvcc) keeps the exp loops vectorizable; a memcpy through a local blocks GCC's
// vectorizer ("statement clobbers memory").
template <class To, class From>
EOTFAST_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  return __builtin_bit_cast(To, from);
}

// exp(x) for x <= 0 without libm, so that loops calling it vectorize (a call to expf blocks
// the vectorizer, and exp throughput bounds log-domain Sinkhorn on the CPU). Every caller
// passes max-shifted log-sum-exp terms, which are <= 0; positive arguments are not supported.
// x = k ln2 + r with |r| <= ln2/2; exp(r) by a polynomial; 2^k assembled in the exponent bits.
// k is rounded with the 1.5 * 2^(mantissa bits) shifter trick: exact round-to-nearest and
// vectorizable without SSE4.1's roundps. Arguments below the normal range (-inf included)
// give 0; NaN propagates.
EOTFAST_HD float exp_nonpositive(float x) {
  const float lo = -87.33654f;  // log(FLT_MIN): below it the result would be subnormal
  const float xc = x < lo ? lo : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float t = xc * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  // Cody-Waite split of ln2 keeps r accurate for |k| up to 126.
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  // Degree-5 interpolation of exp at the Chebyshev nodes of [-ln2/2, ln2/2]: relative error
  // 2.4e-7 (4 ulp) evaluated in float32, two multiply-adds fewer than Cephes' degree 7, which
  // is worth 10% of a Sinkhorn sweep here.
  float p = 8.369148708879948e-3f;
  p = p * r + 4.1917506605386734e-2f;
  p = p * r + 1.6666504740715027e-1f;
  p = p * r + 4.9998870491981506e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0000001192092896f;
  const int32_t k_int = bit_cast<int32_t>(t) - bit_cast<int32_t>(shifter);
  const float two_k = bit_cast<float>((k_int + 127) << 23);
  return x < lo ? 0.0f : p * two_k;
}

EOTFAST_HD double exp_nonpositive(double x) {
  const double lo = -708.3964185322641;  // log(DBL_MIN)
  const double xc = x < lo ? lo : x;
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = xc * 1.4426950408889634074 + shifter;
  const double k = t - shifter;
  const double r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  // Taylor series to degree 13: truncation error < 5e-18 relative for |r| <= ln2/2.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t k_int = bit_cast<int64_t>(t) - bit_cast<int64_t>(shifter);
  const double two_k = bit_cast<double>((k_int + 1023) << 52);
  return x < lo ? 0.0 : p * two_k;
}

// New potential of one side from the log-sum-exp over the other side:
// epsilon * (log marginal - lse). A zero marginal gives -inf: that row or column carries no
// mass.
template <class T>
EOTFAST_HD T potential_update(T log_marginal, T lse, T epsilon) {
  return epsilon * (log_marginal - lse);
}

// The same update written through the mass that the current plan puts on this row or column:
// since mass = exp(potential / epsilon + lse), epsilon * (log marginal - lse) equals
// potential + epsilon * (log marginal - log mass). It needs no sweep over the other side once
// the mass is known, and is exact as long as the mass is a normal float (callers check).
template <class T>
EOTFAST_HD T potential_update_from_mass(T potential, T log_marginal, T mass, T epsilon) {
  return potential + epsilon * (log_marginal - std::log(mass));
}

// Unbalanced OT (Chizat, Peyré, Schmitzer & Vialard, 2018; Séjourné et al., 2019): with the
// marginal constraints replaced by rho KL(P 1 | a) + rho KL(P^T 1 | b) and the entropy taken
// relative to a (x) b (POT's reg_type="kl", GeomLoss), the update becomes
// epsilon * (log a - lambda LSE), lambda = rho / (rho + epsilon): potential_update with the
// log-sum-exp damped. Written as 1 / (1 + epsilon / rho) so that rho = inf (balanced) gives
// exactly 1.
template <class T>
EOTFAST_HD T unbalanced_damping(T epsilon, T reach) {
  return T(1) / (T(1) + epsilon / reach);
}

// The mass a row (or column) of the plan has at the fixed point, given its potential f:
// P 1 = a e^(-F / rho) with F = f - epsilon log a, which is a itself when rho = inf (e^(-0) = 1
// exactly) and 0 where the marginal is 0 (whose potential is -inf).
template <class T>
EOTFAST_HD double unbalanced_target(T marginal, T potential, T epsilon, T reach) {
  if (marginal == T(0)) return 0.0;
  const double relative = static_cast<double>(potential) - epsilon * std::log(double(marginal));
  return static_cast<double>(marginal) * std::exp(-relative / reach);
}

}  // namespace eotfast
