// CUDA launchers for the coupling transforms (no CUDA or torch types; see gaussian_cuda.h).
#pragma once
#include <cstddef>

#include "pygen/coupling.h"

namespace pygen::cuda {

size_t affine_forward_workspace_bytes(const AffineArgs& a);
const char* affine_forward(const AffineArgs& a, void* stream);
const char* affine_backward(const AffineArgs& a, void* stream);

}  // namespace pygen::cuda
