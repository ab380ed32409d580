// A tiny fork-join over [0, n) shared by the C++ CPU operators, on threads kept for the process's life.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// Threads worth using for `work` units when below `threshold` handing work over costs more than it saves.
inline int ThreadsFor(double work, double threshold) { return work < threshold ? 1 : ConfiguredThreads(); }

inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// ConfiguredThreads() - 1 helper threads, started on first use and never stopped. Between jobs a helper
// polls for kSpin (a decode step calls an operator every few tens of microseconds: waking a sleeping
// thread would cost about as much as the work it takes), then sleeps on a condition variable. It polls
// with sched_yield, not a busy loop: on a machine shared with other processes a busy helper would take
// CPU time from its own process's calling thread (measured: MoE decoding at half speed under load ~4).
class HelperPool {
 public:
  static constexpr std::chrono::microseconds kSpin{300};

  // The pool of this process (a forked child gets its own: the parent's threads do not exist there).
  static HelperPool &Get() {
    static std::mutex lock;
    static HelperPool *pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> guard(lock);
    if (pool == nullptr || owner != getpid()) {
      pool = new HelperPool(ConfiguredThreads() - 1);  // never deleted: helpers run until the process exits
      owner = getpid();
    }
    return *pool;
  }

  // job() on the calling thread and on up to `helpers` pool threads; returns when all have returned,
  // rethrowing an exception of any. A helper that has not started when the caller's job() returns (the
  // OS gave its core to another process) is not waited for. False (job not run) when the pool is
  // already running a job, e.g. a nested call.
  bool Run(int helpers, const std::function<void()> &job) {
    helpers = std::min(helpers, threads_);
    if (helpers <= 0 || busy_.exchange(true)) return false;
    job_ = &job;
    error_ = nullptr;
    finished_.store(0);
    slots_.store(helpers);
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> guard(mutex_);  // a helper between its check and its wait holds it
      wake_.notify_all();
    }
    std::exception_ptr caller_error;
    try {
      job();
    } catch (...) {
      caller_error = std::current_exception();
    }
    const int started = helpers - std::max(0, slots_.exchange(0));
    for (int i = 0; finished_.load() < started; ++i) {  // a helper the OS preempted mid-chunk may share our core
      if (i < 256) CpuRelax(); else std::this_thread::yield();
    }
    busy_.store(false);
    if (caller_error) std::rethrow_exception(caller_error);
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  explicit HelperPool(int threads) : threads_(std::max(0, threads)) {
    for (int i = 0; i < threads_; ++i) std::thread(&HelperPool::Loop, this).detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      seen = WaitForJob(seen);
      if (slots_.fetch_sub(1) <= 0) continue;  // the job's slots are taken, or the caller has finished it
      try {
        (*job_)();
      } catch (...) {
        std::lock_guard<std::mutex> guard(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      finished_.fetch_add(1);
    }
  }

  // The generation of the next job after `seen`: polling for kSpin, then asleep.
  uint64_t WaitForJob(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      const uint64_t now = generation_.load();
      if (now != seen) return now;
      if (i % 16 == 15 && std::chrono::steady_clock::now() > until) break;
      std::this_thread::yield();
    }
    std::unique_lock<std::mutex> guard(mutex_);
    sleeping_.fetch_add(1);
    wake_.wait(guard, [&] { return generation_.load() != seen; });
    sleeping_.fetch_sub(1);
    return generation_.load();
  }

  const int threads_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> slots_{0}, finished_{0}, sleeping_{0};
  const std::function<void()> *job_ = nullptr;
  std::exception_ptr error_;
  std::mutex mutex_;
  std::condition_variable wake_;
};

// fn(begin, end) over chunks of [0, n) taken from a shared counter by up to `nthreads` threads (the
// caller and pool helpers): a thread that the OS deschedules (the machine may be shared) delays only
// its current chunk, not a fixed share of the work.
template <typename F>
void ParallelFor(int64_t n, int nthreads, int64_t chunk, F fn) {
  if (nthreads <= 1 || n < 2) {
    fn(0, n);
    return;
  }
  nthreads = (int)std::min<int64_t>(nthreads, n);
  chunk = std::max<int64_t>(1, chunk);
  std::atomic<int64_t> next(0);
  const std::function<void()> worker = [&] {
    for (;;) {
      int64_t b = next.fetch_add(chunk);
      if (b >= n) break;
      fn(b, std::min(n, b + chunk));
    }
  };
  if (!HelperPool::Get().Run(nthreads - 1, worker)) worker();
}

}  // namespace mindport
