// CUDA kernels for reparameterized sampling, Gaussian KL and their gradients.
// No torch headers: raw pointers in, a stream and an error string out.
//
// Per-element math: pygen/gaussian.h (shared with the CPU kernels); work split and
// reductions: rowwise.cuh.
#include "gaussian_cuda.h"
#include "pygen/dispatch.h"
#include "rowwise.cuh"

namespace pygen::cuda {
namespace {

template <typename T, bool SAMPLE, bool KL, bool PRIOR>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(GaussianFwdArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const T* __restrict__ mu = static_cast<const T*>(a.mu);
  const T* __restrict__ lv = static_cast<const T*>(a.logvar);
  const T* __restrict__ pmu = static_cast<const T*>(a.prior_mu);
  const T* __restrict__ plv = static_cast<const T*>(a.prior_logvar);
  T* __restrict__ z = static_cast<T*>(a.z);

  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  const int64_t r = tk.r;
  A acc = 0;
  if (tk.active) {
    const uint64_t seed = SAMPLE ? static_cast<uint64_t>(*a.seed) : 0;
#pragma unroll 4
    for (int64_t c = tk.c0 + tk.lane; c < tk.c1; c += group) {
      const int64_t i = r * a.cols + c;
      const A m = to_acc(mu[r * a.mu_stride_row + c]), l = to_acc(lv[r * a.lv_stride_row + c]);
      if constexpr (SAMPLE) {
        const A eps = static_cast<A>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
        z[i] = from_acc<T>(reparam_sample(m, l, eps, FExp{}));
      }
      if constexpr (KL) {
        if constexpr (PRIOR) {
          acc += kl2_prior(m, l, to_acc(pmu[r * a.pmu_stride_row + c * a.pmu_stride_col]),
                           to_acc(plv[r * a.plv_stride_row + c * a.plv_stride_col]), FExp{});
        } else {
          acc += kl2_standard(m, l, FExp{});
        }
      }
    }
  }
  if constexpr (KL) store_row_sum<T>(acc, tk, group, chunks, A(0.5), a.kl, a.workspace);
}

template <typename T, bool GZ, bool GKL, bool PRIOR, bool WRITE_GMU>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(GaussianBwdArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const T* __restrict__ mu = static_cast<const T*>(a.mu);
  const T* __restrict__ lv = static_cast<const T*>(a.logvar);
  const T* __restrict__ pmu = static_cast<const T*>(a.prior_mu);
  const T* __restrict__ plv = static_cast<const T*>(a.prior_logvar);
  const T* __restrict__ gz = static_cast<const T*>(a.grad_z);
  T* __restrict__ gmu = static_cast<T*>(a.grad_mu);
  T* __restrict__ glv = static_cast<T*>(a.grad_logvar);
  T* __restrict__ gpmu = static_cast<T*>(a.grad_prior_mu);
  T* __restrict__ gplv = static_cast<T*>(a.grad_prior_logvar);

  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  if (!tk.active) return;  // no barrier below: early exit is safe
  const int64_t r = tk.r;
  const uint64_t seed = GZ ? static_cast<uint64_t>(*a.seed) : 0;
  const A gk = GKL ? static_cast<const A*>(a.grad_kl)[r] : A(0);
#pragma unroll 4
  for (int64_t c = tk.c0 + tk.lane; c < tk.c1; c += group) {
    const int64_t i = r * a.cols + c;
    const A l = to_acc(lv[r * a.lv_stride_row + c]);
    A g_mu = 0, g_lv = 0;
    if constexpr (GZ) {
      const A g = to_acc(gz[i]);
      const A eps = static_cast<A>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
      g_mu = g;
      g_lv = reparam_grad_logvar(g, l, eps, FExp{});
    }
    if constexpr (GKL) {
      const A m = to_acc(mu[r * a.mu_stride_row + c]);
      A k_mu, k_lv;
      if constexpr (PRIOR) {
        A k_pmu, k_plv;
        kl_grad_prior(gk, m, l, to_acc(pmu[r * a.pmu_stride_row + c * a.pmu_stride_col]),
                      to_acc(plv[r * a.plv_stride_row + c * a.plv_stride_col]), k_mu, k_lv, k_pmu, k_plv, FExp{});
        if (gpmu != nullptr) {  // prior gradients only when asked for
          gpmu[i] = from_acc<T>(k_pmu);
          gplv[i] = from_acc<T>(k_plv);
        }
      } else {
        kl_grad_standard(gk, m, l, k_mu, k_lv, FExp{});
      }
      g_mu += k_mu;
      g_lv += k_lv;
    }
    if constexpr (WRITE_GMU) gmu[i] = from_acc<T>(g_mu);
    glv[i] = from_acc<T>(g_lv);
  }
}

}  // namespace

size_t gaussian_forward_workspace_bytes(const GaussianFwdArgs& a) {
  return a.kl == nullptr ? 0 : partials_bytes(a.rows, a.cols, a.dtype);
}

const char* gaussian_forward(const GaussianFwdArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_bool(a.z != nullptr, [&](auto sample) {
      with_bool(a.kl != nullptr, [&](auto kl) {
        with_bool(a.prior_mu != nullptr, [&](auto prior) {
          forward_kernel<T, decltype(sample)::value, decltype(kl)::value, decltype(prior)::value>
              <<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
        });
      });
    });
    if (a.kl != nullptr) finish_rows<T>(g, a.rows, a.workspace, 0.5, a.kl, s);
  });
}

const char* gaussian_backward(const GaussianBwdArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_bool(a.grad_z != nullptr, [&](auto gz) {
      with_bool(a.grad_kl != nullptr, [&](auto gkl) {
        with_bool(a.prior_mu != nullptr, [&](auto prior) {
          with_bool(a.grad_mu != nullptr, [&](auto write_gmu) {
            backward_kernel<T, decltype(gz)::value, decltype(gkl)::value, decltype(prior)::value,
                            decltype(write_gmu)::value>
                <<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
          });
        });
      });
    });
  });
}

}  // namespace pygen::cuda
