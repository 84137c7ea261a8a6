// Entry points of pygen's CPU kernels. No torch headers: the binding passes a
// parallel-for (at::parallel_for) so these kernels honour torch's thread settings.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "pygen/coupling.h"
#include "pygen/diffusion.h"
#include "pygen/gaussian.h"
#include "pygen/rq_spline.h"

namespace pygen::cpu {

// parallel_for(begin, end, grain, body): body(b, e) runs on [b, e) sub-ranges.
using ParallelFor =
    std::function<void(int64_t, int64_t, int64_t, const std::function<void(int64_t, int64_t)>&)>;

// One build of the kernels per instruction set (gaussian_cpu.cpp compiled per ISA).
#define PYGEN_DECLARE_CPU_ISA(isa)                                           \
  namespace isa {                                                          \
  void gaussian_forward(const GaussianFwdArgs& a, const ParallelFor& pf);  \
  void gaussian_backward(const GaussianBwdArgs& a, const ParallelFor& pf); \
  void affine_forward(const AffineArgs& a, const ParallelFor& pf);         \
  void affine_backward(const AffineArgs& a, const ParallelFor& pf);        \
  void spline_forward(const SplineArgs& a, const ParallelFor& pf);         \
  void spline_backward(const SplineArgs& a, const ParallelFor& pf);        \
  void alpha_step(const StepArgs& a, const ParallelFor& pf);               \
  void sigma_step(const SigmaStepArgs& a, const ParallelFor& pf);          \
  void q_sample(const LossArgs& a, const ParallelFor& pf);                 \
  void diffusion_mse(const LossArgs& a, const ParallelFor& pf);            \
  }
PYGEN_DECLARE_CPU_ISA(baseline)
PYGEN_DECLARE_CPU_ISA(avx2)
PYGEN_DECLARE_CPU_ISA(avx512)
#undef PYGEN_DECLARE_CPU_ISA

// Dispatch to the widest build this CPU runs (or the one set by set_isa).
void gaussian_forward(const GaussianFwdArgs& a, const ParallelFor& pf);
void gaussian_backward(const GaussianBwdArgs& a, const ParallelFor& pf);
void affine_forward(const AffineArgs& a, const ParallelFor& pf);
void affine_backward(const AffineArgs& a, const ParallelFor& pf);
void spline_forward(const SplineArgs& a, const ParallelFor& pf);
void spline_backward(const SplineArgs& a, const ParallelFor& pf);
void alpha_step(const StepArgs& a, const ParallelFor& pf);
void sigma_step(const SigmaStepArgs& a, const ParallelFor& pf);
void q_sample(const LossArgs& a, const ParallelFor& pf);
void diffusion_mse(const LossArgs& a, const ParallelFor& pf);

// "baseline", "avx2" or "avx512"; set_isa returns false when the CPU lacks it.
std::string isa();
bool set_isa(const std::string& name);

}  // namespace pygen::cpu
