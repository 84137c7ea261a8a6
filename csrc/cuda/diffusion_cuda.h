// CUDA launcher for the alpha-space sampler steps (no CUDA or torch types).
#pragma once
#include <cstddef>

#include "pygen/diffusion.h"

namespace pygen::cuda {

const char* alpha_step(const StepArgs& a, void* stream);
const char* sigma_step(const SigmaStepArgs& a, void* stream);
const char* q_sample(const LossArgs& a, void* stream);
size_t diffusion_mse_workspace_bytes(const LossArgs& a);
const char* diffusion_mse(const LossArgs& a, void* stream);

}  // namespace pygen::cuda
