// Picks the widest CPU build of the kernels that this processor runs. The builds give
// identical results (see gaussian_cpu.cpp), so the choice only changes speed;
// PYGEN_CPU_ISA=baseline|avx2|avx512 in the environment, or pygen._C._set_cpu_isa,
// overrides it (benchmarks and tests).
#include <atomic>
#include <cstdlib>

#include "cpu_kernels.h"

namespace pygen::cpu {
namespace {

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

bool supported(Isa isa) {
#if defined(PYGEN_CPU_MULTI_ISA)
  switch (isa) {
    case kAvx512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    case kAvx2: return __builtin_cpu_supports("avx2");
    default: return true;
  }
#else
  return isa == kBaseline;
#endif
}

int parse(const std::string& s) {
  if (s == "baseline") return kBaseline;
  if (s == "avx2") return kAvx2;
  if (s == "avx512") return kAvx512;
  return -1;
}

int initial() {
  if (const char* env = std::getenv("PYGEN_CPU_ISA")) {
    const int want = parse(env);
    if (want >= 0 && supported(static_cast<Isa>(want))) return want;
  }
  if (supported(kAvx512)) return kAvx512;
  if (supported(kAvx2)) return kAvx2;
  return kBaseline;
}

std::atomic<int>& current() {
  static std::atomic<int> value{initial()};
  return value;
}

}  // namespace

// Calls isa::fn(args...) for the ISA in use.
#if defined(PYGEN_CPU_MULTI_ISA)
#define PYGEN_CPU_DISPATCH(fn, ...)                                           \
  switch (current().load(std::memory_order_relaxed)) {                       \
    case kAvx512: return avx512::fn(__VA_ARGS__);                            \
    case kAvx2: return avx2::fn(__VA_ARGS__);                                \
    default: return baseline::fn(__VA_ARGS__);                               \
  }
#else
#define PYGEN_CPU_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

void gaussian_forward(const GaussianFwdArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(gaussian_forward, a, pf) }
void gaussian_backward(const GaussianBwdArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(gaussian_backward, a, pf) }
void affine_forward(const AffineArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(affine_forward, a, pf) }
void affine_backward(const AffineArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(affine_backward, a, pf) }
void spline_forward(const SplineArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(spline_forward, a, pf) }
void spline_backward(const SplineArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(spline_backward, a, pf) }
void alpha_step(const StepArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(alpha_step, a, pf) }
void sigma_step(const SigmaStepArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(sigma_step, a, pf) }
void q_sample(const LossArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(q_sample, a, pf) }
void diffusion_mse(const LossArgs& a, const ParallelFor& pf) { PYGEN_CPU_DISPATCH(diffusion_mse, a, pf) }

std::string isa() {
  static const char* names[] = {"baseline", "avx2", "avx512"};
  return names[current().load()];
}

bool set_isa(const std::string& name) {
  const int want = parse(name);
  if (want < 0 || !supported(static_cast<Isa>(want))) return false;
  current().store(want);
  return true;
}

}  // namespace pygen::cpu
