// Torch binding of pygen's C++/CUDA kernels: op schemas, CPU and CUDA implementations,
// and the pygen._C Python module. The only translation unit that includes torch.
//
// Argument checking with user-facing messages happens in Python (pygen/ops/); the
// checks here are a last line of defence that raise (never crash) on direct calls.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cuda/coupling_cuda.h"
#include "cuda/diffusion_cuda.h"
#include "cuda/gaussian_cuda.h"
#include "cuda/spline_cuda.h"
#include "pygen/philox.h"

namespace pygen {
namespace {

using at::Tensor;

// Test hook: fill every output with NaN before the kernel runs, so that an element the
// kernel fails to write shows up in the comparison with the reference.
std::atomic<bool> g_poison{false};

Tensor new_output(at::IntArrayRef sizes, const Tensor& like) {
  Tensor t = at::empty(sizes, like.options());
  if (g_poison.load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Per-row results (KL, log-det, loss) and their incoming gradients are float32, or float64
// for float64 inputs, whatever the input dtype (see csrc/cuda/rowwise.cuh).
at::ScalarType row_dtype(const Tensor& like) {
  return like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor new_row_output(int64_t rows, const Tensor& like) {
  Tensor t = at::empty({rows}, like.options().dtype(row_dtype(like)));
  if (g_poison.load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// A (rows,) gradient of a per-row result, contiguous, in row_dtype(like).
Tensor row_grad(const Tensor& g, int64_t rows, const Tensor& like, const char* name) {
  TORCH_CHECK(g.numel() == rows && g.scalar_type() == row_dtype(like) && g.device() == like.device(),
              "pygen: ", name, " must have shape (", rows, ",) and dtype ", row_dtype(like), " on ", like.device(),
              "; got ", g.scalar_type(), " of shape ", g.sizes());
  return g.contiguous();
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "pygen: unsupported dtype ", t.scalar_type());
  }
}

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, "pygen: ", name, " must have shape (B, ...), got a 0-dim tensor");
  const bool cpu = t.device().is_cpu();
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || (!cpu && (st == at::kHalf || st == at::kBFloat16)),
              "pygen: ", name, " must be float32 or float64", cpu ? "" : ", float16 or bfloat16",
              " on ", t.device(), ", got ", st);
}

void check_like(const Tensor& t, const Tensor& mu, const char* name) {
  TORCH_CHECK(t.sizes() == mu.sizes(), "pygen: ", name, " must have shape ", mu.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == mu.scalar_type(), "pygen: ", name, " must have dtype ", mu.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == mu.device(), "pygen: ", name, " must be on ", mu.device(), ", got ", t.device());
}

void check_seed(const Tensor& seed, const Tensor& mu) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == mu.device(),
              "pygen: seed must be a one-element int64 tensor on ", mu.device());
}

struct Rows {
  int64_t rows, cols;
};

// A (rows, cols) input read in place when each row's elements are contiguous (any row
// stride, even 0): the halves of a chunk()ed (B, 2D) or (B, 2C, H, W) tensor, a batch-
// broadcast view. Anything else is copied. Returns the tensor to read and its row stride.
std::pair<Tensor, int64_t> row_contiguous(const Tensor& t) {
  int64_t expected = 1;
  bool ok = true;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) ok = false;
    expected *= t.size(d);
  }
  if (ok && t.size(0) > 1) return {t, t.stride(0)};
  if (ok) return {t, expected};
  if (t.dim() > 1 && t.stride(0) == 0) {
    // every row is the same (a batch-broadcast view whose rows are not contiguous, e.g. an
    // expanded scalar): materialise one row and read it with row stride 0, not B copies
    return {t.select(0, 0).contiguous().unsqueeze(0).expand(t.sizes()), 0};
  }
  return {t.contiguous(), expected};
}
// For elementwise work (no per-row sums): the stride of a flat (numel, 1) view, when there is
// one: 0 for a fully broadcast value (every stride 0, e.g. randn's expanded zeros), 1 for a
// contiguous tensor.
std::optional<int64_t> flat_stride(const Tensor& t) {
  bool all_zero = true;
  for (int64_t d = 0; d < t.dim(); ++d) all_zero = all_zero && (t.size(d) == 1 || t.stride(d) == 0);
  if (all_zero) return 0;
  if (t.is_contiguous()) return 1;
  return std::nullopt;
}

Rows rows_of(const Tensor& mu) {
  const int64_t rows = mu.size(0);
  int64_t cols = 1;
  for (int64_t d = 1; d < mu.dim(); ++d) cols *= mu.size(d);
  return {rows, cols};
}

// The prior arrives expanded to mu's shape (possibly a stride-0 view); view it as
// (rows, cols) without copying when the strides allow it.
Tensor prior_view(const Tensor& p, const Tensor& mu, Rows rc, const char* name) {
  check_like(p, mu, name);
  return p.reshape({rc.rows, rc.cols});
}

const cpu::ParallelFor& torch_parallel_for() {
  static const cpu::ParallelFor pf = [](int64_t b, int64_t e, int64_t g,
                                        const std::function<void(int64_t, int64_t)>& f) { at::parallel_for(b, e, g, f); };
  return pf;
}

// Runs a kernel on the device of `like`: the CPU entry point with torch's thread pool, or
// the CUDA launcher on the current stream (with `workspace_bytes` of scratch when asked).
template <typename Args>
void launch(const Tensor& like, Args& a, void (*cpu_fn)(const Args&, const cpu::ParallelFor&),
            const char* (*cuda_fn)(const Args&, void*), size_t workspace_bytes = 0) {
  if (like.device().is_cpu()) {
    cpu_fn(a, torch_parallel_for());
    return;
  }
#ifdef PYGEN_WITH_CUDA
  TORCH_CHECK(like.device().is_cuda(), "pygen: unsupported device ", like.device());
  c10::DeviceGuard guard(like.device());
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(like.device()).native_handle();
  Tensor ws;
  if (workspace_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(workspace_bytes)}, like.options().dtype(at::kByte));
    a.workspace = ws.data_ptr();
  }
  const char* err = cuda_fn(a, stream);
  TORCH_CHECK(err == nullptr, "pygen: CUDA launch failed: ", err);
