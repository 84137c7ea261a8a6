// Diffusion sampler steps in alpha space (DDPM ancestral, DDIM), written once for the CPU
// and CUDA backends: per-sample coefficients gathered from the schedule table inside the
// kernel (no host sync), then one pass over the sample.
//
// x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, with ab = alphas_cumprod[t], ab_prev the value at
// prev_t (prev_t < 0: final_alpha_cumprod). The model output gives (x0, eps) by prediction
// type; x0 is optionally clipped to [-r, r]; then
//   DDIM: prev = sqrt(ab_prev) x0 + sqrt(max(1 - ab_prev - s^2, 0)) eps + s noise,
//         s = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev))
//   DDPM: beta = 1 - ab / ab_prev,
//         prev = sqrt(ab_prev) beta / (1 - ab) x0 + sqrt(1 - beta) (1 - ab_prev) / (1 - ab) x
//                + s noise, s^2 = max((1 - ab_prev) / (1 - ab) beta, 1e-20) (fixed_small) or beta
//         (fixed_large); no noise where t == 0.
// The same formulas as pygen/diffusion/steps.py (ddim_step_ref, ddpm_step_ref).
#pragma once
#include <cstdint>

#include "pygen/gaussian.h"  // DType, PYGEN_HD, philox

namespace pygen {

enum class StepKind : int { kDDIM = 0, kDDPMFixedSmall = 1, kDDPMFixedLarge = 2 };
enum class Prediction : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };

struct StepArgs {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  StepKind kind = StepKind::kDDIM;
  Prediction prediction = Prediction::kEpsilon;
  double eta = 0;             // DDIM only
  double clip_range = 0;      // 0: no clipping of x0
  bool clipped_eps = false;   // DDIM use_clipped_model_output: eps recomputed from clipped x0
  const void* model_output = nullptr;  // (rows, cols), in dtype
  const void* sample = nullptr;
  const void* alphas_cumprod = nullptr;  // (T,), float32 or float64 (table_f64)
  bool table_f64 = false;
  int64_t num_timesteps = 0;
  double final_alpha_cumprod = 1.0;
  const int64_t* t = nullptr;       // (rows,) per-sample timesteps
  const int64_t* prev_t = nullptr;  // (rows,); < 0 means final_alpha_cumprod
  const void* noise = nullptr;      // explicit (rows, cols) noise in dtype, or null
  const int64_t* seed = nullptr;    // in-kernel Philox noise when noise is null and seed is set
  uint64_t offset = 0;
  void* prev_sample = nullptr;
  void* pred_original = nullptr;    // optional x0 output
  void* workspace = nullptr;        // unused
};

template <typename A>
struct StepCoeffs {
  A sa, sb;        // sqrt(ab), sqrt(1 - ab): (x0, eps) from the model output
  A c_x0, c_eps, c_x, c_noise;  // prev = c_x0 x0 + c_eps eps + c_x x + c_noise noise
};

template <typename A>
PYGEN_HD A table_at(const StepArgs& a, int64_t i) {
  if (i < 0) return A(a.final_alpha_cumprod);
  return a.table_f64 ? A(static_cast<const double*>(a.alphas_cumprod)[i])
                     : A(static_cast<const float*>(a.alphas_cumprod)[i]);
}

template <typename A>
PYGEN_HD A step_sqrt(A x) {
  return x > A(0) ? fsqrt(x) : A(0);
}

template <typename A>
PYGEN_HD StepCoeffs<A> step_coeffs(const StepArgs& a, int64_t row) {
  const int64_t t = a.t[row], tp = a.prev_t[row];
  const A ab = table_at<A>(a, t), ab_prev = table_at<A>(a, tp);
  StepCoeffs<A> c;
  c.sa = step_sqrt(ab);
  c.sb = step_sqrt(A(1) - ab);
  if (a.kind == StepKind::kDDIM) {
    const A var = (A(1) - ab_prev) / (A(1) - ab) * (A(1) - ab / ab_prev);
    const A s = A(a.eta) * step_sqrt(var);
    c.c_x0 = step_sqrt(ab_prev);
    c.c_eps = step_sqrt(A(1) - ab_prev - s * s);
    c.c_x = A(0);
    c.c_noise = s;
  } else {
    const A alpha = ab / ab_prev, beta = A(1) - alpha;
    c.c_x0 = step_sqrt(ab_prev) * beta / (A(1) - ab);
    c.c_eps = A(0);
    c.c_x = step_sqrt(alpha) * (A(1) - ab_prev) / (A(1) - ab);
    A var = a.kind == StepKind::kDDPMFixedSmall ? (A(1) - ab_prev) / (A(1) - ab) * beta : beta;
    if (a.kind == StepKind::kDDPMFixedSmall && var < A(1e-20)) var = A(1e-20);
    c.c_noise = t > 0 ? step_sqrt(var) : A(0);
  }
  return c;
}

