// CUDA kernels for the rational-quadratic spline: one thread per element runs the shared
// per-element math of pygen/rq_spline.h; rows reduce their log-dets as in rowwise.cuh.
#include "pygen/rq_spline.h"
#include "rowwise.cuh"
#include "spline_cuda.h"

namespace pygen::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) spline_forward_kernel(SplineArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.widths);
  const T* h = static_cast<const T*>(a.heights);
  const T* d = static_cast<const T*>(a.derivatives);
  T* __restrict y = static_cast<T*>(a.y);
  const int64_t K = a.bins;
  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  A acc = 0;
  if (tk.active) {
    for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
      const int64_t i = tk.r * a.cols + col;
      A out;
      acc += spline_element<A>(a, to_acc(x[i]), w + i * K, h + i * K, d + i * (K - 1), out);
      y[i] = from_acc<T>(out);
    }
  }
  store_row_sum<T>(acc, tk, group, chunks, A(1), a.logdet, a.workspace);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spline_backward_kernel(SplineArgs a) {
  using A = typename AccOf<T>::type;
  const int64_t n = a.rows * a.cols, K = a.bins;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const int64_t r = i / a.cols;
  A g;
  spline_element_backward<A>(a, to_acc(static_cast<const T*>(a.x)[i]), static_cast<const T*>(a.widths) + i * K,
                             static_cast<const T*>(a.heights) + i * K, static_cast<const T*>(a.derivatives) + i * (K - 1),
                             to_acc(static_cast<const T*>(a.grad_y)[i]),
                             static_cast<const A*>(a.grad_logdet)[r], g,
                             static_cast<T*>(a.grad_widths) + i * K, static_cast<T*>(a.grad_heights) + i * K,
                             static_cast<T*>(a.grad_derivatives) + i * (K - 1));
  static_cast<T*>(a.grad_x)[i] = from_acc<T>(g);
}

}  // namespace

size_t spline_forward_workspace_bytes(const SplineArgs& a) { return partials_bytes(a.rows, a.cols, a.dtype); }

const char* spline_forward(const SplineArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    spline_forward_kernel<T><<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
    finish_rows<T>(g, a.rows, a.workspace, 1.0, a.logdet, s);
  });
}

const char* spline_backward(const SplineArgs& a, void* stream) {
  const int64_t n = a.rows * a.cols;
  if (n == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    spline_backward_kernel<T><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, s>>>(a);
  });
}

}  // namespace pygen::cuda
