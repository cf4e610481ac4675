// What the CPU kernels of spdjax share: XLA's FFI, the vector width, and row splitting over XLA's
// intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace kernels {

// Lanes of 32 bits in one vector register: 16 with AVX-512, else 8 (AVX2; other CPUs split it).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif

// Run f(begin, end, piece) for `pieces` pieces of [0, n) on the caller and up to `helpers` pool
// threads, which claim pieces as they start: a helper that starts late finds fewer (or none) left, and
// the caller never waits on a piece nobody has claimed (no deadlock when the pool is busy).
template <typename F>
inline void parallel_rows(ffi::ThreadPool& pool, int64_t n, int64_t pieces, int64_t helpers, F f) {
  if (pieces <= 1 || helpers <= 0) {
    int64_t piece = (n + pieces - 1) / pieces;
    for (int64_t i = 0; i < pieces; ++i) f(i * piece, std::min(n, (i + 1) * piece), i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  int64_t piece = (n + pieces - 1) / pieces;
  auto work = [state, piece, n, pieces, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < pieces;) {
      f(i * piece, std::min(n, (i + 1) * piece), i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < pieces) std::this_thread::yield();
}

struct Split {
  int64_t pieces, helpers;
};

// Pieces of at least `min_units` units of work (smaller ones cost more to schedule than they save),
// four per thread so that the threads even out; no helpers on a one-thread pool.
inline Split split(ffi::ThreadPool& pool, int64_t rows, int64_t units_per_row, int64_t min_units) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t by_size = std::max<int64_t>(1, rows * units_per_row / min_units);
  int64_t pieces = std::min({4 * threads, by_size, rows});
  return {pieces, std::min(threads, pieces) - 1};
}

}  // namespace kernels
