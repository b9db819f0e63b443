// One call at a time per cache, and no silent hang when a call comes back into a busy cache.
//
// A Custom rule runs the user's function while its cache is locked. If that function calls the
// same cache, waiting would never end; if it calls another cache whose own fold is calling back
// into the first one, two threads would wait for each other forever. CacheMutex refuses both with
// RuntimeError: it knows which thread holds each cache, and a thread about to wait follows the
// chain "cache -> its holder -> the cache that holder waits for -> ..." and refuses to wait when
// the chain comes back to itself.
#pragma once

#include <atomic>
#include <mutex>
#include <thread>

namespace kvfold {

class CacheMutex {
   public:
    void lock();  // throws RuntimeError on re-entry or a wait that would never end
    void unlock();

   private:
    friend struct WaitGraph;
    std::mutex mu_;
    std::atomic<std::thread::id> holder_{};
};

// std::lock_guard for CacheMutex (a named type so call sites read alike).
using CacheLock = std::lock_guard<CacheMutex>;

}  // namespace kvfold
