// Rational-quadratic spline (Durkan et al. 2019) of one element: the forward or inverse
// map with log|dy/dx|, and its gradients, written once for the CPU and CUDA backends.
//
// Parameterisation (nflows' unconstrained_rational_quadratic_spline, tails="linear"):
//   widths_k  = min_w + (1 - min_w K) softmax(raw_w)_k,   knots cw_0 = -B, cw_K = B,
//   cw_j = -B + 2B sum_{i<j} widths_i, bin widths w_k = cw_{k+1} - cw_k (same for heights),
//   d_0 = d_K = boundary (= 1), d_k = min_d + softplus(raw_d_{k-1}) for 0 < k < K.
// Inside bin k with theta = (x - cw_k) / w_k, s = h_k / w_k, t = theta (1 - theta):
//   y   = ch_k + h_k (s theta^2 + d_k t) / (s + (d_k + d_{k+1} - 2s) t)
//   lad = log(s^2 (d_{k+1} theta^2 + 2 s t + d_k (1 - theta)^2)) - 2 log(den)
// Outside [-B, B]: y = x, lad = 0. No (K,) temporaries leave registers/stack.
#pragma once
#include <cstdint>

#include "pygen/gaussian.h"  // DType, PYGEN_HD, fexp

namespace pygen {

constexpr int kMaxSplineBins = 64;

struct SplineArgs {
  int64_t rows = 0, cols = 0, bins = 0;  // K
  DType dtype = DType::kFloat32;
  bool inverse = false;
  double tail_bound = 3.0, min_bin_width = 1e-3, min_bin_height = 1e-3, min_derivative = 1e-3;
  double boundary_derivative = 1.0;  // min_d + softplus(log(expm1(1 - min_d))), from the host
  const void* x = nullptr;           // (rows, cols)
  const void* widths = nullptr;      // (rows, cols, K)
  const void* heights = nullptr;     // (rows, cols, K)
  const void* derivatives = nullptr;  // (rows, cols, K - 1)
  void* y = nullptr;
  void* logdet = nullptr;     // (rows,)
  void* workspace = nullptr;  // CUDA only
  // backward
  const void* grad_y = nullptr;
  const void* grad_logdet = nullptr;
  void* grad_x = nullptr;
  void* grad_widths = nullptr;
  void* grad_heights = nullptr;
  void* grad_derivatives = nullptr;
};

template <typename A>
PYGEN_HD A softplus(A v) {  // log(1 + e^v) without overflow
  return v > A(20) ? v : flog(A(1) + fexp(v));
}
template <typename A>
PYGEN_HD A sigmoid(A v) {
  return A(1) / (A(1) + fexp(-v));
}

// Knots of one element: softmax of raw sizes -> cumulative knots with pinned ends.
// knots[0..K] (K + 1 values); p[0..K-1] keeps the softmax for the backward.
template <typename A, typename T>
PYGEN_HD void spline_knots(const T* raw, int K, A bound, A min_size, A* knots, A* p) {
  A mx = A(raw[0]);
  for (int k = 1; k < K; ++k) mx = A(raw[k]) > mx ? A(raw[k]) : mx;
  A sum = 0;
  for (int k = 0; k < K; ++k) {
    p[k] = fexp(A(raw[k]) - mx);
    sum += p[k];
  }
  const A scale = A(1) - min_size * A(K);
  // The running sum in double (as torch.cumsum accumulates): in float32 its rounding grew
  // with k and reached 10x the reference's log-det error next to narrow bins.
  double cum = 0;
  knots[0] = -bound;
  for (int k = 0; k < K; ++k) {
    p[k] /= sum;
    cum += static_cast<double>(min_size + scale * p[k]);
    knots[k + 1] = static_cast<A>(2.0 * static_cast<double>(bound) * cum - static_cast<double>(bound));
  }
  knots[K] = bound;
}

// The bin holding v: the largest k in [0, K-1] with knots[k] <= v (binary search).
template <typename A>
PYGEN_HD int spline_bin(const A* knots, int K, A v) {
  int lo = 0, hi = K - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (knots[mid] <= v) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Everything about one element's bin that the map and its gradients need.
template <typename A>
struct SplineBin {
  int k;
  A xk, wk, yk, hk, d0, d1, s;  // bin origin/size in x and y, knot derivatives, slope h/w
  A theta;                      // position in the bin, [0, 1]
};

template <typename A, typename T>
PYGEN_HD A knot_derivative(const SplineArgs& a, const T* raw_d, int j, int K) {
  return (j == 0 || j == K) ? A(a.boundary_derivative) : A(a.min_derivative) + softplus(A(raw_d[j - 1]));
}

// Locates v (x for the forward, y for the inverse) and solves for theta.
template <typename A, typename T>
PYGEN_HD SplineBin<A> spline_locate(const SplineArgs& a, A v, const A* cw, const A* ch, const T* raw_d, int K) {
  SplineBin<A> b;
  b.k = spline_bin(a.inverse ? ch : cw, K, v);
  b.xk = cw[b.k];
  b.wk = cw[b.k + 1] - cw[b.k];
  b.yk = ch[b.k];
  b.hk = ch[b.k + 1] - ch[b.k];
  b.d0 = knot_derivative<A>(a, raw_d, b.k, K);
  b.d1 = knot_derivative<A>(a, raw_d, b.k + 1, K);
  b.s = b.hk / b.wk;
  if (!a.inverse) {
    b.theta = (v - b.xk) / b.wk;
  } else {
    // a theta^2 + b theta + c = 0, the root in [0, 1] in its cancellation-free form
    const A dy = v - b.yk, span = b.d0 + b.d1 - A(2) * b.s;
    const A qa = dy * span + b.hk * (b.s - b.d0);
    const A qb = b.hk * b.d0 - dy * span;
    const A qc = -b.s * dy;
    A disc = qb * qb - A(4) * qa * qc;
    disc = disc > A(0) ? disc : A(0);
    const A den = -qb - fsqrt(disc);
    b.theta = den != A(0) ? (A(2) * qc) / den : A(0);
  }
  return b;
}

// y (forward) and log|dy/dx| at the located theta.
template <typename A>
PYGEN_HD void spline_eval(const SplineBin<A>& b, A& y, A& lad) {
  const A th = b.theta, t = th * (A(1) - th), span = b.d0 + b.d1 - A(2) * b.s;
  const A den = b.s + span * t;
  y = b.yk + b.hk * (b.s * th * th + b.d0 * t) / den;
  const A dnum = b.s * b.s * (b.d1 * th * th + A(2) * b.s * t + b.d0 * (A(1) - th) * (A(1) - th));
  lad = flog(dnum) - A(2) * flog(den);
}

// Forward or inverse of one element; returns the log-det contribution (negated for the
// inverse), writes the output value.
template <typename A, typename T>
PYGEN_HD A spline_element(const SplineArgs& a, A v, const T* rw, const T* rh, const T* rd, A& out) {
  const A bound = A(a.tail_bound);
  if (!(v >= -bound && v <= bound)) {  // tails pass through; a NaN also makes its log-det NaN
    out = v;
    return v != v ? v : A(0);
  }
  const int K = static_cast<int>(a.bins);
  A cw[kMaxSplineBins + 1], ch[kMaxSplineBins + 1], p[kMaxSplineBins];
  spline_knots(rw, K, bound, A(a.min_bin_width), cw, p);
  spline_knots(rh, K, bound, A(a.min_bin_height), ch, p);
  const SplineBin<A> b = spline_locate(a, v, cw, ch, rd, K);
  A y, lad;
  spline_eval(b, y, lad);
  if (a.inverse) {
    out = b.xk + b.theta * b.wk;
    return -lad;
  }
  out = y;
  return lad;
}

// Gradient of a knot vector's raw parameters from the gradients at knots k and k + 1
// (the ends are pinned, so only interior knots carry gradient), through cumsum and softmax.
template <typename A, typename T>
PYGEN_HD void spline_knots_backward(A g_lo, A g_hi, int k, int K, A bound, A min_size, const A* p, T* grad_raw) {
  const A c = A(2) * bound * (A(1) - min_size * A(K));
  g_lo = (k >= 1) ? g_lo : A(0);          // knot k is interior
  g_hi = (k + 1 <= K - 1) ? g_hi : A(0);  // knot k + 1 is interior
  // d knot_j / d size_i = 2B [i < j]: sizes below k see both knots, size k only knot k + 1
  const A below = c * (g_lo + g_hi), at = c * g_hi;
  A dot = 0;
  for (int i = 0; i < K; ++i) dot += p[i] * (i < k ? below : (i == k ? at : A(0)));
  for (int i = 0; i < K; ++i) {
    const A gp = i < k ? below : (i == k ? at : A(0));
    grad_raw[i] = static_cast<T>(p[i] * (gp - dot));
  }
}

// Gradients of one element. gy: upstream of the output value, gl: of the element's
// log-det term (the row's logdet gradient). Writes grad_x and the K + K + (K - 1) raw
// parameter gradients of this element.
template <typename A, typename T>
PYGEN_HD void spline_element_backward(const SplineArgs& a, A v, const T* rw, const T* rh, const T* rd, A gy, A gl,
                                      A& grad_v, T* gw, T* gh, T* gd) {
  const A bound = A(a.tail_bound);
  const int K = static_cast<int>(a.bins);
  if (!(v >= -bound && v <= bound)) {
    grad_v = gy;
    for (int i = 0; i < K; ++i) gw[i] = gh[i] = T(0);
    for (int i = 0; i < K - 1; ++i) gd[i] = T(0);
    return;
  }
  A cw[kMaxSplineBins + 1], ch[kMaxSplineBins + 1], pw[kMaxSplineBins], ph[kMaxSplineBins];
  spline_knots(rw, K, bound, A(a.min_bin_width), cw, pw);
  spline_knots(rh, K, bound, A(a.min_bin_height), ch, ph);
  const SplineBin<A> b = spline_locate(a, v, cw, ch, rd, K);

  // Partials of y and lad (forward map at theta) w.r.t. theta, s, d0, d1 and h (explicit).
  const A th = b.theta, t = th * (A(1) - th), dt = A(1) - A(2) * th, span = b.d0 + b.d1 - A(2) * b.s;
  const A den = b.s + span * t, num = b.hk * (b.s * th * th + b.d0 * t);
  const A D = b.d1 * th * th + A(2) * b.s * t + b.d0 * (A(1) - th) * (A(1) - th);
  const A inv_den = A(1) / den, q = num * inv_den * inv_den;
  const A y_th = b.hk * (A(2) * b.s * th + b.d0 * dt) * inv_den - q * span * dt;
  const A y_s = b.hk * th * th * inv_den - q * (A(1) - A(2) * t);
  const A y_d0 = b.hk * t * inv_den - q * t;
  const A y_d1 = -q * t;
  const A y_h = (b.s * th * th + b.d0 * t) * inv_den;
  const A l_th = (A(2) * b.d1 * th + A(2) * b.s * dt - A(2) * b.d0 * (A(1) - th)) / D - A(2) * span * dt * inv_den;
  const A l_s = A(2) / b.s + A(2) * t / D - A(2) * (A(1) - A(2) * t) * inv_den;
  const A l_d0 = (A(1) - th) * (A(1) - th) / D - A(2) * t * inv_den;
  const A l_d1 = th * th / D - A(2) * t * inv_den;

  // Upstream on the forward map's (y, lad). The inverse x = G(u) differentiates implicitly:
  // loss = gy x - gl lad(x): du/dx = F'(x) = y_th / w, dlad/dx = l_th / w, and the
  // parameters see the forward map's gradient with upstream (-gu, -gl).
  A fy, fl;
  if (!a.inverse) {
    fy = gy;
    fl = gl;
    grad_v = (gy * y_th + gl * l_th) / b.wk;
  } else {
    const A gu = (gy - gl * l_th / b.wk) * b.wk / y_th;
    grad_v = gu;
    fy = -gu;
    fl = -gl;
  }
  const A G_th = fy * y_th + fl * l_th, G_s = fy * y_s + fl * l_s;
  const A G_d0 = fy * y_d0 + fl * l_d0, G_d1 = fy * y_d1 + fl * l_d1;
  const A g_xk = -G_th / b.wk;
  const A g_wk = -G_th * th / b.wk - G_s * b.s / b.wk;
  const A g_hk = fy * y_h + G_s / b.wk;
  const A g_yk = fy;
  spline_knots_backward(g_xk - g_wk, g_wk, b.k, K, bound, A(a.min_bin_width), pw, gw);
  spline_knots_backward(g_yk - g_hk, g_hk, b.k, K, bound, A(a.min_bin_height), ph, gh);
  for (int i = 0; i < K - 1; ++i) gd[i] = T(0);
  if (b.k >= 1) gd[b.k - 1] = static_cast<T>(G_d0 * sigmoid(A(rd[b.k - 1])));
  if (b.k + 1 <= K - 1) gd[b.k] = static_cast<T>(G_d1 * sigmoid(A(rd[b.k])));
}

}  // namespace pygen
