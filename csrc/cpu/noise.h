// Philox normal draws for the CPU kernels (the scheme of pygen/philox.h), vectorised.
// Included by the per-ISA kernel files only: internal linkage (see rowwise.h).
//
// Two passes per block: the Philox rounds in explicit SIMD (AVX-512 / AVX2 when the build
// has them, scalar otherwise), then Box-Muller in a plain loop that GCC auto-vectorises;
// each Philox block gives four normals (see pygen/philox.h).
// Auto-vectorised, the rounds' 32x32 -> 64-bit products became 64-bit multiplies
// (vpmullq) on widened lanes, about half the cost of a draw; the SIMD rounds use the
// even/odd 32-bit multiply (vpmuludq) instead. Integer arithmetic only, so every build
// returns the same bits as the scalar scheme.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "pygen/philox.h"
#include "rowwise.h"  // kBlock
#include "vec_math.h"

namespace pygen::cpu {
namespace {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u, kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

#if defined(__AVX512F__)
constexpr int kPhiloxLanes = 16;

// hi/lo 32-bit halves of a * k for 16 lanes: even lanes from one vpmuludq, odd lanes
// (shifted down) from another, blended back into place.
inline void mulhilo(__m512i a, __m512i k, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, k);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), k);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

// The four words of Philox4x32-10 for block counters ctr .. ctr + 15 (c2 = c3 = 0).
inline void philox_lanes(uint64_t ctr, uint32_t k0, uint32_t k1, uint32_t* x0, uint32_t* x1, uint32_t* x2,
                         uint32_t* x3) {
  const __m512i lo0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr)));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0 = _mm512_add_epi32(lo0, iota);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo0);  // the low word wrapped
  const __m512i hi0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32)));
  __m512i c1 = _mm512_mask_add_epi32(hi0, carry, hi0, _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxMulB));
  for (int r = 0; r < 10; ++r) {
    __m512i hi_a, lo_a, hi_b, lo_b;
    mulhilo(c0, ma, hi_a, lo_a);
    mulhilo(c2, mb, hi_b, lo_b);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  _mm512_storeu_si512(x0, c0);
  _mm512_storeu_si512(x1, c1);
  _mm512_storeu_si512(x2, c2);
  _mm512_storeu_si512(x3, c3);
}
#elif defined(__AVX2__)
constexpr int kPhiloxLanes = 8;

inline void mulhilo(__m256i a, __m256i k, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, k);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

inline void philox_lanes(uint64_t ctr, uint32_t k0, uint32_t k1, uint32_t* x0, uint32_t* x1, uint32_t* x2,
                         uint32_t* x3) {
  const __m256i lo0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr)));
  __m256i c0 = _mm256_add_epi32(lo0, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // unsigned c0 < lo0 (the low word wrapped), via a signed compare with the sign bits flipped
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lo0, sign), _mm256_xor_si256(c0, sign));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32))), carry);
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxMulB));
  for (int r = 0; r < 10; ++r) {
    __m256i hi_a, lo_a, hi_b, lo_b;
    mulhilo(c0, ma, hi_a, lo_a);
    mulhilo(c2, mb, hi_b, lo_b);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x2), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x3), c3);
}
#else
constexpr int kPhiloxLanes = 0;  // scalar only
#endif

// Philox blocks per fill_normals call: a kBlock window can touch kBlock / 4 + 1 blocks;
// rounded up to whole SIMD batches (the SIMD loop may compute a few blocks past the window).
constexpr int64_t kNoiseBlocks = kBlock / 4 + 16;

// Normals for counters ctr0 .. ctr0 + n - 1, n <= kBlock (the stream of pygen/philox.h).
// Pass 1: the Philox blocks covering the window, four words each, in SIMD. Pass 2:
// Box-Muller on both pairs of every block (sin and cos from one reduction), auto-vectorised,
// into the block-aligned buffer `all`. Then the window is copied out.
void fill_normals(uint64_t seed, uint64_t ctr0, int64_t n, float* __restrict out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t b0 = ctr0 >> 2;
  const int64_t head = static_cast<int64_t>(ctr0 & 3u);
  const int64_t blocks = (head + n + 3) >> 2;
  alignas(64) uint32_t w0[kNoiseBlocks], w1[kNoiseBlocks], w2[kNoiseBlocks], w3[kNoiseBlocks];
  int64_t j = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; j < blocks; j += kPhiloxLanes) {
    philox_lanes(b0 + static_cast<uint64_t>(j), k0, k1, w0 + j, w1 + j, w2 + j, w3 + j);
  }
#endif
  for (; j < blocks; ++j) {
    const uint64_t b = b0 + static_cast<uint64_t>(j);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), 0u, 0u, k0, k1);
    w0[j] = r.x[0];
    w1[j] = r.x[1];
    w2[j] = r.x[2];
    w3[j] = r.x[3];
  }
  alignas(64) float all[4 * kNoiseBlocks];
  for (j = 0; j < blocks; ++j) {
    float ua = uint_to_uniform(w0[j]), ub = uint_to_uniform(w2[j]);
    ua = ua > 1.0e-7f ? ua : 1.0e-7f;
    ub = ub > 1.0e-7f ? ub : 1.0e-7f;
    const float ra = std::sqrt(-2.0f * vlog_positive(ua)), rb = std::sqrt(-2.0f * vlog_positive(ub));
    float sa, ca, sb, cb;
    vsincos_angle(6.283185307179586f * uint_to_uniform(w1[j]), sa, ca);
    vsincos_angle(6.283185307179586f * uint_to_uniform(w3[j]), sb, cb);
    all[4 * j] = ra * ca;
    all[4 * j + 1] = ra * sa;
    all[4 * j + 2] = rb * cb;
    all[4 * j + 3] = rb * sb;
  }
  for (j = 0; j < n; ++j) out[j] = all[head + j];
}

}  // namespace
}  // namespace pygen::cpu
