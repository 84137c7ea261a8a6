// CPU kernels for reparameterized sampling, Gaussian KL and their gradients.
//
// This file is compiled once per instruction set (PYGEN_CPU_ISA = baseline, avx2,
// avx512; see CMakeLists.txt) and cpu_dispatch.cpp picks one at run time. Built with
// -ffp-contract=off and no fast-math, and with reductions in a fixed 16-lane order, all
// builds give bit-identical results: only the vector width changes.
//
// Work is split into (row, column-chunk) tasks so that one huge row still spreads over
// all threads; a row's KL is the sum of its chunk partials taken in chunk order, so the
// result does not depend on the thread count either.
#include <algorithm>
#include <cmath>
#include <vector>

#include "gaussian_cpu.h"
#include "pygen/dispatch.h"
#include "vec_math.h"

#ifndef PYGEN_CPU_ISA
#define PYGEN_CPU_ISA baseline
#endif

namespace pygen::cpu::PYGEN_CPU_ISA {
namespace {

constexpr int64_t kChunk = 8192;  // columns per task
constexpr int64_t kBlock = 256;   // elements whose noise is drawn together
constexpr int kLanes = 16;        // accumulators of a KL sum (fixed: same order on every ISA)

inline float cexp(float x) { return vexp(x); }
inline double cexp(double x) { return std::exp(x); }

// Normals for counters ctr0 .. ctr0 + n - 1; a plain loop over independent elements
// that the compiler vectorises (Philox rounds, then vexp/vlog/vcos, no libm calls).
void fill_normals(uint64_t seed, uint64_t ctr0, int64_t n, float* __restrict out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t ctr = ctr0 + static_cast<uint64_t>(j);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u, k0, k1);
    float u1 = uint_to_uniform(r.x[0]);
    const float u2 = uint_to_uniform(r.x[1]);
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    out[j] = std::sqrt(-2.0f * vlog_positive(u1)) * vcos_angle(6.283185307179586f * u2);
  }
}

template <typename T>
struct KlTerm {
  // 2 * KL of one element; see kl2_standard / kl2_prior in pygen/gaussian.h.
  static T standard(T m, T l) { return cexp(l) + m * m - T(1) - l; }
  static T prior(T m, T l, T pm, T pl) {
    const T d = m - pm;
    return cexp(l - pl) + d * d * cexp(-pl) - T(1) - l + pl;
  }
};

template <typename T, bool SAMPLE, bool KL, bool PRIOR>
void forward_kernel(const GaussianFwdArgs& a, const ParallelFor& parallel_for) {
  const int64_t rows = a.rows, cols = a.cols;
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  const T* mu = static_cast<const T*>(a.mu);
  const T* lv = static_cast<const T*>(a.logvar);
  const T* pmu = static_cast<const T*>(a.prior_mu);
  const T* plv = static_cast<const T*>(a.prior_logvar);
  T* z = static_cast<T*>(a.z);
  T* kl = static_cast<T*>(a.kl);
  const uint64_t seed = SAMPLE ? static_cast<uint64_t>(*a.seed) : 0;
  std::vector<T> partial(KL && chunks > 1 ? rows * chunks : 0);

  parallel_for(0, rows * chunks, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float eps[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c0 = (t % chunks) * kChunk;
      const int64_t c1 = std::min(cols, c0 + kChunk);
      const int64_t base = r * cols;
      T acc[kLanes] = {};
      for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
        const int64_t n = std::min(kBlock, c1 - b0);
        const T* __restrict m = mu + base + b0;
        const T* __restrict l = lv + base + b0;
        if constexpr (SAMPLE) {
          fill_normals(seed, a.offset + static_cast<uint64_t>(base + b0), n, eps);
          T* __restrict zo = z + base + b0;
          for (int64_t j = 0; j < n; ++j) zo[j] = m[j] + cexp(T(0.5) * l[j]) * static_cast<T>(eps[j]);
        }
        if constexpr (KL) {
          // element c goes to lane (c - c0) % kLanes: kBlock is a multiple of kLanes
          int64_t j = 0;
          for (; j + kLanes <= n; j += kLanes) {
            for (int k = 0; k < kLanes; ++k) {
              if constexpr (PRIOR) {
                const int64_t c = b0 + j + k;
                acc[k] += KlTerm<T>::prior(m[j + k], l[j + k], pmu[r * a.pmu_stride_row + c * a.pmu_stride_col],
                                           plv[r * a.plv_stride_row + c * a.plv_stride_col]);
              } else {
                acc[k] += KlTerm<T>::standard(m[j + k], l[j + k]);
              }
            }
          }
          for (int k = 0; j < n; ++j, ++k) {
            if constexpr (PRIOR) {
              const int64_t c = b0 + j;
              acc[k] += KlTerm<T>::prior(m[j], l[j], pmu[r * a.pmu_stride_row + c * a.pmu_stride_col],
                                         plv[r * a.plv_stride_row + c * a.plv_stride_col]);
            } else {
              acc[k] += KlTerm<T>::standard(m[j], l[j]);
            }
          }
        }
      }
      if constexpr (KL) {
        for (int w = kLanes / 2; w > 0; w /= 2) {
          for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
        }
        if (chunks == 1) {
          kl[r] = T(0.5) * acc[0];
        } else {
          partial[t] = acc[0];
        }
      }
    }
  });
  if constexpr (KL) {
    if (chunks == 0) {
      std::fill(kl, kl + rows, T(0));
    } else if (chunks > 1) {
      parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T s = 0;
          for (int64_t k = 0; k < chunks; ++k) s += partial[r * chunks + k];
          kl[r] = T(0.5) * s;
        }
      });
    }
  }
}