#else
  (void)cuda_fn;
  (void)workspace_bytes;
  TORCH_CHECK(false, "pygen was built without CUDA; tensors are on ", like.device());
#endif
}

#ifndef PYGEN_WITH_CUDA
// Stand-ins so that launch() has something to point at in a CPU-only build.
namespace cuda {
const char* gaussian_forward(const GaussianFwdArgs&, void*) { return "no CUDA"; }
const char* gaussian_backward(const GaussianBwdArgs&, void*) { return "no CUDA"; }
const char* affine_forward(const AffineArgs&, void*) { return "no CUDA"; }
const char* affine_backward(const AffineArgs&, void*) { return "no CUDA"; }
size_t gaussian_forward_workspace_bytes(const GaussianFwdArgs&) { return 0; }
size_t affine_forward_workspace_bytes(const AffineArgs&) { return 0; }
const char* spline_forward(const SplineArgs&, void*) { return "no CUDA"; }
const char* spline_backward(const SplineArgs&, void*) { return "no CUDA"; }
size_t spline_forward_workspace_bytes(const SplineArgs&) { return 0; }
const char* alpha_step(const StepArgs&, void*) { return "no CUDA"; }
const char* sigma_step(const SigmaStepArgs&, void*) { return "no CUDA"; }
const char* q_sample(const LossArgs&, void*) { return "no CUDA"; }
const char* diffusion_mse(const LossArgs&, void*) { return "no CUDA"; }
size_t diffusion_mse_workspace_bytes(const LossArgs&) { return 0; }
}  // namespace cuda
#endif

// Without a per-row KL nothing depends on the row split: view the tensor as one long row,
// so that a (N,) or (B, 2) tensor is not run as N or B tiny rows (the counter of element
// (r, c), offset + r * cols + c, is the flat index either way).
template <typename Args>
void as_one_row(Args& a) {
  a.cols *= a.rows;
  a.rows = a.cols > 0 ? 1 : 0;
}

void run_forward(GaussianFwdArgs& a, const Tensor& mu) {
  if (a.rows * a.cols == 0 && a.kl == nullptr) return;
  // (one long row needs rows laid end to end)
  if (a.kl == nullptr && a.mu_stride_row == a.cols && a.lv_stride_row == a.cols) as_one_row(a);
  const bool cuda = !mu.device().is_cpu();
  launch(mu, a, &cpu::gaussian_forward, &cuda::gaussian_forward,
         cuda ? cuda::gaussian_forward_workspace_bytes(a) : 0);
}

void run_backward(GaussianBwdArgs& a, const Tensor& like) {
  if (a.rows * a.cols == 0) return;
  if (a.grad_kl == nullptr && a.lv_stride_row == a.cols) as_one_row(a);  // mu is not read then
  launch(like, a, &cpu::gaussian_backward, &cuda::gaussian_backward);
}

// ---- forward ops ------------------------------------------------------------------

std::tuple<Tensor, Tensor> sample_forward(const Tensor& mu_in, const Tensor& lv_in, const Tensor& seed,
                                          int64_t offset, bool with_kl) {
  check_float(mu_in, "mu");
  check_like(lv_in, mu_in, "logvar");
  check_seed(seed, mu_in);
  TORCH_CHECK(offset >= 0, "pygen: offset must be >= 0, got ", offset);
  Tensor mu, lv;
  int64_t mu_sr, lv_sr;
  Rows rc;
  const auto fm = flat_stride(mu_in), fl = flat_stride(lv_in);
  if (!with_kl && fm && fl && (*fm == 0 || *fl == 0)) {
    // elementwise (no per-row sum): a broadcast value is read in place as a (numel, 1) view
    mu = mu_in, lv = lv_in, mu_sr = *fm, lv_sr = *fl;
    rc = {mu_in.numel(), 1};
  } else {
    std::tie(mu, mu_sr) = row_contiguous(mu_in);
    std::tie(lv, lv_sr) = row_contiguous(lv_in);
    rc = rows_of(mu);
  }
  const Tensor seed_c = seed.contiguous();
  Tensor z = new_output(mu_in.sizes(), mu);
  Tensor kl = with_kl ? new_row_output(rc.rows, mu) : Tensor();
  GaussianFwdArgs a;
  a.rows = rc.rows;
  a.cols = rc.cols;
  a.dtype = dtype_of(mu);
  a.mu = mu.const_data_ptr();
  a.logvar = lv.const_data_ptr();
  a.mu_stride_row = mu_sr;
  a.lv_stride_row = lv_sr;
  a.seed = seed_c.const_data_ptr<int64_t>();
  a.offset = static_cast<uint64_t>(offset);
  a.z = z.data_ptr();
  a.kl = with_kl ? kl.data_ptr() : nullptr;
  run_forward(a, mu);
  return {z, kl};
}

Tensor reparameterize(const Tensor& mu, const Tensor& logvar, const Tensor& seed, int64_t offset) {
  return std::get<0>(sample_forward(mu, logvar, seed, offset, false));
}

std::tuple<Tensor, Tensor> reparameterize_kl(const Tensor& mu, const Tensor& logvar, const Tensor& seed,
                                             int64_t offset) {
  return sample_forward(mu, logvar, seed, offset, true);
}

