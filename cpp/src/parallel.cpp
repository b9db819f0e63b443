// A small fork-join pool: workers wait for a job, claim pieces of it from a shared counter, and
// report back; the submitting thread works on the job too. Waiting spins briefly before sleeping,
// so back-to-back jobs (a decode loop) do not pay for a wake-up each time.
#include "parallel.hpp"

#if defined(__linux__)
#include <sched.h>  // sched_getaffinity
#endif
#if !defined(_WIN32)
#include <pthread.h>  // pthread_atfork
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KVFOLD_PAUSE() _mm_pause()
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define KVFOLD_PAUSE() __asm__ __volatile__("yield")
#else
#define KVFOLD_PAUSE() ((void)0)
#endif

// libstdc++ (GCC 12 on) has two std::condition_variable::wait: the new one lets a cancelled thread
// unwind, which the pool never does. Binding to the old one (GCC 4.4's) keeps the Python wheel
// loadable with the libstdc++ of GCC 11 (manylinux_2_34 rather than 2_35).
#if defined(__GLIBC__) && defined(__GLIBCXX__) && defined(__ELF__)
__asm__(
    ".symver _ZNSt18condition_variable4waitERSt11unique_lockISt5mutexE,"
    "_ZNSt18condition_variable4waitERSt11unique_lockISt5mutexE@GLIBCXX_3.4.11");
#endif

namespace kvfold {
namespace {

// Jobs with less work (a few hundred microseconds) run on the caller: a fork-join costs a wake-up
// and a wait for the slowest thread, a decode step this small is bound by memory bandwidth that a
// second core barely adds to, and a core busy with another process can stall it.
std::atomic<double> min_shared_flops{1e7};
constexpr int kSpins = 2000;  // pauses (tens of microseconds) before a waiting thread sleeps

int default_threads() {
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> num_threads{default_threads()};
thread_local bool in_job = false;  // a job's own parallel_for runs inline

class Pool {
   public:
    explicit Pool(int workers) {
        try {
            for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
        } catch (...) {  // the system refused a thread: stop the ones that started
            stop_all();
            throw;
        }
    }
    ~Pool() { stop_all(); }
    int workers() const { return static_cast<int>(threads_.size()); }

    void run(int64_t n, const RangeFn& fn) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            fn_ = &fn;
            n_ = n;
            pieces_ = std::min<int64_t>(n, 4 * (workers() + 1));  // a few per thread: balance on a busy machine
            next_.store(0, std::memory_order_relaxed);
            error_ = nullptr;
            pending_.store(workers(), std::memory_order_relaxed);
            generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
        }
        wake_.notify_all();
        take_pieces();
        for (int spin = 0; pending_.load(std::memory_order_acquire) > 0 && spin < kSpins; ++spin) KVFOLD_PAUSE();
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
        if (error_) std::rethrow_exception(error_);
    }

   private:
    void stop_all() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        wake_.notify_all();
        for (auto& t : threads_) t.join();
    }

    void take_pieces() {
        in_job = true;
        for (int64_t p; (p = next_.fetch_add(1, std::memory_order_relaxed)) < pieces_;) {
            try {
                (*fn_)(p * n_ / pieces_, (p + 1) * n_ / pieces_);
            } catch (...) {
                std::lock_guard<std::mutex> lock(error_mu_);
                if (!error_) error_ = std::current_exception();
            }
        }
        in_job = false;
    }

    void work() {
        uint64_t seen = 0;
        while (true) {
            for (int spin = 0; generation_.load(std::memory_order_acquire) == seen && spin < kSpins; ++spin)
                KVFOLD_PAUSE();
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_relaxed) != seen; });
                if (stop_) return;
                seen = generation_.load(std::memory_order_relaxed);
            }
            take_pieces();
            if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                std::lock_guard<std::mutex> lock(mu_);  // the submitter may be about to sleep
                done_.notify_one();
            }
        }
    }

    std::vector<std::thread> threads_;
    std::mutex mu_, error_mu_;
    std::condition_variable wake_, done_;
    bool stop_ = false;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};  // workers not yet done with the current job
    std::atomic<int64_t> next_{0};
    const RangeFn* fn_ = nullptr;
    int64_t n_ = 0, pieces_ = 0;
    std::exception_ptr error_;
};

// The pool is built on first use and rebuilt when the thread count changes. One job at a time: a
// second thread that submits while the pool is busy runs its job inline instead of waiting.
std::mutex pool_mu;
Pool* pool = nullptr;

struct PoolOwner {
    PoolOwner() {
#if !defined(_WIN32)
        // A forked child has the parent's pool object but none of its threads: forget it.
        pthread_atfork(nullptr, nullptr, [] { pool = nullptr; });
#endif
    }
    // At exit the pool is stopped unless a thread is using it (a daemon thread of an interpreter
    // shutting down): that thread may still run, so the pool then stays until the process ends.
    ~PoolOwner() {
        std::unique_lock<std::mutex> lock(pool_mu, std::try_to_lock);
        if (!lock.owns_lock()) return;
        delete pool;
        pool = nullptr;
    }
} pool_owner;

}  // namespace

void set_num_threads(int64_t n) {
    if (n < 1 || n > kMaxThreads)
        throw ValueError("num_threads: expected an integer in [1, " + std::to_string(kMaxThreads) + "], got " +
                         std::to_string(n));
    num_threads.store(static_cast<int>(n), std::memory_order_relaxed);
}

int get_num_threads() { return num_threads.load(std::memory_order_relaxed); }

double set_min_shared_flops(double flops) { return min_shared_flops.exchange(flops); }

namespace detail {

bool worth_sharing(int64_t n, double flops_per_item) {
    return n > 1 && num_threads.load(std::memory_order_relaxed) > 1 &&
           static_cast<double>(n) * flops_per_item >= min_shared_flops.load(std::memory_order_relaxed) && !in_job;
}

void run_shared(int64_t n, const RangeFn& fn) {
    std::unique_lock<std::mutex> lock(pool_mu, std::try_to_lock);
    if (!lock.owns_lock()) return fn(0, n);
    const int workers = num_threads.load(std::memory_order_relaxed) - 1;
    if (!pool || pool->workers() != workers) {
        delete pool;
        pool = nullptr;
        try {
            pool = new Pool(workers);
        } catch (const std::system_error&) {  // no threads to be had: the caller does the work
            return fn(0, n);
        }
    }
    pool->run(n, fn);
}

}  // namespace detail
}  // namespace kvfold
