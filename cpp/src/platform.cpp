#include "platform.hpp"

#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>
#else
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#endif

namespace kvfold {

size_t physical_memory() {
#if defined(_WIN32)
    MEMORYSTATUSEX status;
    status.dwLength = sizeof(status);
    return GlobalMemoryStatusEx(&status) ? static_cast<size_t>(status.ullTotalPhys) : SIZE_MAX;
#elif defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(size) : SIZE_MAX;
#else
    return SIZE_MAX;
#endif
}

#if !defined(_WIN32)
namespace {
size_t read_number(const char* path) {  // SIZE_MAX when missing or "max"
    std::ifstream f(path);
    unsigned long long x;
    return f >> x ? static_cast<size_t>(x) : SIZE_MAX;
}
}  // namespace
#endif

// Read once: the machine's memory and the cgroup's limit. Read at each call (a syscall): the rlimits,
// and the address space in use when an address-space limit is set.
MemoryLimit memory_limit() {
    static const MemoryLimit fixed = [] {
        MemoryLimit m;
        m.at_most(physical_memory(), "this machine's memory");
#if defined(__linux__)
        m.at_most(read_number("/sys/fs/cgroup/memory.max"), "the cgroup's memory limit (memory.max)");
        m.at_most(read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes"), "the cgroup's memory limit");
#endif
        return m;
    }();
    MemoryLimit limit = fixed;
#if !defined(_WIN32)
    rlimit r;
    if (getrlimit(RLIMIT_AS, &r) == 0 && r.rlim_cur != RLIM_INFINITY) {
        size_t mapped = 0;  // the address space in use now (Linux says; elsewhere 0)
        std::ifstream statm("/proc/self/statm");
        unsigned long long pages;
        const long page = sysconf(_SC_PAGESIZE);
        if (statm >> pages && page > 0) mapped = static_cast<size_t>(pages) * static_cast<size_t>(page);
        limit.at_most(r.rlim_cur > mapped ? static_cast<size_t>(r.rlim_cur - mapped) : 0,
                      "the address-space limit (RLIMIT_AS) less what is mapped");
    }
#if defined(RLIMIT_DATA)
    if (getrlimit(RLIMIT_DATA, &r) == 0 && r.rlim_cur != RLIM_INFINITY)
        limit.at_most(static_cast<size_t>(r.rlim_cur), "the data-segment limit (RLIMIT_DATA)");
#endif
#endif
    return limit;
}

}  // namespace kvfold
