// CPU kernels for the rational-quadratic spline (forward/inverse, log-det, gradients).
// The per-element math is pygen/rq_spline.h, shared with CUDA; compiled once per ISA.
#include "cpu_kernels.h"
#include "pygen/rq_spline.h"
#include "rowwise.h"

#ifndef PYGEN_CPU_ISA
#define PYGEN_CPU_ISA baseline
#endif

namespace pygen::cpu::PYGEN_CPU_ISA {
namespace {

template <typename T>
void forward_kernel(const SplineArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols, K = a.bins;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.widths);
  const T* h = static_cast<const T*>(a.heights);
  const T* d = static_cast<const T*>(a.derivatives);
  T* y = static_cast<T*>(a.y);
  for_each_row_chunk<T>(a.rows, cols, parallel_for, static_cast<T*>(a.logdet), T(1),
                        [&](int64_t r, int64_t c0, int64_t c1) {
                          LaneSum<T> logdet;
                          logdet.add(c1 - c0, [&](int64_t j) {
                            const int64_t i = r * cols + c0 + j;
                            T out;
                            const T lad = spline_element<T>(a, x[i], w + i * K, h + i * K, d + i * (K - 1), out);
                            y[i] = out;
                            return lad;
                          });
                          return logdet.total();
                        });
}

template <typename T>
void backward_kernel(const SplineArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols, K = a.bins;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.widths);
  const T* h = static_cast<const T*>(a.heights);
  const T* d = static_cast<const T*>(a.derivatives);
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* gld = static_cast<const T*>(a.grad_logdet);
  T* gx = static_cast<T*>(a.grad_x);
  T* gw = static_cast<T*>(a.grad_widths);
  T* gh = static_cast<T*>(a.grad_heights);
  T* gd = static_cast<T*>(a.grad_derivatives);
  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    for (int64_t i = r * cols + c0; i < r * cols + c1; ++i) {
      T g;
      spline_element_backward<T>(a, x[i], w + i * K, h + i * K, d + i * (K - 1), gy[i], gld[r], g, gw + i * K,
                                 gh + i * K, gd + i * (K - 1));
      gx[i] = g;
    }
    return T(0);
  });
}

}  // namespace

void spline_forward(const SplineArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? forward_kernel<double>(a, pf) : forward_kernel<float>(a, pf);
}

void spline_backward(const SplineArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? backward_kernel<double>(a, pf) : backward_kernel<float>(a, pf);
}

}  // namespace pygen::cpu::PYGEN_CPU_ISA
