// Shared by pygen's CPU kernels on a (rows, cols) view with an optional per-row sum
// (KL, log-determinants). Included by the per-ISA kernel files only.
//
// Work is split into (row, column-chunk) tasks so that one huge row still spreads over
// all threads. A row's sum is the sum of its chunk partials in chunk order, and within a
// chunk element c goes to accumulator (c - chunk_start) % kLanes: a fixed order, so the
// result depends neither on the thread count nor on the instruction set.
#pragma once
#include <cstdint>
#include <memory>

#include "cpu_kernels.h"  // ParallelFor

namespace pygen::cpu {
// Everything here has internal linkage, and avoids std algorithms and containers: code
// from a header that the linker merged across the per-ISA builds could run AVX-512
// instructions on a CPU without them.
namespace {

constexpr int64_t kChunk = 8192;  // columns per task
constexpr int64_t kBlock = 256;   // elements processed together inside a task (multiple of kLanes)
constexpr int kLanes = 16;        // interleaved accumulators of a sum

// kLanes interleaved partial sums. add(n, f) adds f(0..n-1); every call but a task's last
// must have n % kLanes == 0 so that lanes stay aligned.
template <typename A>
struct LaneSum {
  A acc[kLanes] = {};
  template <typename F>
  void add(int64_t n, F&& f) {
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) acc[k] += f(j + k);
    }
    for (int k = 0; j < n; ++j, ++k) acc[k] += f(j);
  }
  A total() {
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
    }
    return acc[0];
  }
};

// Runs task(r, c0, c1) -> partial sum for every (row, chunk) in parallel. When out is not
// null, out[r] = scale * (the row's partials summed in chunk order); rows with no
// columns get 0.
template <typename A, typename T, typename Task>
void for_each_row_chunk(int64_t rows, int64_t cols, const ParallelFor& parallel_for, T* out, A scale, Task&& task) {
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  std::unique_ptr<A[]> partial(out != nullptr && chunks > 1 ? new A[rows * chunks] : nullptr);
  parallel_for(0, rows * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / chunks, c0 = (t % chunks) * kChunk;
      const A p = task(r, c0, c0 + kChunk < cols ? c0 + kChunk : cols);
      if (out == nullptr) continue;
      if (chunks == 1) {
        out[r] = static_cast<T>(scale * p);
      } else {
        partial[t] = p;
      }
    }
  });
  if (out == nullptr) return;
  if (chunks == 0) {
    for (int64_t r = 0; r < rows; ++r) out[r] = T(0);
  } else if (chunks > 1) {
    parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        A s = 0;
        for (int64_t k = 0; k < chunks; ++k) s += partial[r * chunks + k];
        out[r] = static_cast<T>(scale * s);
      }
    });
  }
}

// Runs f(i0, n) over [0, numel) in blocks of at most kBlock elements, kChunk elements per
// parallel task: for elementwise work (no per-row sum), whatever the row length. A (N,) or
// (B, 1) view has one element per row, which for_each_row_chunk would run as N one-element
// tasks.
template <typename F>
void for_each_flat_block(int64_t numel, const ParallelFor& parallel_for, F&& f) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t end = (t + 1) * kChunk < numel ? (t + 1) * kChunk : numel;
      for (int64_t b0 = t * kChunk; b0 < end; b0 += kBlock) f(b0, b0 + kBlock < end ? kBlock : end - b0);
    }
  });
}

// Calls g(j, r, c, len) for the row segments of the flat elements [i0, i0 + n) of a
// (rows, cols) view: element i0 + j .. i0 + j + len - 1 is (r, c) .. (r, c + len - 1).
template <typename G>
inline void for_each_row_segment(int64_t i0, int64_t n, int64_t cols, G&& g) {
  int64_t r = i0 / cols, c = i0 - r * cols;
  for (int64_t j = 0; j < n; ++r, c = 0) {
    const int64_t len = cols - c < n - j ? cols - c : n - j;
    g(j, r, c, len);
    j += len;
  }
}

}  // namespace
}  // namespace pygen::cpu