Tensor gaussian_kl(const Tensor& mu_in, const Tensor& lv_in, const std::optional<Tensor>& prior_mu,
                   const std::optional<Tensor>& prior_logvar) {
  check_float(mu_in, "mu");
  check_like(lv_in, mu_in, "logvar");
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "pygen: pass prior_mu and prior_logvar together (the Python API fills in a missing one)");
  const auto [mu, mu_sr] = row_contiguous(mu_in);
  const auto [lv, lv_sr] = row_contiguous(lv_in);
  const Rows rc = rows_of(mu);
  Tensor kl = new_row_output(rc.rows, mu);
  GaussianFwdArgs a;
  a.rows = rc.rows;
  a.cols = rc.cols;
  a.dtype = dtype_of(mu);
  a.mu = mu.const_data_ptr();
  a.logvar = lv.const_data_ptr();
  a.mu_stride_row = mu_sr;
  a.lv_stride_row = lv_sr;
  a.kl = kl.data_ptr();
  Tensor pm, pl;
  if (prior_mu.has_value()) {
    pm = prior_view(*prior_mu, mu, rc, "prior_mu");
    pl = prior_view(*prior_logvar, mu, rc, "prior_logvar");
    a.prior_mu = pm.const_data_ptr();
    a.prior_logvar = pl.const_data_ptr();
    a.pmu_stride_row = pm.stride(0);
    a.pmu_stride_col = pm.stride(1);
    a.plv_stride_row = pl.stride(0);
    a.plv_stride_col = pl.stride(1);
  }
  run_forward(a, mu);
  return kl;
}

// ---- backward ops -----------------------------------------------------------------

Tensor reparameterize_backward(const Tensor& grad_z, const Tensor& lv_in, const Tensor& seed, int64_t offset) {
  check_float(lv_in, "logvar");
  check_like(grad_z, lv_in, "grad_z");
  check_seed(seed, lv_in);
  Tensor lv;
  int64_t lv_sr;
  Rows rc;
  if (flat_stride(lv_in) == std::optional<int64_t>(0)) {  // a broadcast logvar, read in place
    lv = lv_in, lv_sr = 0;
    rc = {lv_in.numel(), 1};
  } else {
    std::tie(lv, lv_sr) = row_contiguous(lv_in);
    rc = rows_of(lv);
  }
  const Tensor gz = grad_z.contiguous(), seed_c = seed.contiguous();
  Tensor glv = new_output(lv_in.sizes(), lv);
  GaussianBwdArgs a;
  a.rows = rc.rows;
  a.cols = rc.cols;
  a.dtype = dtype_of(lv);
  a.logvar = lv.const_data_ptr();
  a.lv_stride_row = lv_sr;
  a.seed = seed_c.const_data_ptr<int64_t>();
  a.offset = static_cast<uint64_t>(offset);
  a.grad_z = gz.const_data_ptr();
  a.grad_logvar = glv.data_ptr();
  run_backward(a, lv);
  return glv;
}

std::tuple<Tensor, Tensor> reparameterize_kl_backward(const Tensor& grad_z, const Tensor& grad_kl,
                                                      const Tensor& mu_in, const Tensor& lv_in,
                                                      const Tensor& seed, int64_t offset) {
  check_float(mu_in, "mu");
  check_like(lv_in, mu_in, "logvar");
  check_like(grad_z, mu_in, "grad_z");
  check_seed(seed, mu_in);
  const auto [mu, mu_sr] = row_contiguous(mu_in);
  const auto [lv, lv_sr] = row_contiguous(lv_in);
  const Tensor gz = grad_z.contiguous(), seed_c = seed.contiguous();
  const Rows rc = rows_of(mu);
  const Tensor gkl = row_grad(grad_kl, rc.rows, mu, "grad_kl");
  Tensor gmu = new_output(mu.sizes(), mu), glv = new_output(mu.sizes(), mu);
  GaussianBwdArgs a;
  a.rows = rc.rows;
  a.cols = rc.cols;
  a.dtype = dtype_of(mu);
  a.mu = mu.const_data_ptr();
  a.logvar = lv.const_data_ptr();
  a.mu_stride_row = mu_sr;
  a.lv_stride_row = lv_sr;
  a.seed = seed_c.const_data_ptr<int64_t>();
  a.offset = static_cast<uint64_t>(offset);
  a.grad_z = gz.const_data_ptr();
  a.grad_kl = gkl.const_data_ptr();
  a.grad_mu = gmu.data_ptr();
  a.grad_logvar = glv.data_ptr();
  run_backward(a, mu);
  return {gmu, glv};
}

// [grad_mu, grad_logvar] (+ [grad_prior_mu, grad_prior_logvar] with a prior and prior_grads).
std::vector<Tensor> gaussian_kl_backward(const Tensor& grad_kl, const Tensor& mu_in, const Tensor& lv_in,
                                         const std::optional<Tensor>& prior_mu,
                                         const std::optional<Tensor>& prior_logvar, bool prior_grads) {
  check_float(mu_in, "mu");
  check_like(lv_in, mu_in, "logvar");
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(), "pygen: pass prior_mu and prior_logvar together");
  const auto [mu, mu_sr] = row_contiguous(mu_in);
  const auto [lv, lv_sr] = row_contiguous(lv_in);
  const Rows rc = rows_of(mu);
  const Tensor gkl = row_grad(grad_kl, rc.rows, mu, "grad_kl");
  std::vector<Tensor> out = {new_output(mu.sizes(), mu), new_output(mu.sizes(), mu)};
  GaussianBwdArgs a;
  a.rows = rc.rows;
  a.cols = rc.cols;
  a.dtype = dtype_of(mu);
  a.mu = mu.const_data_ptr();
  a.logvar = lv.const_data_ptr();
  a.mu_stride_row = mu_sr;
  a.lv_stride_row = lv_sr;
  a.grad_kl = gkl.const_data_ptr();
  a.grad_mu = out[0].data_ptr();
  a.grad_logvar = out[1].data_ptr();
  Tensor pm, pl;
  if (prior_mu.has_value()) {
    pm = prior_view(*prior_mu, mu, rc, "prior_mu");
    pl = prior_view(*prior_logvar, mu, rc, "prior_logvar");
    a.prior_mu = pm.const_data_ptr();
    a.prior_logvar = pl.const_data_ptr();
    a.pmu_stride_row = pm.stride(0);
    a.pmu_stride_col = pm.stride(1);
    a.plv_stride_row = pl.stride(0);
    a.plv_stride_col = pl.stride(1);
    if (prior_grads) {
      out.push_back(new_output(mu.sizes(), mu));
      out.push_back(new_output(mu.sizes(), mu));
      a.grad_prior_mu = out[2].data_ptr();
      a.grad_prior_logvar = out[3].data_ptr();
    }
  }
  run_backward(a, mu);
  return out;
}

