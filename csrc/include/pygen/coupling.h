// Coupling transforms of normalizing flows: argument blocks shared by the CPU and CUDA
// backends (raw pointers, no torch types). Same (rows, cols) = (B, prod(other dims))
// view as pygen/gaussian.h; y and the gradients are contiguous; x, shift and log_scale are
// row-contiguous with their own row strides (the halves of a split read in place); the
// optional mask is a broadcast view with its own strides, in x's dtype.
#pragma once
#include <cstdint>

#include "pygen/gaussian.h"  // DType, PYGEN_HD, fexp

namespace pygen {

struct AffineArgs {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  bool inverse = false;
  double soft_clamp = 0;  // 0: s = log_scale; else s = c * tanh(log_scale / c)
  const void* x = nullptr;
  const void* shift = nullptr;
  const void* log_scale = nullptr;
  const void* mask = nullptr;  // null: every element is transformed
  int64_t mask_stride_row = 0, mask_stride_col = 0;
  int64_t x_stride_row = 0, shift_stride_row = 0, ls_stride_row = 0;  // cols when contiguous
  // forward outputs
  void* y = nullptr;
  void* logdet = nullptr;     // (rows,)
  void* workspace = nullptr;  // CUDA only: per-chunk partial sums
  // backward
  const void* grad_y = nullptr;
  const void* grad_logdet = nullptr;  // (rows,)
  void* grad_x = nullptr;
  void* grad_shift = nullptr;  // null: the caller uses grad_y (forward direction, no mask)
  void* grad_log_scale = nullptr;
};

// s and ds/dlog_scale for the soft clamp s = c * tanh(v / c), c != 0 (the kernels choose the
// unclamped path at compile time: a run-time c == 0 branch here keeps GCC from vectorising
// the inverse backward). tanh(u) = -em1 / (em1 + 2) with em1 = e^{-2|u|} - 1 (sign restored)
// keeps full relative accuracy for small u (1 - 2 / (e^{2u} + 1) lost it: 69% log-det error
// at |s| ~ 1e-5 in float32) and gives exact limits at +-inf; exp_fn lets the CPU pass its
// vectorisable exp.
template <typename T, typename Exp>
PYGEN_HD void soft_clamp(T c, T log_scale, T& s, T& ds, Exp exp_fn) {
  const T u = log_scale / c;
  const T au = u < T(0) ? -u : u;
  const T em1 = exp_m1(T(-2) * au, exp_fn);
  const T ath = -em1 / (em1 + T(2));
  const T th = u < T(0) ? -ath : ath;
  s = c * th;
  ds = T(1) - th * th;
}

// One element of the affine transform: returns y, writes the (clamped, masked) s that the
// log-determinant sums. m is the mask value (1 without a mask).
//   forward: y = x e^s + t m,   inverse: y = (x - t m) e^{-s},   s = m soft_clamp(log_scale)
template <bool INVERSE, bool CLAMP, typename T, typename Exp>
PYGEN_HD T affine_element(T c, T x, T shift, T log_scale, T m, T& s_out, Exp exp_fn) {
  T s, ds;
  if constexpr (CLAMP) {
    soft_clamp(c, log_scale, s, ds, exp_fn);
  } else {
    s = log_scale;
  }
  s *= m;
  const T t = shift * m;
  s_out = s;
  return INVERSE ? (x - t) * exp_fn(-s) : x * exp_fn(s) + t;
}

// Its gradients given grad_y g and the row's grad_logdet gl:
//   grad_x = g e^{+-s}; grad_shift = g m (forward) or -g e^{-s} m (inverse);
//   grad_log_scale = (g x e^s + gl) m ds (forward) or (-g y - gl) m ds (inverse), y recomputed.
template <bool INVERSE, bool CLAMP, typename T, typename Exp>
PYGEN_HD void affine_element_backward(T c, T x, T shift, T log_scale, T m, T g, T gl, T& gx, T& gt, T& gls,
                                      Exp exp_fn) {
  T s, ds = T(1);
  if constexpr (CLAMP) {
    soft_clamp(c, log_scale, s, ds, exp_fn);
  } else {
    s = log_scale;
  }
  s *= m;
  if constexpr (INVERSE) {
    const T e = exp_fn(-s);
    const T y = (x - shift * m) * e;
    gx = g * e;
    gt = -g * e * m;
    gls = (-g * y - gl) * m * ds;
  } else {
    const T e = exp_fn(s);
    gx = g * e;
    gt = g * m;
    gls = (g * x * e + gl) * m * ds;
  }
}

}  // namespace pygen
