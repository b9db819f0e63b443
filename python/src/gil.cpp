#include "gil.hpp"

#include <chrono>
#include <thread>

namespace kvfold_py {

std::atomic<int> threads_without_gil{0};

namespace {

bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

// Runs take(), which takes the GIL: not at all once the interpreter is shutting down.
template <class F>
void take_gil(F take) {
    if (finalizing()) wait_for_exit();
    or_wait_for_exit(take);
}

}  // namespace

void wait_for_exit() {
    for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
}

ReleaseGil::ReleaseGil() : state_(PyEval_SaveThread()) { threads_without_gil.fetch_add(1, std::memory_order_relaxed); }

ReleaseGil::~ReleaseGil() {
    threads_without_gil.fetch_sub(1, std::memory_order_relaxed);
    take_gil([this] { PyEval_RestoreThread(state_); });
}

AcquireGil::AcquireGil() {
    take_gil([this] { state_ = PyGILState_Ensure(); });
}

AcquireGil::~AcquireGil() { PyGILState_Release(state_); }

}  // namespace kvfold_py
