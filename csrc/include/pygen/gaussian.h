// Diagonal-Gaussian ops shared by the CPU and CUDA backends: the argument blocks the
// torch binding fills in (raw pointers, no torch types) and the per-element math.
//
// Layout: every tensor is viewed as (rows, cols) = (B, prod(other dims)). z, grad_z and
// the gradients are contiguous; mu and logvar are row-contiguous (each row's elements
// contiguous) with their own row strides, so the halves of a chunk()ed encoder output are
// read in place; the prior may be a broadcast view, so it carries its own (row, col)
// strides (0 for a broadcast dim).
#pragma once
#include <cstdint>
#include "pygen/philox.h"

namespace pygen {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct GaussianFwdArgs {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  const void* mu = nullptr;
  const void* logvar = nullptr;
  const void* prior_mu = nullptr;      // null: standard-normal prior
  const void* prior_logvar = nullptr;  // set together with prior_mu
  int64_t pmu_stride_row = 0, pmu_stride_col = 0, plv_stride_row = 0, plv_stride_col = 0;
  int64_t mu_stride_row = 0, lv_stride_row = 0;  // row strides of mu and logvar (cols: contiguous)
  const int64_t* seed = nullptr;  // host pointer on CPU, device pointer on CUDA
  uint64_t offset = 0;            // counter of element (r, c) is offset + r * cols + c
  void* z = nullptr;              // null: do not sample
  void* kl = nullptr;             // null: no KL; else (rows,) in float32 (float64 for float64)
  void* workspace = nullptr;      // CUDA only: rows * kl_chunks accumulators (acc type)
};

struct GaussianBwdArgs {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  const void* mu = nullptr;  // needed for the KL term only
  const void* logvar = nullptr;
  const void* prior_mu = nullptr;
  const void* prior_logvar = nullptr;
  int64_t pmu_stride_row = 0, pmu_stride_col = 0, plv_stride_row = 0, plv_stride_col = 0;
  int64_t mu_stride_row = 0, lv_stride_row = 0;  // row strides of mu and logvar (cols: contiguous)
  const int64_t* seed = nullptr;  // needed for the sampling term only
  uint64_t offset = 0;
  const void* grad_z = nullptr;   // null: z had no gradient
  const void* grad_kl = nullptr;  // null: kl had no gradient; else (rows,)
  void* grad_mu = nullptr;        // null: caller uses grad_z as grad_mu
  void* grad_logvar = nullptr;
  void* grad_prior_mu = nullptr;      // full (rows, cols), or null: not asked for; caller reduces broadcast dims
  void* grad_prior_logvar = nullptr;  // set together with grad_prior_mu
  void* workspace = nullptr;  // unused: the backward needs no scratch
};

PYGEN_HD float fexp(float x) { return expf(x); }
PYGEN_HD double fexp(double x) { return ::exp(x); }
PYGEN_HD float flog(float x) { return logf(x); }
PYGEN_HD double flog(double x) { return ::log(x); }
PYGEN_HD float fsqrt(float x) { return sqrtf(x); }
PYGEN_HD double fsqrt(double x) { return ::sqrt(x); }

// e^x - 1 - x and e^x - 1 without cancellation near 0 (a collapsed latent has lv ~ 0,
// where exp(lv) - 1 - lv loses every digit in float32). |x| < 0.5: the Taylor series
// x^2 (1/2! + x (1/3! + ... x / 16!)), enough terms for float64; beyond, exp_fn(x) - 1
// cancels at most a few ulp. Branch-free (a select), so the CPU loops still vectorise.
// The same formula in kernels/_rowwise.py (Triton) and pygen/ops/gaussian.py (torch).
template <typename T>
PYGEN_HD T exp_series_tail(T x) {  // e^x - 1 - x for |x| < 0.5, written out for the vectoriser
  T p = T(1.0 / 20922789888000.0);
  p = p * x + T(1.0 / 1307674368000.0);
  p = p * x + T(1.0 / 87178291200.0);
  p = p * x + T(1.0 / 6227020800.0);
  p = p * x + T(1.0 / 479001600.0);
  p = p * x + T(1.0 / 39916800.0);
  p = p * x + T(1.0 / 3628800.0);
  p = p * x + T(1.0 / 362880.0);
  p = p * x + T(1.0 / 40320.0);
  p = p * x + T(1.0 / 5040.0);
  p = p * x + T(1.0 / 720.0);
  p = p * x + T(1.0 / 120.0);
  p = p * x + T(1.0 / 24.0);
  p = p * x + T(1.0 / 6.0);
  p = p * x + T(0.5);
  return x * x * p;
}
template <typename T, typename Exp>
PYGEN_HD T exp_m1_m_x(T x, Exp exp_fn) {
  const T small = exp_series_tail(x), large = exp_fn(x) - T(1) - x;
  return (x < T(0.5) && x > T(-0.5)) ? small : large;
}
template <typename T, typename Exp>
PYGEN_HD T exp_m1(T x, Exp exp_fn) {
  const T small = exp_series_tail(x) + x, large = exp_fn(x) - T(1);
  return (x < T(0.5) && x > T(-0.5)) ? small : large;
}

// KL(N(mu, e^lv) || N(pmu, e^plv)) per element, times 2 (the 0.5 is applied once per row):
// (e^{lv-plv} - 1 - (lv-plv)) + (mu-pmu)^2 e^{-plv}. exp_fn: the backend's exp (the CPU
// passes its vectorisable one).
template <typename T, typename Exp>
PYGEN_HD T kl2_standard(T mu, T lv, Exp exp_fn) {
  return exp_m1_m_x(lv, exp_fn) + mu * mu;
}
template <typename T, typename Exp>
PYGEN_HD T kl2_prior(T mu, T lv, T pmu, T plv, Exp exp_fn) {
  const T d = mu - pmu;
  return exp_m1_m_x(lv - plv, exp_fn) + d * d * exp_fn(-plv);
}

// Reparameterized sample z = mu + e^{lv / 2} eps, and dL/dlogvar of its term,
// 0.5 grad_z e^{lv / 2} eps (eps regenerated from the counter, never stored).
template <typename T, typename Exp>
PYGEN_HD T reparam_sample(T mu, T lv, T eps, Exp exp_fn) {
  return mu + exp_fn(T(0.5) * lv) * eps;
}
template <typename T, typename Exp>
PYGEN_HD T reparam_grad_logvar(T grad_z, T lv, T eps, Exp exp_fn) {
  return T(0.5) * grad_z * exp_fn(T(0.5) * lv) * eps;
}

// Gradients of gk * KL (gk: the row's grad_kl) w.r.t. mu and logvar (standard prior)...
template <typename T, typename Exp>
PYGEN_HD void kl_grad_standard(T gk, T mu, T lv, T& g_mu, T& g_lv, Exp exp_fn) {
  g_mu = gk * mu;
  g_lv = T(0.5) * gk * exp_m1(lv, exp_fn);
}
// ... and w.r.t. mu, logvar, prior mu and prior logvar (Gaussian prior).
template <typename T, typename Exp>
PYGEN_HD void kl_grad_prior(T gk, T mu, T lv, T pmu, T plv, T& g_mu, T& g_lv, T& g_pmu, T& g_plv, Exp exp_fn) {
  const T d = mu - pmu;
  const T inv_pvar = exp_fn(-plv), ratio_m1 = exp_m1(lv - plv, exp_fn);
  g_mu = gk * d * inv_pvar;
  g_lv = T(0.5) * gk * ratio_m1;
  g_pmu = -g_mu;
  g_plv = T(-0.5) * gk * (ratio_m1 + d * d * inv_pvar);
}

}  // namespace pygen