// ---- affine coupling ------------------------------------------------------------------

struct AffineInputs {
  Tensor x, shift, log_scale, mask;
  Rows rc;
};

AffineInputs affine_inputs(const Tensor& x, const Tensor& shift, const Tensor& log_scale,
                           const std::optional<Tensor>& mask, double soft_clamp, AffineArgs& a) {
  check_float(x, "x");
  check_like(shift, x, "shift");
  check_like(log_scale, x, "log_scale");
  TORCH_CHECK(soft_clamp >= 0, "pygen: soft_clamp must be >= 0 (0: none), got ", soft_clamp);
  auto [xc, x_sr] = row_contiguous(x);
  auto [tc, t_sr] = row_contiguous(shift);
  auto [lc, l_sr] = row_contiguous(log_scale);
  AffineInputs in{xc, tc, lc, Tensor(), rows_of(x)};
  a.x_stride_row = x_sr;
  a.shift_stride_row = t_sr;
  a.ls_stride_row = l_sr;
  a.rows = in.rc.rows;
  a.cols = in.rc.cols;
  a.dtype = dtype_of(x);
  a.soft_clamp = soft_clamp;
  a.x = in.x.const_data_ptr();
  a.shift = in.shift.const_data_ptr();
  a.log_scale = in.log_scale.const_data_ptr();
  if (mask.has_value()) {
    in.mask = prior_view(*mask, x, in.rc, "mask");  // a broadcast view in x's dtype
    a.mask = in.mask.const_data_ptr();
    a.mask_stride_row = in.mask.stride(0);
    a.mask_stride_col = in.mask.stride(1);
  }
  return in;
}

std::tuple<Tensor, Tensor> affine_coupling(const Tensor& x, const Tensor& shift, const Tensor& log_scale,
                                           const std::optional<Tensor>& mask, bool inverse, double soft_clamp) {
  AffineArgs a;
  const AffineInputs in = affine_inputs(x, shift, log_scale, mask, soft_clamp, a);
  a.inverse = inverse;
  Tensor y = new_output(x.sizes(), x), logdet = new_row_output(in.rc.rows, x);
  a.y = y.data_ptr();
  a.logdet = logdet.data_ptr();
  if (in.rc.rows == 0) return {y, logdet};
  const bool cuda = !x.device().is_cpu();
  launch(x, a, &cpu::affine_forward, &cuda::affine_forward, cuda ? cuda::affine_forward_workspace_bytes(a) : 0);
  return {y, logdet};
}

// [grad_x, grad_log_scale], or [grad_x, grad_shift, grad_log_scale] when grad_shift is not
// simply grad_y (inverse direction or a mask).
std::vector<Tensor> affine_coupling_backward(const Tensor& grad_y, const Tensor& grad_logdet, const Tensor& x,
                                             const Tensor& shift, const Tensor& log_scale,
                                             const std::optional<Tensor>& mask, bool inverse, double soft_clamp) {
  AffineArgs a;
  const AffineInputs in = affine_inputs(x, shift, log_scale, mask, soft_clamp, a);
  check_like(grad_y, x, "grad_y");
  const Tensor gy = grad_y.contiguous(), gld = row_grad(grad_logdet, in.rc.rows, x, "grad_logdet");
  a.inverse = inverse;
  a.grad_y = gy.const_data_ptr();
  a.grad_logdet = gld.const_data_ptr();
  const bool write_shift = inverse || mask.has_value();
  std::vector<Tensor> out = {new_output(x.sizes(), x)};
  if (write_shift) out.push_back(new_output(x.sizes(), x));
  out.push_back(new_output(x.sizes(), x));
  a.grad_x = out[0].data_ptr();
  a.grad_shift = write_shift ? out[1].data_ptr() : nullptr;
  a.grad_log_scale = out.back().data_ptr();
  if (in.rc.rows * in.rc.cols == 0) return out;
  launch(x, a, &cpu::affine_backward, &cuda::affine_backward);
  return out;
}

// ---- rational-quadratic spline ----------------------------------------------------------

struct SplineInputs {
  Tensor x, widths, heights, derivatives;
  Rows rc;
};

