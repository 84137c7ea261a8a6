// CPU kernels for the sampler steps (DDPM, DDIM; Euler, Euler-ancestral, DPM-Solver++ 2M): pygen/diffusion.h's math,
// coefficients per sample from the schedule table, noise drawn in-kernel (or given).
// Compiled once per ISA like the other CPU kernels.
#include <type_traits>

#include "cpu_kernels.h"
#include "noise.h"
#include "pygen/diffusion.h"
#include "rowwise.h"

#ifndef PYGEN_CPU_ISA
#define PYGEN_CPU_ISA baseline
#endif

namespace pygen::cpu::PYGEN_CPU_ISA {
namespace {

// One block's noise as a pointer that the element loop reads unconditionally (a conditional
// load inside the loop would keep it from vectorising): the given noise, in-kernel normals
// (counters ctr .. ctr + n - 1) or zeros.
template <typename T>
struct BlockNoise {
  alignas(64) float eps[kBlock];
  alignas(64) T buf[kBlock];
  bool zeroed = false;

  const T* get(const T* given, bool draw, uint64_t seed, uint64_t ctr, int64_t i0, int64_t n) {
    if (given != nullptr) return given + i0;
    if (draw) {
      fill_normals(seed, ctr, n, eps);
      zeroed = false;
      if constexpr (std::is_same_v<T, float>) {
        return eps;
      } else {
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(eps[j]);
        return buf;
      }
    }
    return zeros();
  }

  const T* zeros() {
    if (!zeroed) {
      for (int64_t j = 0; j < kBlock; ++j) buf[j] = T(0);
      zeroed = true;
    }
    return buf;
  }
};

template <typename T, Prediction P, bool CLIP, bool CLIPPED_EPS>
void step_kernel(const StepArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict mo = static_cast<const T*>(a.model_output);
  const T* __restrict x = static_cast<const T*>(a.sample);
  const T* given = static_cast<const T*>(a.noise);
  T* __restrict prev = static_cast<T*>(a.prev_sample);
  T* x0_out = static_cast<T*>(a.pred_original);  // null: x0 not asked for
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const T clip = static_cast<T>(a.clip_range);

  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    BlockNoise<T> noise;
    alignas(64) T x0_scratch[kBlock];  // where x0 goes when it is not asked for
    const StepCoeffs<T> c = step_coeffs<T>(a, r);
    const bool draw = given == nullptr && a.seed != nullptr && c.c_noise != T(0);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = b0 + kBlock < c1 ? kBlock : c1 - b0;
      const int64_t i0 = r * cols + b0;
      const T* __restrict z = noise.get(given, draw, seed, a.offset + static_cast<uint64_t>(i0), i0, n);
      T* __restrict x0b = x0_out != nullptr ? x0_out + i0 : x0_scratch;
      const T* __restrict mob = mo + i0;
      const T* __restrict xb = x + i0;
      T* __restrict pb = prev + i0;
      for (int64_t j = 0; j < n; ++j) {
        pb[j] = step_element_t<P, CLIP, CLIPPED_EPS, T>(c, clip, mob[j], xb[j], z[j], x0b[j]);
      }
    }
    return T(0);
  });
}

template <typename T>
void step_typed(const StepArgs& a, const ParallelFor& pf) {
  with_step_variant(a, [&](auto pred, auto clip, auto clipped) {
    step_kernel<T, decltype(pred)::value, decltype(clip)::value, decltype(clipped)::value>(a, pf);
  });
}

template <typename T>
void q_sample_kernel(const LossArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict x0 = static_cast<const T*>(a.x0);
  T* __restrict xt = static_cast<T*>(a.x_t);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    alignas(64) float eps[kBlock];
    const LossCoeffs<T> c = loss_coeffs<T>(a, r);
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = b0 + kBlock < c1 ? kBlock : c1 - b0;
      const int64_t i0 = r * cols + b0;
      fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
      for (int64_t j = 0; j < n; ++j) xt[i0 + j] = c.sa * x0[i0 + j] + c.sb * static_cast<T>(eps[j]);
    }
    return T(0);
  });
}

