// CPU entry points for the Gaussian ops. No torch headers: the binding passes a
// parallel-for (at::parallel_for) so these kernels honour torch's thread settings.
#pragma once
#include <cstdint>
#include <functional>
#include "pygen/gaussian.h"

namespace pygen::cpu {

// parallel_for(begin, end, grain, body): body(b, e) runs on [b, e) sub-ranges.
using ParallelFor =
    std::function<void(int64_t, int64_t, int64_t, const std::function<void(int64_t, int64_t)>&)>;

void gaussian_forward(const GaussianFwdArgs& a, const ParallelFor& parallel_for);
void gaussian_backward(const GaussianBwdArgs& a, const ParallelFor& parallel_for);

// Normal draws for counters offset .. offset + n - 1 (tests and the torch backend's check).
void philox_normal_fill(float* out, int64_t n, uint64_t seed, uint64_t offset,
                        const ParallelFor& parallel_for);

}  // namespace pygen::cpu
