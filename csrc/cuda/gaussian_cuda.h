// CUDA launchers for the Gaussian ops. Plain C++ declarations (no CUDA or torch types)
// so that the torch binding can call them without CUDA headers.
#pragma once
#include <cstddef>
#include "pygen/gaussian.h"

namespace pygen::cuda {

// Bytes of device scratch the forward needs for per-chunk KL partials (0 when none).
size_t gaussian_forward_workspace_bytes(const GaussianFwdArgs& a);

// Each launcher enqueues on `stream` (a cudaStream_t) and returns nullptr on success or
// a static error string (the CUDA error of the launch).
const char* gaussian_forward(const GaussianFwdArgs& a, void* stream);
const char* gaussian_backward(const GaussianBwdArgs& a, void* stream);

}  // namespace pygen::cuda
