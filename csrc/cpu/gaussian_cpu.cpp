// CPU kernels for reparameterized sampling, Gaussian KL and their gradients.
//
// Work is split into (row, column-chunk) tasks so that one huge row still spreads over
// all threads; a row's KL is the sum of its chunk partials taken in chunk order, so the
// result does not depend on the thread count.
#include "gaussian_cpu.h"

#include <algorithm>
#include <vector>

#include "pygen/dispatch.h"

namespace pygen::cpu {
namespace {

constexpr int64_t kChunk = 4096;  // columns per task
constexpr int kLanes = 8;         // independent accumulators: vectorisable and more accurate

struct Prior {
  const void* mu;
  const void* logvar;
  int64_t mu_sr, mu_sc, lv_sr, lv_sc;
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
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c0 = (t % chunks) * kChunk;
      const int64_t c1 = std::min(cols, c0 + kChunk);
      const int64_t base = r * cols;
      if constexpr (SAMPLE) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = base + c;
          const T eps = static_cast<T>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
          z[i] = mu[i] + fexp(T(0.5) * lv[i]) * eps;
        }
      }
      if constexpr (KL) {
        T acc[kLanes] = {};
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = base + c;
          if constexpr (PRIOR) {
            acc[c % kLanes] += kl2_prior(mu[i], lv[i], pmu[r * a.pmu_stride_row + c * a.pmu_stride_col],
                                         plv[r * a.plv_stride_row + c * a.plv_stride_col]);
          } else {
            acc[c % kLanes] += kl2_standard(mu[i], lv[i]);
          }
        }
        const T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        if (chunks == 1) {
          kl[r] = T(0.5) * s;
        } else {
          partial[t] = s;
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
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c0 = (t % chunks) * kChunk;
      const int64_t c1 = std::min(cols, c0 + kChunk);
      const T gk = GKL ? gkl[r] : T(0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = r * cols + c;
        const T l = lv[i];
        T g_mu = 0, g_lv = 0;
        if constexpr (GZ) {
          // dz/dlogvar = 0.5 * sigma * eps, with eps regenerated rather than stored.
          const T eps = static_cast<T>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
          g_mu = gz[i];
          g_lv = T(0.5) * gz[i] * fexp(T(0.5) * l) * eps;
        }
        if constexpr (GKL) {
          if constexpr (PRIOR) {
            const T pl = plv[r * a.plv_stride_row + c * a.plv_stride_col];
            const T d = mu[i] - pmu[r * a.pmu_stride_row + c * a.pmu_stride_col];
            const T inv_pvar = fexp(-pl), ratio = fexp(l - pl);
            const T dm = gk * d * inv_pvar;
            g_mu += dm;
            g_lv += T(0.5) * gk * (ratio - T(1));
            gpmu[i] = -dm;
            gplv[i] = T(0.5) * gk * (T(1) - ratio - d * d * inv_pvar);
          } else {
            g_mu += gk * mu[i];
            g_lv += T(0.5) * gk * (fexp(l) - T(1));
          }
        }
        if constexpr (WRITE_GMU) gmu[i] = g_mu;
        glv[i] = g_lv;
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

void philox_normal_fill(float* out, int64_t n, uint64_t seed, uint64_t offset,
                        const ParallelFor& pf) {
  pf(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = philox_normal(seed, offset + static_cast<uint64_t>(i));
  });
}

}  // namespace pygen::cpu
