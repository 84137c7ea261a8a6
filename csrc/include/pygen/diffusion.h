// Diffusion sampler steps and training ops, written once for the CPU and CUDA backends:
// per-sample coefficients gathered from the schedule table inside the kernel (no host
// sync), then one pass over the sample. Alpha-space steps (DDPM ancestral, DDIM) first,
// then the sigma-space steps (Euler, Euler-ancestral, DPM-Solver++ 2M), then training.
//
// Table indices (t, prev_t, index) are range-checked by the binding for CPU tensors; on
// CUDA a check would need a sync, so the kernels clamp them into the table instead of
// reading out of bounds.
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
#include <type_traits>

#include "pygen/gaussian.h"  // DType, PYGEN_HD, philox

namespace pygen {

enum class StepKind : int { kDDIM = 0, kDDPMFixedSmall = 1, kDDPMFixedLarge = 2 };
enum class Prediction : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };

// What every sampler step reads and writes (filled by one helper of the binding).
struct StepIO {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  Prediction prediction = Prediction::kEpsilon;
  const void* model_output = nullptr;  // (rows, cols), in dtype
  const void* sample = nullptr;
  const void* noise = nullptr;         // explicit (rows, cols) noise in dtype, or null
  const int64_t* seed = nullptr;       // in-kernel Philox noise when noise is null and seed is set
  uint64_t offset = 0;
  void* prev_sample = nullptr;
  void* pred_original = nullptr;  // x0 output, or null when not asked for
  void* workspace = nullptr;      // unused
};

