// CPU kernels for the affine coupling transform, its log-determinant and gradients.
// Compiled once per instruction set like gaussian_cpu.cpp (bit-identical builds).
//
// forward:  y = x * e^s + t,        logdet = sum(s);   s = soft_clamp(log_scale)
// inverse:  y = (x - t) * e^{-s},   logdet = -sum(s)
// mask m (optional): s and t are multiplied by m, so m = 0 passes x through.
// The per-element math lives in pygen/coupling.h (shared with the CUDA kernels).
#include <cmath>

#include "cpu_kernels.h"
#include "pygen/dispatch.h"
#include "rowwise.h"
#include "vec_math.h"

#ifndef PYGEN_CPU_ISA
#define PYGEN_CPU_ISA baseline
#endif

namespace pygen::cpu::PYGEN_CPU_ISA {
namespace {


template <typename T, bool INVERSE, bool CLAMP, bool MASK>
void forward_kernel(const AffineArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict sh = static_cast<const T*>(a.shift);
  const T* __restrict ls = static_cast<const T*>(a.log_scale);
  const T* __restrict mk = static_cast<const T*>(a.mask);
  T* __restrict y = static_cast<T*>(a.y);
  const T c = static_cast<T>(a.soft_clamp);

  for_each_row_chunk<T>(a.rows, cols, parallel_for, static_cast<T*>(a.logdet), INVERSE ? T(-1) : T(1),
                        [&](int64_t r, int64_t c0, int64_t c1) {
                          LaneSum<T> logdet;
                          const int64_t i0 = r * cols + c0;
                          const T* __restrict xr = x + i0;
                          const T* __restrict tr = sh + i0;
                          const T* __restrict lr = ls + i0;
                          T* __restrict yr = y + i0;
                          logdet.add(c1 - c0, [&](int64_t j) {
                            const T m = MASK ? mk[r * a.mask_stride_row + (c0 + j) * a.mask_stride_col] : T(1);
                            T s;
                            yr[j] = affine_element<INVERSE, CLAMP>(c, xr[j], tr[j], lr[j], m, s, CExp{});
                            return s;
                          });
                          return logdet.total();
                        });
}

// Gradients: affine_element_backward (pygen/coupling.h) per element.
template <typename T, bool INVERSE, bool CLAMP, bool MASK, bool WRITE_GSHIFT>
void backward_kernel(const AffineArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict sh = static_cast<const T*>(a.shift);
  const T* __restrict ls = static_cast<const T*>(a.log_scale);
  const T* __restrict mk = static_cast<const T*>(a.mask);
  const T* __restrict gy = static_cast<const T*>(a.grad_y);
  const T* __restrict gld = static_cast<const T*>(a.grad_logdet);
  T* __restrict gx = static_cast<T*>(a.grad_x);
  T* __restrict gt = static_cast<T*>(a.grad_shift);
  T* __restrict gls = static_cast<T*>(a.grad_log_scale);
  const T c = static_cast<T>(a.soft_clamp);

  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    const T g_logdet = gld[r];
    const int64_t i0 = r * cols + c0;
    // row-local restrict pointers: the vectoriser cannot see through the lambda's captures
    const T* __restrict xr = x + i0;
    const T* __restrict tr = sh + i0;
    const T* __restrict lr = ls + i0;
    const T* __restrict gyr = gy + i0;
    T* __restrict gxr = gx + i0;
    T* __restrict gtr = WRITE_GSHIFT ? gt + i0 : nullptr;
    T* __restrict glr = gls + i0;
    for (int64_t j = 0; j < c1 - c0; ++j) {
      const T m = MASK ? mk[r * a.mask_stride_row + (c0 + j) * a.mask_stride_col] : T(1);
      T gshift;
      affine_element_backward<INVERSE, CLAMP>(c, xr[j], tr[j], lr[j], m, gyr[j], g_logdet, gxr[j], gshift, glr[j],
                                              CExp{});
      if constexpr (WRITE_GSHIFT) gtr[j] = gshift;
    }
    return T(0);
  });
}

template <typename T>
void forward_typed(const AffineArgs& a, const ParallelFor& pf) {
  with_bool(a.inverse, [&](auto inv) {
    with_bool(a.soft_clamp != 0, [&](auto clamp) {
      with_bool(a.mask != nullptr, [&](auto mask) {
        forward_kernel<T, decltype(inv)::value, decltype(clamp)::value, decltype(mask)::value>(a, pf);
      });
    });
  });
}

template <typename T>
void backward_typed(const AffineArgs& a, const ParallelFor& pf) {
  with_bool(a.inverse, [&](auto inv) {
    with_bool(a.soft_clamp != 0, [&](auto clamp) {
      with_bool(a.mask != nullptr, [&](auto mask) {
        with_bool(a.grad_shift != nullptr, [&](auto gshift) {
          backward_kernel<T, decltype(inv)::value, decltype(clamp)::value, decltype(mask)::value,
                          decltype(gshift)::value>(a, pf);
        });
      });
    });
  });
}

}  // namespace

void affine_forward(const AffineArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? forward_typed<double>(a, pf) : forward_typed<float>(a, pf);
}

void affine_backward(const AffineArgs& a, const ParallelFor& pf) {
  a.dtype == DType::kFloat64 ? backward_typed<double>(a, pf) : backward_typed<float>(a, pf);
}

}  // namespace pygen::cpu::PYGEN_CPU_ISA
