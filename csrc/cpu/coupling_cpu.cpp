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
                          const T* __restrict xr = x + r * a.x_stride_row + c0;
                          const T* __restrict tr = sh + r * a.shift_stride_row + c0;
                          const T* __restrict lr = ls + r * a.ls_stride_row + c0;
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

// Gradients of one row segment: affine_element_backward (pygen/coupling.h) per element.
// The arrays never overlap, but with up to seven streams GCC needs more than its 10
// run-time alias checks (it drops __restrict once this is inlined): ivdep says there is
// no loop-carried dependence. mstride: the mask's column stride (1: contiguous, 0: one
// value for the segment).
template <typename T, bool INVERSE, bool CLAMP, bool MASK, bool WRITE_GSHIFT>
void backward_segment(int64_t n, T c, T g_logdet, const T* __restrict x, const T* __restrict t,
                      const T* __restrict l, const T* __restrict gy, const T* __restrict mk, int64_t mstride,
                      T* __restrict gx, T* __restrict gt, T* __restrict gl) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
  for (int64_t j = 0; j < n; ++j) {
    const T m = MASK ? mk[j * mstride] : T(1);
    T gshift;
    affine_element_backward<INVERSE, CLAMP>(c, x[j], t[j], l[j], m, gy[j], g_logdet, gx[j], gshift, gl[j], CExp{});
    if constexpr (WRITE_GSHIFT) gt[j] = gshift;
  }
}

template <typename T, bool INVERSE, bool CLAMP, bool MASK, bool WRITE_GSHIFT>
void backward_kernel(const AffineArgs& a, const ParallelFor& parallel_for) {
  const int64_t cols = a.cols;
  const T* x = static_cast<const T*>(a.x);
  const T* sh = static_cast<const T*>(a.shift);
  const T* ls = static_cast<const T*>(a.log_scale);
  const T* mk = static_cast<const T*>(a.mask);
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* gld = static_cast<const T*>(a.grad_logdet);
  T* gx = static_cast<T*>(a.grad_x);
  T* gt = static_cast<T*>(a.grad_shift);
  T* gls = static_cast<T*>(a.grad_log_scale);
  const T c = static_cast<T>(a.soft_clamp);

  for_each_row_chunk<T, T>(a.rows, cols, parallel_for, nullptr, T(0), [&](int64_t r, int64_t c0, int64_t c1) {
    const int64_t i0 = r * cols + c0, n = c1 - c0;
    const T* mrow = MASK ? mk + r * a.mask_stride_row + c0 * a.mask_stride_col : nullptr;
    T* gtr = WRITE_GSHIFT ? gt + i0 : nullptr;
    const auto segment = [&](int64_t mstride) {
      backward_segment<T, INVERSE, CLAMP, MASK, WRITE_GSHIFT>(
          n, c, gld[r], x + r * a.x_stride_row + c0, sh + r * a.shift_stride_row + c0, ls + r * a.ls_stride_row + c0,
          gy + i0, mrow, mstride, gx + i0, gtr, gls + i0);
    };
    // a literal stride lets the common mask layouts (contiguous, broadcast) vectorise
    if (!MASK || a.mask_stride_col == 1) {
      segment(1);
    } else if (a.mask_stride_col == 0) {
      segment(0);
    } else {
      segment(a.mask_stride_col);
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
