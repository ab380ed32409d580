// A tiny fork-join over [0, n) shared by the C++ CPU operators.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace mindport {

// MINDPORT_OP_THREADS, else the hardware's thread count (1..64).
inline int ConfiguredThreads() {
  static const int configured = [] {
    const char *env = std::getenv("MINDPORT_OP_THREADS");
    int n = env ? std::atoi(env) : 0;
    if (n <= 0) n = (int)std::thread::hardware_concurrency();
    return std::max(1, std::min(n, 64));
  }();
  return configured;
}

// Threads worth starting for `work` units when below `threshold` starting them costs more than it saves.
inline int ThreadsFor(double work, double threshold) { return work < threshold ? 1 : ConfiguredThreads(); }

// fn(begin, end) over chunks of [0, n) taken from a shared counter: a thread that the OS deschedules
// (the machine may be shared) delays only its current chunk, not a fixed share of the work.
template <typename F>
void ParallelFor(int64_t n, int nthreads, int64_t chunk, F fn) {
  if (nthreads <= 1 || n < 2) {
    fn(0, n);
    return;
  }
  nthreads = (int)std::min<int64_t>(nthreads, n);
  chunk = std::max<int64_t>(1, chunk);
  std::atomic<int64_t> next(0);
  auto worker = [&] {
    for (;;) {
      int64_t b = next.fetch_add(chunk);
      if (b >= n) break;
      fn(b, std::min(n, b + chunk));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int i = 1; i < nthreads; ++i) pool.emplace_back(worker);
  worker();
  for (auto &t : pool) t.join();
}

}  // namespace mindport
