// CUDA kernels for the sampler steps (DDPM, DDIM; Euler, Euler-ancestral, DPM-Solver++ 2M): pygen/diffusion.h's math,
// coefficients gathered from the schedule table on the device, in-kernel Philox noise.
// Nothing is read back to the host, so a sampling loop can be captured in a CUDA graph.
#include "diffusion_cuda.h"
#include "rowwise.cuh"

namespace pygen::cuda {
namespace {

// A step row's noise: the given tensor, in-kernel Philox from (seed, offset + i), or zero.
// Shared by the alpha- and sigma-space steps (the CPU kernels' BlockNoise does the same).
template <typename T, typename A>
struct RowNoise {
  const T* __restrict given;
  uint64_t seed = 0, offset;
  bool read, draw;

  __device__ RowNoise(const StepIO& a, bool use_given, bool use_draw)
      : given(static_cast<const T*>(a.noise)), offset(a.offset) {
    read = use_given && given != nullptr;
    draw = use_draw && given == nullptr && a.seed != nullptr;
    if (draw) seed = static_cast<uint64_t>(*a.seed);
  }
  __device__ A at(int64_t i) const {
    if (read) return to_acc(given[i]);
    return draw ? static_cast<A>(philox_normal(seed, offset + static_cast<uint64_t>(i))) : A(0);
  }
};

template <typename T, Prediction P, bool CLIP, bool CLIPPED_EPS>
__global__ void __launch_bounds__(kThreads) alpha_step_kernel(StepArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  if (!tk.active) return;  // no barrier in this kernel
  const T* __restrict mo = static_cast<const T*>(a.model_output);
  const T* __restrict x = static_cast<const T*>(a.sample);
  T* __restrict prev = static_cast<T*>(a.prev_sample);
  T* __restrict x0_out = static_cast<T*>(a.pred_original);
  const StepCoeffs<A> c = step_coeffs<A>(a, tk.r);
  const RowNoise<T, A> noise(a, true, c.c_noise != A(0));  // given noise is read as the CPU does
#pragma unroll 4
  for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
    const int64_t i = tk.r * a.cols + col;
    A x0;
    prev[i] = from_acc<T>(
        step_element_t<P, CLIP, CLIPPED_EPS, A>(c, A(a.clip_range), to_acc(mo[i]), to_acc(x[i]), noise.at(i), x0));
    if (x0_out != nullptr) x0_out[i] = from_acc<T>(x0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sigma_step_kernel(SigmaStepArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  if (!tk.active) return;  // no barrier in this kernel
  const T* __restrict mo = static_cast<const T*>(a.model_output);
  const T* __restrict x = static_cast<const T*>(a.sample);
  const T* __restrict px0 = static_cast<const T*>(a.prev_x0);
  T* __restrict prev = static_cast<T*>(a.prev_sample);
  T* __restrict x0_out = static_cast<T*>(a.pred_original);
  const SigmaCoeffs<A> c = sigma_coeffs<A>(a, tk.r);
  const bool dpm = a.kind == SigmaKind::kDpmpp2mMidpoint || a.kind == SigmaKind::kDpmpp2mHeun;
  const bool noisy = c.churn != A(0) || c.c_noise != A(0);
  const RowNoise<T, A> noise(a, noisy, noisy);
#pragma unroll 4
  for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
    const int64_t i = tk.r * a.cols + col;
    A x0;
    const A p = c.second ? to_acc(px0[i]) : A(0);
    prev[i] = from_acc<T>(sigma_element<A>(c, dpm, to_acc(mo[i]), to_acc(x[i]), noise.at(i), p, x0));
    if (x0_out != nullptr) x0_out[i] = from_acc<T>(x0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(LossArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  if (!tk.active) return;
  const T* __restrict x0 = static_cast<const T*>(a.x0);
  T* __restrict xt = static_cast<T*>(a.x_t);
  const LossCoeffs<A> c = loss_coeffs<A>(a, tk.r);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
#pragma unroll 4
  for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
    const int64_t i = tk.r * a.cols + col;
    const A eps = static_cast<A>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
    xt[i] = from_acc<T>(c.sa * to_acc(x0[i]) + c.sb * eps);
  }
}

template <typename T, bool BACKWARD>
__global__ void __launch_bounds__(kThreads) mse_kernel(LossArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  const T* __restrict x0 = static_cast<const T*>(a.x0);
  const T* __restrict mo = static_cast<const T*>(a.model_output);
  A acc = 0, scale = 0;
  if (tk.active) {
    const LossCoeffs<A> c = loss_coeffs<A>(a, tk.r);
    scale = c.w / static_cast<A>(a.cols);
    const A g = BACKWARD ? static_cast<const A*>(a.grad_loss)[tk.r] : A(0);
    const uint64_t seed = static_cast<uint64_t>(*a.seed);
#pragma unroll 4
    for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
      const int64_t i = tk.r * a.cols + col;
      const A eps = static_cast<A>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
      A dt;
      const A d = to_acc(mo[i]) - loss_target<A>(a, c, to_acc(x0[i]), eps, dt);
      if constexpr (BACKWARD) {
        const A gm = g * scale * A(2) * d;
        static_cast<T*>(a.grad_model_output)[i] = from_acc<T>(gm);
        if (a.grad_x0 != nullptr) static_cast<T*>(a.grad_x0)[i] = from_acc<T>(-gm * dt);
      }
      acc += d * d;
    }
  }
  if constexpr (!BACKWARD) store_row_sum<T>(acc * scale, tk, group, chunks, A(1), a.loss, a.workspace);
}

}  // namespace

const char* q_sample(const LossArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0 || a.cols == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    q_sample_kernel<T><<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
  });
}

size_t diffusion_mse_workspace_bytes(const LossArgs& a) {
  return a.loss == nullptr ? 0 : partials_bytes(a.rows, a.cols, a.dtype);
}

const char* diffusion_mse(const LossArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.grad_loss != nullptr) {
      mse_kernel<T, true><<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
    } else {
      mse_kernel<T, false><<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
      finish_rows<T>(g, a.rows, a.workspace, 1.0, a.loss, s);
    }
  });
}

const char* alpha_step(const StepArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0 || a.cols == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_step_variant(a, [&](auto pred, auto clip, auto clipped) {
      alpha_step_kernel<T, decltype(pred)::value, decltype(clip)::value, decltype(clipped)::value>
          <<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
    });
  });
}

const char* sigma_step(const SigmaStepArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0 || a.cols == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    sigma_step_kernel<T><<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
  });
}

}  // namespace pygen::cuda
