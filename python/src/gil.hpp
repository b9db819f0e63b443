// The GIL around kvfold's C++ work: released while the core computes, taken back after; taken for
// a Custom rule's Python call. A thread still in kvfold when the interpreter shuts down (a daemon
// thread) must not take it back: CPython would end the thread by unwinding its C++ frames, which
// aborts the process. Such a thread waits instead, until the process exits.
#pragma once

#include <pybind11/pybind11.h>

#include <atomic>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif

namespace kvfold_py {

namespace py = pybind11;

// Threads inside a ReleaseGil section right now; the tests read it (holding the GIL) to see
// several caches compute at the same moment. A Custom rule's fold takes the GIL back for its
// Python call while still counted.
extern std::atomic<int> threads_without_gil;

// A guard that stays where it was made: neither copied nor assigned.
class Pinned {
   public:
    Pinned(const Pinned&) = delete;
    Pinned& operator=(const Pinned&) = delete;

   protected:
    Pinned() = default;
    ~Pinned() = default;
};

class ReleaseGil : Pinned {
   public:
    ReleaseGil();
    ~ReleaseGil();

   private:
    PyThreadState* state_;
};

[[noreturn]] void wait_for_exit();

// Runs f; if the interpreter shuts down meanwhile and ends this thread (glibc's CPython does so by a
// forced unwind when the thread takes the GIL), the thread waits for the exit here instead. A forced
// unwind may be caught as long as it is never resumed.
template <class F>
void or_wait_for_exit(F&& f) {
#if defined(__GLIBCXX__)
    try {
        f();
    } catch (abi::__forced_unwind&) {
        wait_for_exit();
    }
#else
    f();
#endif
}

// PyGILState_Ensure / Release, for a C++ thread calling into Python.
class AcquireGil : Pinned {
   public:
    AcquireGil();
    ~AcquireGil();

   private:
    PyGILState_STATE state_;
};

// Runs f with the GIL held (f calls Python), surviving the interpreter's shutdown as above.
template <class F>
void with_gil(F&& f) {
    AcquireGil gil;
    or_wait_for_exit(f);
}

}  // namespace kvfold_py
