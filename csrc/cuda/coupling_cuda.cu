// CUDA kernels for the affine coupling transform, its log-determinant and gradients.
// Per-element math: pygen/coupling.h (shared with the CPU kernels); work split and reductions: rowwise.cuh.
#include "coupling_cuda.h"
#include "pygen/dispatch.h"
#include "rowwise.cuh"

namespace pygen::cuda {
namespace {

template <typename T, bool INVERSE, bool CLAMP, bool MASK>
__global__ void __launch_bounds__(kThreads)
    affine_forward_kernel(AffineArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict sh = static_cast<const T*>(a.shift);
  const T* __restrict ls = static_cast<const T*>(a.log_scale);
  const T* __restrict mk = static_cast<const T*>(a.mask);
  T* __restrict y = static_cast<T*>(a.y);
  const A c = static_cast<A>(a.soft_clamp);

  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  const int64_t r = tk.r;
  A acc = 0;
  if (tk.active) {
#pragma unroll 4
    for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
      const int64_t i = r * a.cols + col;
      const A m = MASK ? to_acc(mk[r * a.mask_stride_row + col * a.mask_stride_col]) : A(1);
      A s;
      y[i] = from_acc<T>(affine_element<INVERSE, CLAMP>(c, to_acc(x[r * a.x_stride_row + col]), to_acc(sh[r * a.shift_stride_row + col]),
        to_acc(ls[r * a.ls_stride_row + col]), m, s, FExp{}));
      acc += s;
    }
  }
  store_row_sum<T>(acc, tk, group, chunks, INVERSE ? A(-1) : A(1), a.logdet, a.workspace);
}

template <typename T, bool INVERSE, bool CLAMP, bool MASK, bool WRITE_GSHIFT>
__global__ void __launch_bounds__(kThreads)
    affine_backward_kernel(AffineArgs a, int group, int64_t chunk, int64_t chunks) {
  using A = typename AccOf<T>::type;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict sh = static_cast<const T*>(a.shift);
  const T* __restrict ls = static_cast<const T*>(a.log_scale);
  const T* __restrict mk = static_cast<const T*>(a.mask);
  const T* __restrict gy = static_cast<const T*>(a.grad_y);
  T* __restrict gx = static_cast<T*>(a.grad_x);
  T* __restrict gt = static_cast<T*>(a.grad_shift);
  T* __restrict gls = static_cast<T*>(a.grad_log_scale);
  const A c = static_cast<A>(a.soft_clamp);

  const RowTask tk(group, chunk, chunks, a.rows, a.cols);
  if (!tk.active) return;  // no barrier below
  const int64_t r = tk.r;
  const A g_logdet = static_cast<const A*>(a.grad_logdet)[r];
#pragma unroll 4
  for (int64_t col = tk.c0 + tk.lane; col < tk.c1; col += group) {
    const int64_t i = r * a.cols + col;
    const A m = MASK ? to_acc(mk[r * a.mask_stride_row + col * a.mask_stride_col]) : A(1);
    A g_x, g_t, g_ls;
    affine_element_backward<INVERSE, CLAMP>(c, to_acc(x[r * a.x_stride_row + col]), to_acc(sh[r * a.shift_stride_row + col]),
        to_acc(ls[r * a.ls_stride_row + col]), m, to_acc(gy[i]), g_logdet,
                                            g_x, g_t, g_ls, FExp{});
    gx[i] = from_acc<T>(g_x);
    if constexpr (WRITE_GSHIFT) gt[i] = from_acc<T>(g_t);
    gls[i] = from_acc<T>(g_ls);
  }
}

}  // namespace

size_t affine_forward_workspace_bytes(const AffineArgs& a) { return partials_bytes(a.rows, a.cols, a.dtype); }

const char* affine_forward(const AffineArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_bool(a.inverse, [&](auto inv) {
      with_bool(a.soft_clamp != 0, [&](auto clamp) {
        with_bool(a.mask != nullptr, [&](auto mask) {
          affine_forward_kernel<T, decltype(inv)::value, decltype(clamp)::value, decltype(mask)::value>
              <<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
        });
      });
    });
    finish_rows<T>(g, a.rows, a.workspace, a.inverse ? -1.0 : 1.0, a.logdet, s);
  });
}

const char* affine_backward(const AffineArgs& a, void* stream) {
  const Geometry g = geometry(a.rows, a.cols);
  if (g.blocks == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return with_dtype(a.dtype, [&](auto t) {
    using T = decltype(t);
    with_bool(a.inverse, [&](auto inv) {
      with_bool(a.soft_clamp != 0, [&](auto clamp) {
        with_bool(a.mask != nullptr, [&](auto mask) {
          with_bool(a.grad_shift != nullptr, [&](auto gshift) {
            affine_backward_kernel<T, decltype(inv)::value, decltype(clamp)::value, decltype(mask)::value,
                                   decltype(gshift)::value>
                <<<static_cast<unsigned>(g.blocks), kThreads, 0, s>>>(a, g.group, g.chunk, g.chunks);
          });
        });
      });
    });
  });
}

}  // namespace pygen::cuda
