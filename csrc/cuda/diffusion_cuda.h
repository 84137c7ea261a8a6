// CUDA launcher for the alpha-space sampler steps (no CUDA or torch types).
#pragma once
#include "pygen/diffusion.h"

namespace pygen::cuda {

const char* alpha_step(const StepArgs& a, void* stream);

}  // namespace pygen::cuda
