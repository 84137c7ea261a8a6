// CPU kernels for reparameterized sampling, Gaussian KL and their gradients.
//
// Compiled once per instruction set (PYGEN_CPU_ISA = baseline, avx2, avx512; see
// CMakeLists.txt); cpu_dispatch.cpp picks one at run time. Built with -ffp-contract=off and
// no fast-math, and with sums in a fixed lane order (rowwise.h), all builds give
// bit-identical results: only the vector width changes.
#include <cmath>

#include "cpu_kernels.h"
#include "pygen/dispatch.h"
#include "noise.h"
#include "rowwise.h"
#include "vec_math.h"

#ifndef PYGEN_CPU_ISA
#define PYGEN_CPU_ISA baseline
#endif

namespace pygen::cpu::PYGEN_CPU_ISA {
namespace {


template <typename T, bool SAMPLE, bool KL, bool PRIOR>
void forward_kernel(const GaussianFwdArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict mu = static_cast<const T*>(a.mu);
  const T* __restrict lv = static_cast<const T*>(a.logvar);
  const T* __restrict pmu = static_cast<const T*>(a.prior_mu);
  const T* __restrict plv = static_cast<const T*>(a.prior_logvar);
  T* __restrict z = static_cast<T*>(a.z);
  const uint64_t seed = SAMPLE ? static_cast<uint64_t>(*a.seed) : 0;

  for_each_row_chunk<T>(a.rows, cols, parallel_for, static_cast<T*>(a.kl), T(0.5), [&](int64_t r, int64_t c0, int64_t c1) {
    alignas(64) float eps[kBlock];
    LaneSum<T> kl;
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = b0 + kBlock < c1 ? kBlock : c1 - b0;
      const int64_t i0 = r * cols + b0;
      const T* __restrict m = mu + r * a.mu_stride_row + b0;
      const T* __restrict l = lv + r * a.lv_stride_row + b0;
      if constexpr (SAMPLE) {
        fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
        T* __restrict zo = z + i0;
        for (int64_t j = 0; j < n; ++j) zo[j] = reparam_sample(m[j], l[j], static_cast<T>(eps[j]), CExp{});
      }
      if constexpr (KL && PRIOR) {
        kl.add(n, [&](int64_t j) {
          const int64_t c = b0 + j;
          return kl2_prior(m[j], l[j], pmu[r * a.pmu_stride_row + c * a.pmu_stride_col],
                           plv[r * a.plv_stride_row + c * a.plv_stride_col], CExp{});
        });
      } else if constexpr (KL) {
        kl.add(n, [&](int64_t j) { return kl2_standard(m[j], l[j], CExp{}); });
      }
    }
    return KL ? kl.total() : T(0);
  });
}

// z only: elementwise over the flattened tensor (no row sums), so flat blocks whatever the
// row length; each input row is read in place at its row stride (0: a broadcast row).
template <typename T>
void sample_kernel(const GaussianFwdArgs& a, const ParallelFor& parallel_for) {
  const T* __restrict mu = static_cast<const T*>(a.mu);
  const T* __restrict lv = static_cast<const T*>(a.logvar);
  T* __restrict z = static_cast<T*>(a.z);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  if (a.cols == 0) return;
  for_each_flat_block(a.rows * a.cols, parallel_for, [&](int64_t i0, int64_t n) {
    alignas(64) float eps[kBlock];
    fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
    if (a.cols == 1 && a.mu_stride_row == 0 && a.lv_stride_row == 0) {  // one value for all: randn
      const T m = mu[0], l = lv[0];
      T* __restrict zo = z + i0;
      for (int64_t j = 0; j < n; ++j) zo[j] = reparam_sample(m, l, static_cast<T>(eps[j]), CExp{});
      return;
    }
    if (a.cols == 1) {  // one element per row (a (N,) view, or a broadcast scalar: row stride 0)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = i0 + j;
        z[r] = reparam_sample(mu[r * a.mu_stride_row], lv[r * a.lv_stride_row], static_cast<T>(eps[j]), CExp{});
      }
      return;
    }
    for_each_row_segment(i0, n, a.cols, [&](int64_t j0, int64_t r, int64_t c, int64_t len) {
      const T* __restrict m = mu + r * a.mu_stride_row + c;
      const T* __restrict l = lv + r * a.lv_stride_row + c;
      T* __restrict zo = z + i0 + j0;
      const float* __restrict e = eps + j0;
      for (int64_t j = 0; j < len; ++j) zo[j] = reparam_sample(m[j], l[j], static_cast<T>(e[j]), CExp{});
    });
  });
}

