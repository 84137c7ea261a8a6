// Diagonal-Gaussian ops shared by the CPU and CUDA backends: the argument blocks the
// torch binding fills in (raw pointers, no torch types) and the per-element math.
//
// Layout: every tensor is viewed as (rows, cols) = (B, prod(other dims)). mu, logvar,
// z, grad_z and the gradients are contiguous; the prior may be a broadcast view, so it
// carries its own (row, col) strides (0 for a broadcast dim).
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
  const int64_t* seed = nullptr;  // host pointer on CPU, device pointer on CUDA
  uint64_t offset = 0;            // counter of element (r, c) is offset + r * cols + c
  void* z = nullptr;              // null: do not sample
  void* kl = nullptr;             // null: no KL; else (rows,), in dtype
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
  const int64_t* seed = nullptr;  // needed for the sampling term only
  uint64_t offset = 0;
  const void* grad_z = nullptr;   // null: z had no gradient
  const void* grad_kl = nullptr;  // null: kl had no gradient; else (rows,)
  void* grad_mu = nullptr;        // null: caller uses grad_z as grad_mu
  void* grad_logvar = nullptr;
  void* grad_prior_mu = nullptr;      // full (rows, cols); caller reduces broadcast dims
  void* grad_prior_logvar = nullptr;
  void* workspace = nullptr;  // unused: the backward needs no scratch
};

PYGEN_HD float fexp(float x) { return expf(x); }
PYGEN_HD double fexp(double x) { return ::exp(x); }
PYGEN_HD float flog(float x) { return logf(x); }
PYGEN_HD double flog(double x) { return ::log(x); }
PYGEN_HD float fsqrt(float x) { return sqrtf(x); }
PYGEN_HD double fsqrt(double x) { return ::sqrt(x); }

// KL(N(mu, e^lv) || N(pmu, e^plv)) per element, times 2 (the 0.5 is applied once per row).
// exp_fn: the backend's exp (the CPU passes its vectorisable one).
template <typename T, typename Exp>
PYGEN_HD T kl2_standard(T mu, T lv, Exp exp_fn) {
  return exp_fn(lv) + mu * mu - T(1) - lv;
}
template <typename T, typename Exp>
PYGEN_HD T kl2_prior(T mu, T lv, T pmu, T plv, Exp exp_fn) {
  const T d = mu - pmu;
  return exp_fn(lv - plv) + d * d * exp_fn(-plv) - T(1) - lv + plv;
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
  g_lv = T(0.5) * gk * (exp_fn(lv) - T(1));
}
// ... and w.r.t. mu, logvar, prior mu and prior logvar (Gaussian prior).
template <typename T, typename Exp>
PYGEN_HD void kl_grad_prior(T gk, T mu, T lv, T pmu, T plv, T& g_mu, T& g_lv, T& g_pmu, T& g_plv, Exp exp_fn) {
  const T d = mu - pmu;
  const T inv_pvar = exp_fn(-plv), ratio = exp_fn(lv - plv);
  g_mu = gk * d * inv_pvar;
  g_lv = T(0.5) * gk * (ratio - T(1));
  g_pmu = -g_mu;
  g_plv = T(0.5) * gk * (T(1) - ratio - d * d * inv_pvar);
}

}  // namespace pygen
