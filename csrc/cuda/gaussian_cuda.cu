// CUDA kernels for reparameterized sampling, Gaussian KL and their gradients.
// No torch headers: raw pointers in, a stream and an error string out.
//
// Geometry: the (rows, cols) view is cut into tasks of one row-chunk each, run by a
// group of `group` threads (a power of two, at most a block). Short rows get small
// groups (many rows per block); long rows get whole blocks and several chunks, whose
// KL partials a second kernel sums in chunk order (deterministic: no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "gaussian_cuda.h"
#include "pygen/dispatch.h"

namespace pygen::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // elements per thread in a block-wide task

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Geometry {
  int group;           // threads per task
  int64_t chunk;       // columns per task
  int64_t chunks;      // tasks per row
  int64_t blocks;
};

Geometry geometry(int64_t rows, int64_t cols) {
  Geometry g{};
  const int64_t want = (cols + 3) / 4;  // about four elements per thread
  g.group = 1;
  while (g.group < kThreads && g.group < want) g.group *= 2;
  if (g.group < kThreads) {
    g.chunk = cols;
    g.chunks = 1;
  } else {
    g.chunk = static_cast<int64_t>(kThreads) * kPerThread;
    g.chunks = std::max<int64_t>(1, (cols + g.chunk - 1) / g.chunk);
  }
  const int64_t tasks = rows * g.chunks;
  const int64_t per_block = kThreads / g.group;
  g.blocks = (tasks + per_block - 1) / per_block;
  return g;
}

// Sum over the `group` threads of a task; the total lands in the group's lane 0.
// Every thread of the block must call it (shuffles and a barrier inside).
template <typename A>
__device__ __forceinline__ A group_sum(A v, int group) {
  for (int o = min(group, 32) / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (group > 32) {
    __shared__ A partial[kThreads / 32];
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) partial[warp] = v;
    __syncthreads();
    if (threadIdx.x % group == 0) {
      A s = 0;
      for (int w = warp; w < warp + group / 32; ++w) s += partial[w];
      v = s;
    }
  }
  return v;
}

template <typename T, bool SAMPLE, bool KL, bool PRIOR>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(GaussianFwdArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const T* __restrict__ mu = static_cast<const T*>(a.mu);
  const T* __restrict__ lv = static_cast<const T*>(a.logvar);
  const T* __restrict__ pmu = static_cast<const T*>(a.prior_mu);
  const T* __restrict__ plv = static_cast<const T*>(a.prior_logvar);
  T* __restrict__ z = static_cast<T*>(a.z);

  const int lane = threadIdx.x & (group - 1);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  const bool active = task < a.rows * chunks;
  const int64_t r = active ? task / chunks : 0;
  A acc = 0;
  if (active) {
    const int64_t c0 = (task % chunks) * chunk;
    const int64_t c1 = min(a.cols, c0 + chunk);
    const uint64_t seed = SAMPLE ? static_cast<uint64_t>(*a.seed) : 0;
#pragma unroll 4
    for (int64_t c = c0 + lane; c < c1; c += group) {
      const int64_t i = r * a.cols + c;
      const A m = to_acc(mu[i]), l = to_acc(lv[i]);
      if constexpr (SAMPLE) {
        const A eps = static_cast<A>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
        z[i] = from_acc<T>(m + fexp(A(0.5) * l) * eps);
      }
      if constexpr (KL) {
        if constexpr (PRIOR) {
          acc += kl2_prior(m, l, to_acc(pmu[r * a.pmu_stride_row + c * a.pmu_stride_col]),
                           to_acc(plv[r * a.plv_stride_row + c * a.plv_stride_col]));
        } else {
          acc += kl2_standard(m, l);
        }
      }
    }
  }
  if constexpr (KL) {
    acc = group_sum(acc, group);
    if (active && lane == 0) {
      if (chunks == 1) {
        static_cast<T*>(a.kl)[r] = from_acc<T>(A(0.5) * acc);
      } else {
        static_cast<A*>(a.workspace)[task] = acc;
      }
    }
  }
}

// One warp per row sums that row's chunk partials in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads) finish_kl_kernel(GaussianFwdArgs a, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const A* part = static_cast<const A*>(a.workspace);
  A s = 0;
  if (r < a.rows) {
    for (int64_t k = lane; k < chunks; k += 32) s += part[r * chunks + k];
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (r < a.rows && lane == 0) static_cast<T*>(a.kl)[r] = from_acc<T>(A(0.5) * s);
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

  const int lane = threadIdx.x & (group - 1);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  if (task >= a.rows * chunks) return;  // no barrier below: early exit is safe
  const int64_t r = task / chunks;
  const int64_t c0 = (task % chunks) * chunk;
  const int64_t c1 = min(a.cols, c0 + chunk);
  const uint64_t seed = GZ ? static_cast<uint64_t>(*a.seed) : 0;
  const A gk = GKL ? to_acc(static_cast<const T*>(a.grad_kl)[r]) : A(0);
#pragma unroll 4
  for (int64_t c = c0 + lane; c < c1; c += group) {
    const int64_t i = r * a.cols + c;
    const A l = to_acc(lv[i]);
    A g_mu = 0, g_lv = 0;
    if constexpr (GZ) {
      const A g = to_acc(gz[i]);
      const A eps = static_cast<A>(philox_normal(seed, a.offset + static_cast<uint64_t>(i)));
      g_mu = g;
      g_lv = A(0.5) * g * fexp(A(0.5) * l) * eps;
    }
    if constexpr (GKL) {
      const A m = to_acc(mu[i]);
      if constexpr (PRIOR) {
        const A pl = to_acc(plv[r * a.plv_stride_row + c * a.plv_stride_col]);
        const A d = m - to_acc(pmu[r * a.pmu_stride_row + c * a.pmu_stride_col]);
        const A inv_pvar = fexp(-pl), ratio = fexp(l - pl);
        const A dm = gk * d * inv_pvar;
        g_mu += dm;
        g_lv += A(0.5) * gk * (ratio - A(1));
        gpmu[i] = from_acc<T>(-dm);
        gplv[i] = from_acc<T>(A(0.5) * gk * (A(1) - ratio - d * d * inv_pvar));
      } else {
        g_mu += gk * m;
        g_lv += A(0.5) * gk * (fexp(l) - A(1));
      }
    }
    if constexpr (WRITE_GMU) gmu[i] = from_acc<T>(g_mu);
    glv[i] = from_acc<T>(g_lv);
  }
}

template <typename F>
const char* with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: return "pygen: unsupported dtype";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
size_t acc_size() {
  return sizeof(typename AccOf<T>::type);
}

}  // namespace

size_t gaussian_forward_workspace_bytes(const GaussianFwdArgs& a) {
  const Geometry g = geometry(a.rows, a.cols);
  if (a.kl == nullptr || g.chunks <= 1) return 0;
  const size_t acc = a.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(a.rows * g.chunks) * acc;
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
    if (a.kl != nullptr && g.chunks > 1) {
      const int64_t blocks = (a.rows * 32 + kThreads - 1) / kThreads;
      finish_kl_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(a, g.chunks);
    }
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
