// Philox normal draws for the CPU kernels (the scheme of pygen/philox.h), vectorised.
// Included by the per-ISA kernel files only: internal linkage (see rowwise.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "pygen/philox.h"
#include "vec_math.h"

namespace pygen::cpu {
namespace {

// Normals for counters ctr0 .. ctr0 + n - 1; a plain loop over independent elements
// that the compiler vectorises (Philox rounds, then vexp/vlog/vcos, no libm calls).
void fill_normals(uint64_t seed, uint64_t ctr0, int64_t n, float* __restrict out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t ctr = ctr0 + static_cast<uint64_t>(j);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u, k0, k1);
    float u1 = uint_to_uniform(r.x[0]);
    const float u2 = uint_to_uniform(r.x[1]);
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    out[j] = std::sqrt(-2.0f * vlog_positive(u1)) * vcos_angle(6.283185307179586f * u2);
  }
}

}  // namespace
}  // namespace pygen::cpu