template <typename T, bool GZ, bool GKL, bool PRIOR, bool WRITE_GMU>
void backward_kernel(const GaussianBwdArgs& a, const ParallelFor& parallel_for) {
  const int64_t rows = a.rows, cols = a.cols;
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  const T* mu = static_cast<const T*>(a.mu);
  const T* lv = static_cast<const T*>(a.logvar);
  const T* pmu = static_cast<const T*>(a.prior_mu);
  const T* plv = static_cast<const T*>(a.prior_logvar);
  const T* gz = static_cast<const T*>(a.grad_z);
  const T* gkl = static_cast<const T*>(a.grad_kl);
  T* gmu = static_cast<T*>(a.grad_mu);
  T* glv = static_cast<T*>(a.grad_logvar);
  T* gpmu = static_cast<T*>(a.grad_prior_mu);
  T* gplv = static_cast<T*>(a.grad_prior_logvar);
  const uint64_t seed = GZ ? static_cast<uint64_t>(*a.seed) : 0;

  parallel_for(0, rows * chunks, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float eps[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c0 = (t % chunks) * kChunk;
      const int64_t c1 = std::min(cols, c0 + kChunk);
      const T gk = GKL ? gkl[r] : T(0);
      for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
        const int64_t n = std::min(kBlock, c1 - b0);
        const int64_t i0 = r * cols + b0;
        if constexpr (GZ) fill_normals(seed, a.offset + static_cast<uint64_t>(i0), n, eps);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = i0 + j;
          const T l = lv[i];
          T g_mu = 0, g_lv = 0;
          if constexpr (GZ) {
            // dz/dlogvar = sigma * eps / 2, with eps regenerated rather than stored
            g_mu = gz[i];
            g_lv = T(0.5) * gz[i] * cexp(T(0.5) * l) * static_cast<T>(eps[j]);
          }
          if constexpr (GKL) {
            if constexpr (PRIOR) {
              const int64_t c = b0 + j;
              const T pl = plv[r * a.plv_stride_row + c * a.plv_stride_col];
              const T d = mu[i] - pmu[r * a.pmu_stride_row + c * a.pmu_stride_col];
              const T inv_pvar = cexp(-pl), ratio = cexp(l - pl);
              const T dm = gk * d * inv_pvar;
              g_mu += dm;
              g_lv += T(0.5) * gk * (ratio - T(1));
              gpmu[i] = -dm;
              gplv[i] = T(0.5) * gk * (T(1) - ratio - d * d * inv_pvar);
            } else {
              g_mu += gk * mu[i];
              g_lv += T(0.5) * gk * (cexp(l) - T(1));
            }
          }
          if constexpr (WRITE_GMU) gmu[i] = g_mu;
          glv[i] = g_lv;
        }
      }
    }
  });
}

template <typename T>
void forward_typed(const GaussianFwdArgs& a, const ParallelFor& pf) {
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

void gaussian_forward(const GaussianFwdArgs& a, const ParallelFor& pf) {
  if (a.dtype == DType::kFloat64) {
    forward_typed<double>(a, pf);
  } else {
    forward_typed<float>(a, pf);  // the binding admits only float32 / float64 on CPU
  }
}

void gaussian_backward(const GaussianBwdArgs& a, const ParallelFor& pf) {
  if (a.dtype == DType::kFloat64) {
    backward_typed<double>(a, pf);
  } else {
    backward_typed<float>(a, pf);
  }
}

}  // namespace pygen::cpu::PYGEN_CPU_ISA
