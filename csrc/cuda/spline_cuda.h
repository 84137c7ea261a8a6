// CUDA launchers for the rational-quadratic spline (no CUDA or torch types).
#pragma once
#include <cstddef>

#include "pygen/rq_spline.h"

namespace pygen::cuda {

size_t spline_forward_workspace_bytes(const SplineArgs& a);
const char* spline_forward(const SplineArgs& a, void* stream);
const char* spline_backward(const SplineArgs& a, void* stream);

}  // namespace pygen::cuda
