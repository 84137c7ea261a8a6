// Shared by pygen's CUDA kernels that work on a (rows, cols) view with a per-row
// reduction (KL, log-determinants): the work split, group reductions, dtype dispatch.
//
// Geometry: the view is cut into tasks of one row-chunk each, run by a group of `group`
// threads (a power of two, at most a block). Short rows get small groups (many rows per
// block); long rows get whole blocks and several chunks, whose partial sums a second
// kernel adds in chunk order (deterministic: no atomics).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "pygen/gaussian.h"  // DType

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

// Per-row results (KL, log-det, loss) are stored in the accumulation type A (float32, or
// float64 for float64 inputs), not in T: a float16 KL over a 4x64x64 latent overflows, and a
// bfloat16 log-det near 1e5 has ~500 nats resolution. Incoming row gradients are A as well.
//
// Sums each row's chunk partials in a fixed order (one warp per row): out[r] = scale * sum.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finish_rows_kernel(const typename AccOf<T>::type* partial, int64_t rows, int64_t chunks, double scale,
                       typename AccOf<T>::type* out) {
  using A = typename AccOf<T>::type;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  A s = 0;
  if (r < rows) {
    for (int64_t k = lane; k < chunks; k += 32) s += partial[r * chunks + k];
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (r < rows && lane == 0) out[r] = static_cast<A>(scale) * s;
}

// The device exp as a functor, for the shared math that takes the backend's exp.
struct FExp {
  template <typename A>
  __device__ A operator()(A v) const {
    return fexp(v);
  }
};

// This thread's place in the task grid: its lane in the group, the task's row and columns.
struct RowTask {
  int lane;
  int64_t task, r, c0, c1;
  bool active;  // false for the threads past the last task (they still join reductions)
  __device__ RowTask(int group, int64_t chunk, int64_t chunks, int64_t rows, int64_t cols) {
    lane = threadIdx.x & (group - 1);
    task = static_cast<int64_t>(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
    active = task < rows * chunks;
    r = active ? task / chunks : 0;
    c0 = active ? (task % chunks) * chunk : 0;
    c1 = active ? min(cols, c0 + chunk) : 0;
  }
};

// Sums a per-thread value over the task's group and stores scale * sum as the row's result
// (one chunk per row) or the unscaled chunk partial for finish_rows_kernel. Every thread of
// the block must call it.
template <typename T, typename A>
__device__ __forceinline__ void store_row_sum(A acc, const RowTask& t, int group, int64_t chunks, A scale, void* out,
                                              void* workspace) {
  acc = group_sum(acc, group);
  if (t.active && t.lane == 0) {
    if (chunks == 1) {
      static_cast<A*>(out)[t.r] = scale * acc;
    } else {
      static_cast<A*>(workspace)[t.task] = acc;
    }
  }
}

// Bytes of per-chunk partial sums a reducing launch needs (0 when one chunk per row).
inline size_t partials_bytes(int64_t rows, int64_t cols, DType dt) {
  const Geometry g = geometry(rows, cols);
  if (g.chunks <= 1) return 0;
  return static_cast<size_t>(rows * g.chunks) * (dt == DType::kFloat64 ? sizeof(double) : sizeof(float));
}

// After a reducing launch: add up the chunk partials (when there were several chunks).
template <typename T>
inline void finish_rows(const Geometry& g, int64_t rows, const void* workspace, double scale, void* out,
                        cudaStream_t s) {
  if (g.chunks <= 1) return;
  const int64_t blocks = (rows * 32 + kThreads - 1) / kThreads;
  finish_rows_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      static_cast<const typename AccOf<T>::type*>(workspace), rows, g.chunks, scale,
      static_cast<typename AccOf<T>::type*>(out));
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

}  // namespace
}  // namespace pygen::cuda