// The gradients of z only (no KL term): elementwise, flat blocks as sample_kernel.
template <typename T, bool WRITE_GMU>
void sample_backward_kernel(const GaussianBwdArgs& a, const ParallelFor& parallel_for) {
  const T* __restrict lv = static_cast<const T*>(a.logvar);
  const T* __restrict gz = static_cast<const T*>(a.grad_z);
  T* __restrict gmu = static_cast<T*>(a.grad_mu);
  T* __restrict glv = static_cast<T*>(a.grad_logvar);
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  if (a.cols == 0) return;
  for_each_flat_block(a.rows * a.cols, parallel_for, [&](int64_t i0, int64_t n) {
    alignas(64) float eps[kBlock];
    fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
    if (a.cols == 1) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        if constexpr (WRITE_GMU) gmu[i] = gz[i];
        glv[i] = reparam_grad_logvar(gz[i], lv[i * a.lv_stride_row], static_cast<T>(eps[j]), CExp{});
      }
      return;
    }
    for_each_row_segment(i0, n, a.cols, [&](int64_t j0, int64_t r, int64_t c, int64_t len) {
      const T* __restrict l = lv + r * a.lv_stride_row + c;
      const int64_t i = i0 + j0;
      for (int64_t j = 0; j < len; ++j) {
        if constexpr (WRITE_GMU) gmu[i + j] = gz[i + j];
        glv[i + j] = reparam_grad_logvar(gz[i + j], l[j], static_cast<T>(eps[j0 + j]), CExp{});
      }
    });
  });
}

template <typename T, bool GZ, bool GKL, bool PRIOR, bool WRITE_GMU>
void backward_kernel(const GaussianBwdArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict mu = static_cast<const T*>(a.mu);
  const T* __restrict lv = static_cast<const T*>(a.logvar);
  const T* __restrict pmu = static_cast<const T*>(a.prior_mu);
  const T* __restrict plv = static_cast<const T*>(a.prior_logvar);
  const T* __restrict gz = static_cast<const T*>(a.grad_z);
  const T* __restrict gkl = static_cast<const T*>(a.grad_kl);
  T* __restrict gmu = static_cast<T*>(a.grad_mu);
  T* __restrict glv = static_cast<T*>(a.grad_logvar);
  T* __restrict gpmu = static_cast<T*>(a.grad_prior_mu);
  T* __restrict gplv = static_cast<T*>(a.grad_prior_logvar);
  const uint64_t seed = GZ ? static_cast<uint64_t>(*a.seed) : 0;

  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    alignas(64) float eps[kBlock];
    const T gk = GKL ? gkl[r] : T(0);
    const T* __restrict mur = mu + r * a.mu_stride_row;
    const T* __restrict lvr = lv + r * a.lv_stride_row;
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t n = b0 + kBlock < c1 ? kBlock : c1 - b0;
      const int64_t i0 = r * cols + b0;
      if constexpr (GZ) fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = i0 + j;
        const T l = lvr[b0 + j];
        T g_mu = 0, g_lv = 0;
        if constexpr (GZ) {
          g_mu = gz[i];
          g_lv = reparam_grad_logvar(gz[i], l, static_cast<T>(eps[j]), CExp{});
        }
        if constexpr (GKL) {
          T k_mu, k_lv;
          if constexpr (PRIOR) {
            const int64_t c = b0 + j;
            T p_mu, p_lv;
            kl_grad_prior(gk, mur[b0 + j], l, pmu[r * a.pmu_stride_row + c * a.pmu_stride_col],
                          plv[r * a.plv_stride_row + c * a.plv_stride_col], k_mu, k_lv, p_mu, p_lv, CExp{});
            if (gpmu != nullptr) {  // prior gradients only when asked for (loop-invariant)
              gpmu[i] = p_mu;
              gplv[i] = p_lv;
            }
          } else {
            kl_grad_standard(gk, mur[b0 + j], l, k_mu, k_lv, CExp{});
          }
          g_mu += k_mu;
          g_lv += k_lv;
        }
        if constexpr (WRITE_GMU) gmu[i] = g_mu;
        glv[i] = g_lv;
      }
    }
    return T(0);
  });
}

template <typename T>
void forward_typed(const GaussianFwdArgs& a, const ParallelFor& pf) {
  if (a.z != nullptr && a.kl == nullptr) return sample_kernel<T>(a, pf);
  with_bool(a.z != nullptr, [&](auto sample) {
    with_bool(a.kl != nullptr, [&](auto kl) {
      with_bool(a.prior_mu != nullptr, [&](auto prior) {
        forward_kernel<T, decltype(sample)::value, decltype(kl)::value, decltype(prior)::value>(a, pf);
      });
    });
  });
}

template <typename T>
void backward_typed(const GaussianBwdArgs& a, const ParallelFor& pf) {
  if (a.grad_z != nullptr && a.grad_kl == nullptr) {
    return a.grad_mu != nullptr ? sample_backward_kernel<T, true>(a, pf) : sample_backward_kernel<T, false>(a, pf);
  }
  with_bool(a.grad_z != nullptr, [&](auto gz) {
    with_bool(a.grad_kl != nullptr, [&](auto gkl) {
      with_bool(a.prior_mu != nullptr, [&](auto prior) {
        with_bool(a.grad_mu != nullptr, [&](auto write_gmu) {
          backward_kernel<T, decltype(gz)::value, decltype(gkl)::value, decltype(prior)::value,
                          decltype(write_gmu)::value>(a, pf);
        });
      });
    });
  });
}

}  // namespace

// The binding admits only float32 / float64 on CPU.
void gaussian_forward(const GaussianFwdArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? forward_typed<double>(a, pf) : forward_typed<float>(a, pf);
}

void gaussian_backward(const GaussianBwdArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? backward_typed<double>(a, pf) : backward_typed<float>(a, pf);
}

}  // namespace pygen::cpu::PYGEN_CPU_ISA