SplineInputs spline_inputs(const Tensor& x, const Tensor& widths, const Tensor& heights, const Tensor& derivatives,
                           bool inverse, double tail_bound, double min_bin_width, double min_bin_height,
                           double min_derivative, SplineArgs& a) {
  check_float(x, "x");
  const int64_t K = widths.dim() == x.dim() + 1 ? widths.size(-1) : -1;
  TORCH_CHECK(K >= 2 && K <= kMaxSplineBins, "pygen: widths must have shape x.shape + (K,) with 2 <= K <= ",
              kMaxSplineBins, ", got ", widths.sizes());
  std::vector<int64_t> want(x.sizes().begin(), x.sizes().end());
  want.push_back(K);
  TORCH_CHECK(widths.sizes() == at::IntArrayRef(want) && heights.sizes() == at::IntArrayRef(want),
              "pygen: widths and heights must have shape ", at::IntArrayRef(want));
  want.back() = K - 1;
  TORCH_CHECK(derivatives.sizes() == at::IntArrayRef(want), "pygen: derivatives must have shape ",
              at::IntArrayRef(want));
  for (const Tensor* t : {&widths, &heights, &derivatives}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "pygen: spline parameters must have x's dtype and device");
  }
  TORCH_CHECK(tail_bound > 0 && min_derivative > 0 && min_bin_width * K < 1 && min_bin_height * K < 1,
              "pygen: invalid spline constants");
  SplineInputs in{x.contiguous(), widths.contiguous(), heights.contiguous(), derivatives.contiguous(), rows_of(x)};
  a.rows = in.rc.rows;
  a.cols = in.rc.cols;
  a.bins = K;
  a.dtype = dtype_of(x);
  a.inverse = inverse;
  a.tail_bound = tail_bound;
  a.min_bin_width = min_bin_width;
  a.min_bin_height = min_bin_height;
  a.min_derivative = min_derivative;
  // min_d + softplus(log(expm1(1 - min_d))) = 1 up to rounding: the tails' slope
  a.boundary_derivative = min_derivative + std::log1p(std::expm1(1.0 - min_derivative));
  a.x = in.x.const_data_ptr();
  a.widths = in.widths.const_data_ptr();
  a.heights = in.heights.const_data_ptr();
  a.derivatives = in.derivatives.const_data_ptr();
  return in;
}

std::tuple<Tensor, Tensor> rq_spline(const Tensor& x, const Tensor& widths, const Tensor& heights,
                                     const Tensor& derivatives, bool inverse, double tail_bound, double min_bin_width,
                                     double min_bin_height, double min_derivative) {
  SplineArgs a;
  const SplineInputs in = spline_inputs(x, widths, heights, derivatives, inverse, tail_bound, min_bin_width,
                                        min_bin_height, min_derivative, a);
  Tensor y = new_output(x.sizes(), x), logdet = new_row_output(in.rc.rows, x);
  a.y = y.data_ptr();
  a.logdet = logdet.data_ptr();
  if (in.rc.rows == 0) return {y, logdet};
  const bool cuda = !x.device().is_cpu();
  launch(x, a, &cpu::spline_forward, &cuda::spline_forward, cuda ? cuda::spline_forward_workspace_bytes(a) : 0);
  return {y, logdet};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rq_spline_backward(
    const Tensor& grad_y, const Tensor& grad_logdet, const Tensor& x, const Tensor& widths, const Tensor& heights,
    const Tensor& derivatives, bool inverse, double tail_bound, double min_bin_width, double min_bin_height,
    double min_derivative) {
  SplineArgs a;
  const SplineInputs in = spline_inputs(x, widths, heights, derivatives, inverse, tail_bound, min_bin_width,
                                        min_bin_height, min_derivative, a);
  check_like(grad_y, x, "grad_y");
  const Tensor gy = grad_y.contiguous(), gld = row_grad(grad_logdet, in.rc.rows, x, "grad_logdet");
  Tensor gx = new_output(x.sizes(), x), gw = new_output(widths.sizes(), x), gh = new_output(heights.sizes(), x),
         gd = new_output(derivatives.sizes(), x);
  a.grad_y = gy.const_data_ptr();
  a.grad_logdet = gld.const_data_ptr();
  a.grad_x = gx.data_ptr();
  a.grad_widths = gw.data_ptr();
  a.grad_heights = gh.data_ptr();
  a.grad_derivatives = gd.data_ptr();
  if (in.rc.rows * in.rc.cols > 0) launch(x, a, &cpu::spline_backward, &cuda::spline_backward);
  return {gx, gw, gh, gd};
}

// ---- diffusion sampler steps ------------------------------------------------------------

// A per-sample index tensor: (rows,), or one value for every sample (shape () or (1,): read
// with stride 0, so a sampling loop needs no kernel to expand it). Returns the row stride.
int64_t index_stride(const Tensor& v, int64_t rows, const Tensor& sample, const char* name) {
  TORCH_CHECK(v.scalar_type() == at::kLong && v.device() == sample.device() &&
                  (v.numel() == 1 ? v.dim() <= 1 : (v.dim() == 1 && v.size(0) == rows)),
              "pygen: ", name, " must be an int64 tensor of shape (), (1,) or (", rows, ",) on ", sample.device(),
              "; got ", v.scalar_type(), " of shape ", v.sizes(), " on ", v.device());
  return v.numel() == 1 ? 0 : 1;
}

// Table indices must lie in [lo, hi]. Checked where they live in host memory (CPU tensors);
// on CUDA a check would be a sync, and the kernels clamp instead (pygen/diffusion.h).
void check_indices(const Tensor& v, int64_t lo, int64_t hi, const char* name) {
  if (!v.device().is_cpu() || v.numel() == 0) return;
  const Tensor c = v.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    if (lo == std::numeric_limits<int64_t>::min()) {
      TORCH_CHECK(p[i] <= hi, "pygen: ", name, " must be <= ", hi, " (negative: the final step); got ", p[i],
                  " at position ", i);
    } else {
      TORCH_CHECK(p[i] >= lo && p[i] <= hi, "pygen: ", name, " must be in [", lo, ", ", hi, "]; got ", p[i],
                  " at position ", i);
    }
  }
}


