#include "kernels/cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common/whole_number.h"

namespace sp::kernels::cpu {
namespace {

// One parallel_for call: chunks are claimed through an atomic counter by any participating
// thread; the caller waits until every chunk has finished.
struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable finished;
  std::exception_ptr error;  // the first exception thrown by a chunk, rethrown to the caller

  // Runs chunks until none is left; returns after the last chunk this thread claimed.
  void work() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
      const int64_t b = i * chunk, e = std::min(n, b + chunk);
      try {
        (*fn)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lk(mu);
        finished.notify_all();
      }
    }
  }
};

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return threads_; }

  void run(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      jobs_.push_back(job);
    }
    cv_.notify_all();
    job->work();
    std::unique_lock<std::mutex> lk(job->mu);
    job->finished.wait(lk, [&] { return job->done.load() == job->chunks; });
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void loop() {
    in_pool_thread = true;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = jobs_.front();
        // A job whose chunks are all claimed leaves the queue; its claimers finish it.
        if (job->next.load() >= job->chunks) {
          jobs_.pop_front();
          continue;
        }
      }
      job->work();
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> jobs_;
  bool stop_ = false;

 public:
  static thread_local bool in_pool_thread;
};

thread_local bool Pool::in_pool_thread = false;
thread_local bool in_parallel_region = false;

int configured_threads() {
  const int v = parse_num_threads(std::getenv("STALEPROP_NUM_THREADS"));
  return v > 0 ? v : int(std::max(1u, std::thread::hardware_concurrency()));
}

Pool& pool() {
  static Pool p(configured_threads());
  return p;
}

}  // namespace

int num_threads() { return pool().size(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = pool().size();
  // Nested calls (from a pool worker or inside another parallel_for) run inline: the outer
  // level already occupies the cores, and inline execution cannot deadlock.
  if (threads == 1 || n <= grain || Pool::in_pool_thread || in_parallel_region) {
    fn(0, n);
    return;
  }
  // A few chunks per thread balance uneven work without making chunks tiny.
  const int64_t target = int64_t(threads) * 4;
  const int64_t chunk = std::max(grain, (n + target - 1) / target);
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->chunk = chunk;
  job->chunks = (n + chunk - 1) / chunk;
  struct RegionGuard {
    RegionGuard() { in_parallel_region = true; }
    ~RegionGuard() { in_parallel_region = false; }
  } guard;
  pool().run(job);
}

int parse_num_threads(const char* text) {
  if (!text || !*text) return 0;
  return int(parse_whole_number("STALEPROP_NUM_THREADS", "threads", text, 1, kMaxThreads));
}

}  // namespace sp::kernels::cpu