// One element: returns prev, writes x0.
template <typename A>
PYGEN_HD A step_element(const StepArgs& a, const StepCoeffs<A>& c, A mo, A x, A noise, A& x0_out) {
  A x0, eps;
  if (a.prediction == Prediction::kEpsilon) {
    eps = mo;
    x0 = (x - c.sb * eps) / c.sa;
  } else if (a.prediction == Prediction::kSample) {
    x0 = mo;
    eps = (x - c.sa * x0) / c.sb;
  } else {
    x0 = c.sa * x - c.sb * mo;
    eps = c.sa * mo + c.sb * x;
  }
  if (a.clip_range > 0) {
    const A r = A(a.clip_range);
    x0 = x0 < -r ? -r : (x0 > r ? r : x0);
    if (a.clipped_eps) eps = (x - c.sa * x0) / c.sb;
  }
  x0_out = x0;
  return c.c_x0 * x0 + c.c_eps * eps + c.c_x * x + c.c_noise * noise;
}

// ---- training: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps and the per-sample weighted MSE ----
// eps is drawn in-kernel from (seed, offset + i) by both ops, so nothing noise-sized is
// stored between the forward and the backward. Targets: eps (epsilon), x0 (sample),
// v = sqrt(ab) eps - sqrt(1 - ab) x0 (v_prediction). Min-SNR-gamma weights (Hang et al.
// 2023), snr = ab / (1 - ab): min(snr, g) / snr, min(snr, g) / (snr + 1), min(snr, g).
struct LossArgs {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  Prediction prediction = Prediction::kEpsilon;
  double snr_gamma = 0;  // 0: unweighted
  const void* x0 = nullptr;
  const void* model_output = nullptr;
  const void* alphas_cumprod = nullptr;
  bool table_f64 = false;
  const int64_t* t = nullptr;
  const int64_t* seed = nullptr;
  uint64_t offset = 0;
  void* x_t = nullptr;   // q_sample output
  void* loss = nullptr;  // (rows,)
  const void* grad_loss = nullptr;
  void* grad_model_output = nullptr;
  void* grad_x0 = nullptr;
  void* workspace = nullptr;
};

template <typename A>
struct LossCoeffs {
  A sa, sb, w;  // sqrt(ab), sqrt(1 - ab), the loss weight
};

template <typename A>
PYGEN_HD LossCoeffs<A> loss_coeffs(const LossArgs& a, int64_t row) {
  const int64_t t = a.t[row];
  const A ab = a.table_f64 ? A(static_cast<const double*>(a.alphas_cumprod)[t])
                           : A(static_cast<const float*>(a.alphas_cumprod)[t]);
  LossCoeffs<A> c;
  c.sa = fsqrt(ab);
  c.sb = fsqrt(A(1) - ab);
  c.w = A(1);
  if (a.snr_gamma > 0) {
    const A snr = ab / (A(1) - ab), g = A(a.snr_gamma);
    const A m = snr < g ? snr : g;
    c.w = a.prediction == Prediction::kEpsilon ? m / snr : (a.prediction == Prediction::kVPrediction ? m / (snr + A(1)) : m);
  }
  return c;
}

// The regression target for one element and d target / d x0.
template <typename A>
PYGEN_HD A loss_target(const LossArgs& a, const LossCoeffs<A>& c, A x0, A eps, A& dtarget_dx0) {
  if (a.prediction == Prediction::kEpsilon) {
    dtarget_dx0 = A(0);
    return eps;
  }
  if (a.prediction == Prediction::kSample) {
    dtarget_dx0 = A(1);
    return x0;
  }
  dtarget_dx0 = -c.sb;
  return c.sa * eps - c.sb * x0;
}

}  // namespace pygen