// The shared half of a sampler step: checks, contiguous inputs, outputs, and the StepIO
// block. Keeps the tensors it points into alive until the launch.
struct StepTensors {
  Tensor mo, x, noise, seed, prev, x0;
  Rows rc;
};

StepTensors step_io(const Tensor& model_output, const Tensor& sample, const std::optional<Tensor>& noise,
                    const std::optional<Tensor>& seed, int64_t offset, int64_t prediction, bool write_x0,
                    StepIO& a) {
  check_float(sample, "sample");
  check_like(model_output, sample, "model_output");
  TORCH_CHECK(prediction >= 0 && prediction <= 2, "pygen: bad prediction type ", prediction);
  if (noise.has_value()) check_like(*noise, sample, "noise");
  if (seed.has_value()) check_seed(*seed, sample);
  StepTensors st;
  st.rc = rows_of(sample);
  st.mo = model_output.contiguous();
  st.x = sample.contiguous();
  if (noise.has_value()) st.noise = noise->contiguous();
  if (seed.has_value()) st.seed = seed->contiguous();
  // x0 not asked for: an empty tensor (the schema returns two tensors), nothing written
  st.prev = new_output(st.x.sizes(), st.x);
  st.x0 = write_x0 ? new_output(st.x.sizes(), st.x) : st.x.new_empty({0});
  a.rows = st.rc.rows;
  a.cols = st.rc.cols;
  a.dtype = dtype_of(st.x);
  a.prediction = static_cast<Prediction>(prediction);
  a.model_output = st.mo.const_data_ptr();
  a.sample = st.x.const_data_ptr();
  a.noise = st.noise.defined() ? st.noise.const_data_ptr() : nullptr;
  a.seed = st.seed.defined() ? st.seed.const_data_ptr<int64_t>() : nullptr;
  a.offset = static_cast<uint64_t>(offset);
  a.prev_sample = st.prev.data_ptr();
  a.pred_original = write_x0 ? st.x0.data_ptr() : nullptr;
  return st;
}

std::tuple<Tensor, Tensor> alpha_step(const Tensor& model_output, const Tensor& sample, const Tensor& alphas_cumprod,
                                      const Tensor& t, const Tensor& prev_t, double final_alpha_cumprod, int64_t kind,
                                      int64_t prediction, double eta, double clip_range, bool clipped_eps,
                                      const std::optional<Tensor>& noise, const std::optional<Tensor>& seed,
                                      int64_t offset, bool write_x0) {
  StepArgs a;
  const StepTensors st = step_io(model_output, sample, noise, seed, offset, prediction, write_x0, a);
  TORCH_CHECK(kind >= 0 && kind <= 2, "pygen: bad alpha-space step kind ", kind);
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.device() == sample.device() &&
                  (alphas_cumprod.scalar_type() == at::kFloat || alphas_cumprod.scalar_type() == at::kDouble),
              "pygen: alphas_cumprod must be a 1-D float32/float64 tensor on ", sample.device());
  const int64_t t_stride = index_stride(t, st.rc.rows, sample, "t");
  const int64_t prev_t_stride = index_stride(prev_t, st.rc.rows, sample, "prev_t");
  check_indices(t, 0, alphas_cumprod.size(0) - 1, "t");
  check_indices(prev_t, std::numeric_limits<int64_t>::min(), alphas_cumprod.size(0) - 1, "prev_t");  // < 0: final
  const Tensor table = alphas_cumprod.contiguous(), tc = t.contiguous(), tpc = prev_t.contiguous();
  a.kind = static_cast<StepKind>(kind);
  a.eta = eta;
  a.clip_range = clip_range;
  a.clipped_eps = clipped_eps;
  a.alphas_cumprod = table.const_data_ptr();
  a.table_f64 = table.scalar_type() == at::kDouble;
  a.num_timesteps = table.size(0);
  a.final_alpha_cumprod = final_alpha_cumprod;
  a.t = tc.const_data_ptr<int64_t>();
  a.prev_t = tpc.const_data_ptr<int64_t>();
  a.t_stride = t_stride;
  a.prev_t_stride = prev_t_stride;
  if (st.rc.rows * st.rc.cols > 0) launch(st.x, a, &cpu::alpha_step, &cuda::alpha_step);
  return {st.prev, st.x0};
}

std::tuple<Tensor, Tensor> sigma_step(const Tensor& model_output, const Tensor& sample, const Tensor& sigmas,
                                      const Tensor& index, const std::optional<Tensor>& prev_x0, int64_t kind,
                                      int64_t prediction, double gamma, double s_tmin, double s_tmax, double s_noise,
                                      const std::optional<Tensor>& noise, const std::optional<Tensor>& seed,
                                      int64_t offset, bool write_x0) {
  SigmaStepArgs a;
  const StepTensors st = step_io(model_output, sample, noise, seed, offset, prediction, write_x0, a);
  TORCH_CHECK(kind >= 0 && kind <= 3, "pygen: bad sigma-space step kind ", kind);
  TORCH_CHECK(sigmas.dim() == 1 && sigmas.size(0) >= 2 && sigmas.device() == sample.device() &&
                  (sigmas.scalar_type() == at::kFloat || sigmas.scalar_type() == at::kDouble),
              "pygen: sigmas must be a 1-D float32/float64 tensor of at least 2 entries on ", sample.device());
  const int64_t i_stride = index_stride(index, st.rc.rows, sample, "index");
  check_indices(index, 0, sigmas.size(0) - 2, "index");
  if (prev_x0.has_value()) check_like(*prev_x0, sample, "prev_x0");
  const Tensor table = sigmas.contiguous(), ic = index.contiguous();
  const Tensor px = prev_x0.has_value() ? prev_x0->contiguous() : Tensor();
  a.kind = static_cast<SigmaKind>(kind);
  a.gamma = gamma;
  a.s_tmin = s_tmin;
  a.s_tmax = s_tmax;
  a.s_noise = s_noise;
  a.prev_x0 = px.defined() ? px.const_data_ptr() : nullptr;
  a.sigmas = table.const_data_ptr();
  a.table_f64 = table.scalar_type() == at::kDouble;
  a.num_sigmas = table.size(0);
  a.index = ic.const_data_ptr<int64_t>();
  a.index_stride = i_stride;
  if (st.rc.rows * st.rc.cols > 0) launch(st.x, a, &cpu::sigma_step, &cuda::sigma_step);
  return {st.prev, st.x0};
}

