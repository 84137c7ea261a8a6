// Branch-free float32 exp / log / cos that GCC auto-vectorises (libm calls block that).
// Cephes-style range reduction and minimax polynomials, about 1-2 ulp on the ranges
// used here. Only the CPU backend uses them; CUDA and Triton use their libdevice math,
// so the backends agree to a few ulp, not bit for bit.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>

namespace pygen::cpu {
namespace {  // internal linkage: this header is compiled once per ISA (see rowwise.h)

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// exp(x) for all x: overflow to +inf, underflow (x < -87.3, below FLT_MIN) to 0, NaN kept.
// Written so that GCC if-converts every select (with -fno-trapping-math) and vectorises.
inline float vexp(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.7f ? 88.7f : xc;
  // n = round(x / ln2); at a negative exact half-integer it is one less, where r is
  // exactly ln2 / 2: still inside the polynomial's range.
  const float t = xc * 1.44269504088896341f + 0.5f;
  const int32_t ni = static_cast<int32_t>(t) - (t < 0.0f ? 1 : 0);
  const float n = static_cast<float>(ni);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float y = p * bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  y = x > 88.7f ? std::numeric_limits<float>::infinity() : y;
  y = x < -87.3f ? 0.0f : y;
  return x == x ? y : x;
}

// log(x) for normal positive finite x (here: uniforms in [1e-7, 1)).
inline float vlog_positive(float x) {
  const uint32_t b = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((b >> 23) & 0xFF) - 126);
  float m = bits_to_float((b & 0x807FFFFFu) | 0x3F000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + e * 0.693359375f;
}

// sin(x) and cos(x) for x in [0, 2*pi] (Box-Muller angles), Cephes' sinf/cosf reduction:
// one octant reduction and both polynomials serve both results.
inline void vsincos_angle(float x, float& sin_out, float& cos_out) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516f);  // x / (pi/4), x >= 0
  j = (j + 1) & ~1;
  const float y = static_cast<float>(j);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  j &= 7;
  const int32_t jj = j > 3 ? j - 4 : j;
  const bool swap = jj == 1 || jj == 2;  // octants where sin and cos trade polynomials
  float sign_c = j > 3 ? -1.0f : 1.0f;
  sign_c = jj > 1 ? -sign_c : sign_c;
  const float sign_s = j > 3 ? -1.0f : 1.0f;
  const float z = r * r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  cos_out = sign_c * (swap ? s : c);
  sin_out = sign_s * (swap ? c : s);
}

// The kernels' exp: vectorisable for float, libm for double (not performance-critical).
inline float cexp(float x) { return vexp(x); }
inline double cexp(double x) { return std::exp(x); }
struct CExp {
  template <typename T>
  T operator()(T v) const {
    return cexp(v);
  }
};

}  // namespace
}  // namespace pygen::cpu