struct StepArgs : StepIO {
  StepKind kind = StepKind::kDDIM;
  double eta = 0;             // DDIM only
  double clip_range = 0;      // 0: no clipping of x0
  bool clipped_eps = false;   // DDIM use_clipped_model_output: eps recomputed from clipped x0
  const void* alphas_cumprod = nullptr;  // (T,), float32 or float64 (table_f64)
  bool table_f64 = false;
  int64_t num_timesteps = 0;
  double final_alpha_cumprod = 1.0;
  const int64_t* t = nullptr;       // (rows,) per-sample timesteps, or one for all (t_stride 0)
  const int64_t* prev_t = nullptr;  // the same; < 0 means final_alpha_cumprod
  int64_t t_stride = 1, prev_t_stride = 1;
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

// i clamped into [lo, hi] (see the note at the top).
PYGEN_HD int64_t clamp_index(int64_t i, int64_t lo, int64_t hi) { return i < lo ? lo : (i > hi ? hi : i); }

template <typename A>
PYGEN_HD StepCoeffs<A> step_coeffs(const StepArgs& a, int64_t row) {
  const int64_t t = clamp_index(a.t[row * a.t_stride], 0, a.num_timesteps - 1);
  const int64_t tp_in = a.prev_t[row * a.prev_t_stride];
  const int64_t tp = tp_in < 0 ? -1 : clamp_index(tp_in, 0, a.num_timesteps - 1);
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

// One element: returns prev, writes x0. The prediction type and the clipping switches are
// template parameters so that the CPU's element loop has no branch left (with them read at
// run time, GCC kept the clipped loop scalar: clip_sample=True, diffusers' default, was
// 5-10x slower than no clipping). The clamp is two selects that keep a NaN x0 NaN
// (NaN propagates within its row on every backend).
template <Prediction P, bool CLIP, bool CLIPPED_EPS, typename A>
PYGEN_HD A step_element_t(const StepCoeffs<A>& c, A clip, A mo, A x, A noise, A& x0_out) {
  A x0, eps;
  if constexpr (P == Prediction::kEpsilon) {
    eps = mo;
    x0 = (x - c.sb * eps) / c.sa;
  } else if constexpr (P == Prediction::kSample) {
    x0 = mo;
    eps = (x - c.sa * x0) / c.sb;
  } else {
    x0 = c.sa * x - c.sb * mo;
    eps = c.sa * mo + c.sb * x;
  }
  if constexpr (CLIP) {
    x0 = x0 < -clip ? -clip : x0;
    x0 = x0 > clip ? clip : x0;
    if constexpr (CLIPPED_EPS) eps = (x - c.sa * x0) / c.sb;
  }
  x0_out = x0;
  return c.c_x0 * x0 + c.c_eps * eps + c.c_x * x + c.c_noise * noise;
}

// Calls f(P, CLIP, CLIPPED_EPS) with the step's settings as compile-time constants (host side).
template <typename F>
static inline void with_step_variant(const StepArgs& a, F&& f) {
  const bool clip = a.clip_range > 0, clipped = clip && a.clipped_eps;
  auto by_clip = [&](auto pred) {
    if (!clip) {
      f(pred, std::false_type{}, std::false_type{});
    } else if (clipped) {
      f(pred, std::true_type{}, std::true_type{});
    } else {
      f(pred, std::true_type{}, std::false_type{});
    }
  };
  if (a.prediction == Prediction::kEpsilon) {
    by_clip(std::integral_constant<Prediction, Prediction::kEpsilon>{});
  } else if (a.prediction == Prediction::kSample) {
    by_clip(std::integral_constant<Prediction, Prediction::kSample>{});
  } else {
    by_clip(std::integral_constant<Prediction, Prediction::kVPrediction>{});
  }
}

// ---- sigma-space steps (Euler, Euler-ancestral, DPM-Solver++ 2M) -----------------------
// sigmas is the sampler's VE noise table (descending, usually ending in 0); row r steps from
// s = sigmas[index[r]] to sn = sigmas[index[r] + 1]. Formulas of pygen/diffusion/steps.py:
//   Euler (Karras et al. 2022, alg. 2): g = gamma where s_tmin <= s <= s_tmax (else 0),
//     s_hat = s (1 + g), x_hat = x + sqrt(s_hat^2 - s^2) s_noise noise,
//     prev = x_hat + (x_hat - x0) (sn - s_hat) / s_hat.
//   Euler-ancestral: s_up = sqrt(sn^2 (s^2 - sn^2) / s^2), s_down = sqrt(sn^2 - s_up^2),
//     prev = x + (x - x0) (s_down - s) / s + s_up noise.
//   DPM-Solver++ 2M on the VP sample (alpha = 1/sqrt(s^2+1), sigma_t = s alpha, lambda = -log s):
//     prev = (sigma_t,n / sigma_t) x - alpha_n (e^-h - 1) x0 [+ c_d (x0 - prev_x0)],
//     e^-h = sn / s exactly (no expm1 cancellation); the second-order term where prev_x0 is
//     given, index >= 1 and sn > 0, with r = log(s_prev / s) / log(s / sn):
//     midpoint c_d = -alpha_n (e^-h - 1) / (2 r), heun c_d = alpha_n ((e^-h - 1) / h + 1) / r.
// x0 by prediction type: Euler/ancestral (sample in sigma space, x = x0 + s eps) epsilon
// x_hat - s_hat mo, v -s / sqrt(s^2+1) mo + x / (s^2+1); DPM (VP sample) epsilon
// (x - sigma_t mo) / alpha, v alpha x - sigma_t mo; sample: mo.
enum class SigmaKind : int { kEuler = 0, kEulerAncestral = 1, kDpmpp2mMidpoint = 2, kDpmpp2mHeun = 3 };

struct SigmaStepArgs : StepIO {
  SigmaKind kind = SigmaKind::kEuler;
  double gamma = 0, s_tmin = 0, s_tmax = 0, s_noise = 1;  // Euler churn
  const void* prev_x0 = nullptr;      // DPM-Solver++ 2M: the previous step's x0, or null
  const void* sigmas = nullptr;       // (num_sigmas,), float32 or float64 (table_f64)
  bool table_f64 = false;
  int64_t num_sigmas = 0;
  const int64_t* index = nullptr;     // (rows,) in [0, num_sigmas - 2], or one for all (index_stride 0)
  int64_t index_stride = 1;
};

template <typename A>
struct SigmaCoeffs {
  A churn;       // x_hat = x + churn noise (Euler)
  A px, pm;      // x0 = px x_hat + pm mo
  A c_x, c_dx;   // prev = c_x x_hat + c_dx (x_hat - x0)   (Euler, ancestral)
  A c_x0, c_d;   // prev = c_x x + c_x0 x0 + c_d (x0 - prev_x0) (DPM)
  A c_noise;     // + c_noise noise
  bool second;   // DPM: the second-order term applies
};

template <typename A>
PYGEN_HD A sigma_at(const SigmaStepArgs& a, int64_t i) {
  return a.table_f64 ? A(static_cast<const double*>(a.sigmas)[i]) : A(static_cast<const float*>(a.sigmas)[i]);
}

template <typename A>
PYGEN_HD SigmaCoeffs<A> sigma_coeffs(const SigmaStepArgs& a, int64_t row) {
  const int64_t i = clamp_index(a.index[row * a.index_stride], 0, a.num_sigmas - 2);
  const A s = sigma_at<A>(a, i), sn = sigma_at<A>(a, i + 1);
  SigmaCoeffs<A> c{};
  const bool dpm = a.kind == SigmaKind::kDpmpp2mMidpoint || a.kind == SigmaKind::kDpmpp2mHeun;
  if (!dpm) {
    A s_hat = s;
    if (a.kind == SigmaKind::kEuler) {
      // the gate compares the table's value, as the host-side schedulers do
      const double sd = a.table_f64 ? static_cast<const double*>(a.sigmas)[i]
                                    : double(static_cast<const float*>(a.sigmas)[i]);
      const A g = (a.s_tmin <= sd && sd <= a.s_tmax) ? A(a.gamma) : A(0);
      s_hat = s * (g + A(1));
      c.churn = g > A(0) ? step_sqrt(s_hat * s_hat - s * s) * A(a.s_noise) : A(0);
      c.c_dx = (sn - s_hat) / s_hat;
    } else {
      const A up = step_sqrt(sn * sn * (s * s - sn * sn) / (s * s));
      const A down = step_sqrt(sn * sn - up * up);
      c.c_dx = (down - s) / s;
      c.c_noise = up;
    }
    c.c_x = A(1);
    if (a.prediction == Prediction::kEpsilon) {
      c.px = A(1), c.pm = -s_hat;
    } else if (a.prediction == Prediction::kSample) {
      c.px = A(0), c.pm = A(1);
    } else {
      const A s2 = s * s + A(1);
      c.px = A(1) / s2, c.pm = -s / fsqrt(s2);
    }
    return c;
  }
  const A al = A(1) / fsqrt(s * s + A(1)), aln = A(1) / fsqrt(sn * sn + A(1));
  const A sig = s * al, sign = sn * aln;
  const A em1 = sn / s - A(1);  // e^-h - 1
  c.c_x = sign / sig;
  c.c_x0 = -aln * em1;
  if (a.prediction == Prediction::kEpsilon) {
    c.px = A(1) / al, c.pm = -s;  // (x - sigma_t mo) / alpha; sigma_t / alpha = s
  } else if (a.prediction == Prediction::kSample) {
    c.px = A(0), c.pm = A(1);
  } else {
    c.px = al, c.pm = -sig;
  }
  c.second = a.prev_x0 != nullptr && i >= 1 && sn > A(0);
  if (c.second) {
    const A sp = sigma_at<A>(a, i - 1);
    const A h = flog(s / sn), r = flog(sp / s) / h;
    c.c_d = a.kind == SigmaKind::kDpmpp2mMidpoint ? -aln * em1 / (A(2) * r) : aln * (em1 / h + A(1)) / r;
  }
  return c;
}

// One element: returns prev, writes x0. px0 is the previous x0 (DPM second order).
template <typename A>
PYGEN_HD A sigma_element(const SigmaCoeffs<A>& c, bool dpm, A mo, A x, A noise, A px0, A& x0_out) {
  const A xh = x + c.churn * noise;
  const A x0 = c.px * xh + c.pm * mo;
  x0_out = x0;
  if (!dpm) return c.c_x * xh + c.c_dx * (xh - x0) + c.c_noise * noise;
  return c.c_x * x + c.c_x0 * x0 + (c.second ? c.c_d * (x0 - px0) : A(0));
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
  int64_t num_timesteps = 0;
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
  const int64_t t = clamp_index(a.t[row], 0, a.num_timesteps - 1);
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