// Forward (loss != null): loss[r] = w mean((mo - target)^2). Backward (grad_loss != null):
// grad_mo = g w 2 (mo - target) / N, grad_x0 = -grad_mo d target / d x0.
template <typename T>
void mse_kernel(const LossArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict x0 = static_cast<const T*>(a.x0);
  const T* __restrict mo = static_cast<const T*>(a.model_output);
  const T* __restrict gl = static_cast<const T*>(a.grad_loss);
  T* __restrict gmo = static_cast<T*>(a.grad_model_output);
  T* __restrict gx0 = static_cast<T*>(a.grad_x0);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  T* __restrict loss = static_cast<T*>(a.loss);
  // the row's scale (w / N) is applied per row inside the task, so the reduction scale is 1
  for_each_row_chunk<T>(a.rows, cols, parallel_for, loss, T(1), [&](int64_t r, int64_t c0, int64_t c1) {
    alignas(64) float eps[kBlock];
    const LossCoeffs<T> c = loss_coeffs<T>(a, r);
    const T scale = c.w / static_cast<T>(cols);
    const T g = gl != nullptr ? gl[r] : T(0);
    LaneSum<T> sum;
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = b0 + kBlock < c1 ? kBlock : c1 - b0;
      const int64_t i0 = r * cols + b0;
      fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
      sum.add(n, [&](int64_t j) {
        T dt;
        const T d = mo[i0 + j] - loss_target<T>(a, c, x0[i0 + j], static_cast<T>(eps[j]), dt);
        if (gl != nullptr) {
          const T gm = g * scale * T(2) * d;
          gmo[i0 + j] = gm;
          if (gx0 != nullptr) gx0[i0 + j] = -gm * dt;  // only when x0 needs a gradient
        }
        return d * d;
      });
    }
    return sum.total() * scale;
  });
}

template <typename T>
void sigma_step_kernel(const SigmaStepArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict mo = static_cast<const T*>(a.model_output);
  const T* __restrict x = static_cast<const T*>(a.sample);
  const T* px0 = static_cast<const T*>(a.prev_x0);
  const T* given = static_cast<const T*>(a.noise);
  T* __restrict prev = static_cast<T*>(a.prev_sample);
  T* x0_out = static_cast<T*>(a.pred_original);  // null: x0 not asked for
  const uint64_t seed = a.seed != nullptr ? static_cast<uint64_t>(*a.seed) : 0;
  const bool dpm = a.kind == SigmaKind::kDpmpp2mMidpoint || a.kind == SigmaKind::kDpmpp2mHeun;

  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    BlockNoise<T> noise;
    alignas(64) T zeros[kBlock] = {};
    alignas(64) T x0_scratch[kBlock];
    const SigmaCoeffs<T> c = sigma_coeffs<T>(a, r);
    const bool noisy = c.churn != T(0) || c.c_noise != T(0);
    const bool draw = noisy && given == nullptr && a.seed != nullptr;
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = b0 + kBlock < c1 ? kBlock : c1 - b0;
      const int64_t i0 = r * cols + b0;
      const T* __restrict z = noise.get(noisy ? given : nullptr, draw, seed, a.offset + static_cast<uint64_t>(i0), i0, n);
      const T* __restrict p = c.second ? px0 + i0 : zeros;
      T* __restrict x0b = x0_out != nullptr ? x0_out + i0 : x0_scratch;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        prev[i] = sigma_element<T>(c, dpm, mo[i], x[i], z[j], p[j], x0b[j]);
      }
    }
    return T(0);
  });
}

}  // namespace

void q_sample(const LossArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? q_sample_kernel<double>(a, pf) : q_sample_kernel<float>(a, pf);
}

void diffusion_mse(const LossArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? mse_kernel<double>(a, pf) : mse_kernel<float>(a, pf);
}

void alpha_step(const StepArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? step_typed<double>(a, pf) : step_typed<float>(a, pf);
}

void sigma_step(const SigmaStepArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? sigma_step_kernel<double>(a, pf) : sigma_step_kernel<float>(a, pf);
}

}  // namespace pygen::cpu::PYGEN_CPU_ISA