// ---- diffusion training: q_sample and the per-sample weighted MSE ----------------------

Rows loss_args(const Tensor& x0, const Tensor& alphas_cumprod, const Tensor& t, const Tensor& seed, int64_t offset,
               LossArgs& a) {
  check_float(x0, "x0");
  const Rows rc = rows_of(x0);
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.device() == x0.device() &&
                  (alphas_cumprod.scalar_type() == at::kFloat || alphas_cumprod.scalar_type() == at::kDouble),
              "pygen: alphas_cumprod must be a 1-D float32/float64 tensor on ", x0.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == rc.rows && t.device() == x0.device(),
              "pygen: t must be an int64 tensor of shape (", rc.rows, ",) on ", x0.device());
  check_seed(seed, x0);
  check_indices(t, 0, alphas_cumprod.size(0) - 1, "t");
  TORCH_CHECK(offset >= 0, "pygen: offset must be >= 0");
  a.rows = rc.rows;
  a.cols = rc.cols;
  a.dtype = dtype_of(x0);
  a.table_f64 = alphas_cumprod.scalar_type() == at::kDouble;
  a.num_timesteps = alphas_cumprod.size(0);
  a.offset = static_cast<uint64_t>(offset);
  return rc;
}

Tensor q_sample(const Tensor& x0, const Tensor& alphas_cumprod, const Tensor& t, const Tensor& seed, int64_t offset) {
  LossArgs a;
  const Rows rc = loss_args(x0, alphas_cumprod, t, seed, offset, a);
  const Tensor x = x0.contiguous(), table = alphas_cumprod.contiguous(), tc = t.contiguous(), sd = seed.contiguous();
  Tensor xt = new_output(x.sizes(), x);
  a.x0 = x.const_data_ptr();
  a.alphas_cumprod = table.const_data_ptr();
  a.t = tc.const_data_ptr<int64_t>();
  a.seed = sd.const_data_ptr<int64_t>();
  a.x_t = xt.data_ptr();
  if (rc.rows * rc.cols > 0) launch(x, a, &cpu::q_sample, &cuda::q_sample);
  return xt;
}

std::tuple<Tensor, Tensor> diffusion_mse_impl(const std::optional<Tensor>& grad_loss, const Tensor& model_output,
                                              const Tensor& x0, const Tensor& alphas_cumprod, const Tensor& t,
                                              const Tensor& seed, int64_t offset, int64_t prediction,
                                              double snr_gamma, bool write_grad_x0) {
  LossArgs a;
  const Rows rc = loss_args(x0, alphas_cumprod, t, seed, offset, a);
  check_like(model_output, x0, "model_output");
  TORCH_CHECK(prediction >= 0 && prediction <= 2 && snr_gamma >= 0, "pygen: bad prediction type or snr_gamma");
  a.prediction = static_cast<Prediction>(prediction);
  a.snr_gamma = snr_gamma;
  const Tensor x = x0.contiguous(), mo = model_output.contiguous(), table = alphas_cumprod.contiguous();
  const Tensor tc = t.contiguous(), sd = seed.contiguous();
  a.x0 = x.const_data_ptr();
  a.model_output = mo.const_data_ptr();
  a.alphas_cumprod = table.const_data_ptr();
  a.t = tc.const_data_ptr<int64_t>();
  a.seed = sd.const_data_ptr<int64_t>();
  Tensor first, second, gl;
  if (grad_loss.has_value()) {
    gl = row_grad(*grad_loss, rc.rows, x, "grad_loss");
    first = new_output(x.sizes(), x);
    second = write_grad_x0 ? new_output(x.sizes(), x) : new_output({0}, x);  // empty: not asked for
    a.grad_loss = gl.const_data_ptr();
    a.grad_model_output = first.data_ptr();
    a.grad_x0 = write_grad_x0 ? second.data_ptr() : nullptr;
    if (rc.rows * rc.cols > 0) launch(x, a, &cpu::diffusion_mse, &cuda::diffusion_mse);
  } else {
    first = new_row_output(rc.rows, x);
    a.loss = first.data_ptr();
    const bool cuda = !x.device().is_cpu();
    if (rc.rows > 0) {
      launch(x, a, &cpu::diffusion_mse, &cuda::diffusion_mse, cuda ? cuda::diffusion_mse_workspace_bytes(a) : 0);
    }
    second = new_output({0}, x);
  }
  return {first, second};
}

Tensor diffusion_mse(const Tensor& model_output, const Tensor& x0, const Tensor& alphas_cumprod, const Tensor& t,
                     const Tensor& seed, int64_t offset, int64_t prediction, double snr_gamma) {
  return std::get<0>(
      diffusion_mse_impl(std::nullopt, model_output, x0, alphas_cumprod, t, seed, offset, prediction, snr_gamma, false));
}

