// Philox4x32-10 counter-based RNG and the normal draw shared by every pygen backend.
//
// The stream (the same on every backend; documented in pygen/_rng.py): the normal of
// element counter g under key `seed` comes from Philox4x32-10 block b = g / 4, i.e. counter
// (lo32(b), hi32(b), 0, 0) and key (lo32(seed), hi32(seed)). Its four words become four
// uniforms (Triton's conversion); words (0, 1) and (2, 3) are two Box-Muller pairs, each
// giving a cosine and a sine normal, so counters 4b .. 4b + 3 take
//   r_A cos(th_A), r_A sin(th_A), r_B cos(th_B), r_B sin(th_B)
// = Triton's tl.randn4x(seed, b). One Philox block serves four elements (it used to serve
// one, keeping two of its four words). The same function runs on the host and the device;
// the CPU kernels draw whole blocks at once (csrc/cpu/noise.h), the pure-torch reference
// (pygen/_rng.py) and the Triton helper (kernels/philox.py) implement the same steps. Keep
// all four in step.
#pragma once
#include <cstdint>
#include <cmath>
#include <math.h>

// Internal linkage (static): the CPU kernels are compiled once per instruction set, and
// an inline function with external linkage would be merged across those builds by the
// linker, so baseline code could end up calling an AVX-512 copy.
#if defined(__CUDACC__)
#define PYGEN_HD static __host__ __device__ __forceinline__
#else
#define PYGEN_HD static inline
#endif

namespace pygen {

struct Philox4 {
  uint32_t x[4];
};

PYGEN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11; the Random123 constants).
PYGEN_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                               uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi_a = mulhi32(kMulA, c0), lo_a = kMulA * c0;
    const uint32_t hi_b = mulhi32(kMulB, c2), lo_b = kMulB * c2;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float for 32-bit words: reinterpret as int32, fold the
// negative half onto the positive one, scale into [0, 1).
PYGEN_HD float uint_to_uniform(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v = v < 0 ? -v - 1 : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

// Standard normal for element counter `ctr` (64-bit) under `seed` (64-bit key).
PYGEN_HD float philox_normal(uint64_t seed, uint64_t ctr) {
  const uint64_t block = ctr >> 2;
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u,
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const bool second_pair = (ctr & 2u) != 0;
  float u1 = uint_to_uniform(second_pair ? r.x[2] : r.x[0]);
  const float u2 = uint_to_uniform(second_pair ? r.x[3] : r.x[1]);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;  // Triton clamps u1 so that log(u1) stays finite
  const float th = 6.283185307179586f * u2;
  // Full-precision logf/sinf/cosf (not the __logf/__cosf intrinsics): the draw must agree
  // with the host and Triton to a few ulp.
  return sqrtf(-2.0f * logf(u1)) * ((ctr & 1u) != 0 ? sinf(th) : cosf(th));
}

}  // namespace pygen
