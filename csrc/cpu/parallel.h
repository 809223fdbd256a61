// A minimal fork-join parallel loop over [0, n) for the CPU kernels and codecs.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace jax_moe {

// Threads the CPU code uses: JAX_MOE_NUM_THREADS if set (>= 1), else the hardware's count.
inline int cpu_threads() {
  if (const char* s = std::getenv("JAX_MOE_NUM_THREADS")) {
    const int v = std::atoi(s);
    if (v >= 1) return v;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min(hw, 256u));
}

// Run fn(begin, end) over contiguous chunks of [0, n), each at least `grain` long, on up to
// cpu_threads() threads (the calling thread takes the first chunk). Deterministic results are
// the caller's job: each index must be processed independently of the chunking.
template <class Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t chunks = std::min<int64_t>(cpu_threads(), max_chunks);
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(chunks - 1));
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) workers.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(n, step));
  for (auto& w : workers) w.join();
}

// Call body(i, local) for every i in [0, n), handing out items one at a time so that uneven
// items balance; each thread owns one default-constructed `Local` for its scratch space.
template <class Local, class Body>
void parallel_dynamic(int64_t n, Body&& body) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(cpu_threads(), n);
  std::atomic<int64_t> next{0};
  auto run = [&] {
    Local local;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i, local);
  };
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < threads; ++t) workers.emplace_back(run);
  run();
  for (auto& w : workers) w.join();
}

}  // namespace jax_moe