std::tuple<Tensor, Tensor> diffusion_mse_backward(const Tensor& grad_loss, const Tensor& model_output, const Tensor& x0,
                                                  const Tensor& alphas_cumprod, const Tensor& t, const Tensor& seed,
                                                  int64_t offset, int64_t prediction, double snr_gamma,
                                                  bool write_grad_x0) {
  return diffusion_mse_impl(grad_loss, model_output, x0, alphas_cumprod, t, seed, offset, prediction, snr_gamma,
                            write_grad_x0);
}

}  // namespace

TORCH_LIBRARY(pygen, m) {
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor seed, int offset) -> Tensor");
  m.def("reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor seed, int offset) -> Tensor");
  m.def("reparameterize_kl(Tensor mu, Tensor logvar, Tensor seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "reparameterize_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor seed, "
      "int offset) -> (Tensor, Tensor)");
  m.def("gaussian_kl(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar) -> Tensor");
  m.def(
      "gaussian_kl_backward(Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? prior_mu, "
      "Tensor? prior_logvar, bool prior_grads=True) -> Tensor[]");
  m.def(
      "affine_coupling(Tensor x, Tensor shift, Tensor log_scale, Tensor? mask, bool inverse, float soft_clamp) "
      "-> (Tensor, Tensor)");
  m.def(
      "affine_coupling_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor shift, Tensor log_scale, "
      "Tensor? mask, bool inverse, float soft_clamp) -> Tensor[]");
  m.def(
      "rq_spline(Tensor x, Tensor widths, Tensor heights, Tensor derivatives, bool inverse, float tail_bound, "
      "float min_bin_width, float min_bin_height, float min_derivative) -> (Tensor, Tensor)");
  m.def(
      "rq_spline_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor widths, Tensor heights, "
      "Tensor derivatives, bool inverse, float tail_bound, float min_bin_width, float min_bin_height, "
      "float min_derivative) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "alpha_step(Tensor model_output, Tensor sample, Tensor alphas_cumprod, Tensor t, Tensor prev_t, "
      "float final_alpha_cumprod, int kind, int prediction, float eta, float clip_range, bool clipped_eps, "
      "Tensor? noise, Tensor? seed, int offset, bool write_x0=True) -> (Tensor, Tensor)");
  m.def(
      "sigma_step(Tensor model_output, Tensor sample, Tensor sigmas, Tensor index, Tensor? prev_x0, int kind, "
      "int prediction, float gamma, float s_tmin, float s_tmax, float s_noise, Tensor? noise, Tensor? seed, "
      "int offset, bool write_x0=True) -> (Tensor, Tensor)");
  m.def("q_sample(Tensor x0, Tensor alphas_cumprod, Tensor t, Tensor seed, int offset) -> Tensor");
  m.def(
      "diffusion_mse(Tensor model_output, Tensor x0, Tensor alphas_cumprod, Tensor t, Tensor seed, int offset, "
      "int prediction, float snr_gamma) -> Tensor");
  m.def(
      "diffusion_mse_backward(Tensor grad_loss, Tensor model_output, Tensor x0, Tensor alphas_cumprod, Tensor t, "
      "Tensor seed, int offset, int prediction, float snr_gamma, bool write_grad_x0=True) -> (Tensor, Tensor)");
}

#define PYGEN_REGISTER_IMPLS(m)                                      \
  m.impl("reparameterize", &reparameterize);                         \
  m.impl("reparameterize_backward", &reparameterize_backward);       \
  m.impl("reparameterize_kl", &reparameterize_kl);                   \
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward); \
  m.impl("gaussian_kl", &gaussian_kl);                               \
  m.impl("gaussian_kl_backward", &gaussian_kl_backward);             \
  m.impl("affine_coupling", &affine_coupling);                       \
  m.impl("affine_coupling_backward", &affine_coupling_backward);     \
  m.impl("rq_spline", &rq_spline);                                   \
  m.impl("rq_spline_backward", &rq_spline_backward);                 \
  m.impl("alpha_step", &alpha_step);                                 \
  m.impl("sigma_step", &sigma_step);                                 \
  m.impl("q_sample", &q_sample);                                     \
  m.impl("diffusion_mse", &diffusion_mse);                           \
  m.impl("diffusion_mse_backward", &diffusion_mse_backward);

TORCH_LIBRARY_IMPL(pygen, CPU, m) { PYGEN_REGISTER_IMPLS(m) }
#ifdef PYGEN_WITH_CUDA
TORCH_LIBRARY_IMPL(pygen, CUDA, m) { PYGEN_REGISTER_IMPLS(m) }
#endif

}  // namespace pygen

PYBIND11_MODULE(_C, m) {
  m.doc() = "pygen's compiled kernels; the ops live in torch.ops.pygen";
  m.def("cuda_enabled", []() {
#ifdef PYGEN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() {
#ifdef PYGEN_CUDA_ARCHS
    return std::string(PYGEN_CUDA_ARCHS);
#else
    return std::string();
#endif
  }, "The CUDA architectures the kernels were built for (CMAKE_CUDA_ARCHITECTURES, ',' separated), or ''.");
  m.def("_cpu_isa", &pygen::cpu::isa, "The instruction set of the CPU kernels in use.");
  m.def("_set_cpu_isa", &pygen::cpu::set_isa, "Use the baseline/avx2/avx512 CPU kernels; False if unsupported.");
  m.def("_set_poison", [](bool on) { pygen::g_poison.store(on); }, "Fill outputs with NaN before kernels (tests).");
  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const pygen::Philox4 r = pygen::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return pybind11::make_tuple(r.x[0], r.x[1], r.x[2], r.x[3]);
      },
      "The raw Philox4x32-10 block (for known-answer tests).");
  m.def(
      "philox_normal", [](uint64_t seed, uint64_t ctr) { return pygen::philox_normal(seed, ctr); },
      "The normal draw of counter ctr under seed, as every backend computes it.");
}
