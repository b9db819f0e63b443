// Picks the kernel table once: the best ISA this CPU and OS support, capped by KVFOLD_SIMD.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "kvfold/kvfold.hpp"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#elif defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace kvfold {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
#if defined(_MSC_VER) && !defined(__clang__)
uint64_t xgetbv0() { return _xgetbv(0); }

// Registers of cpuid leaf/subleaf; false when the CPU has no such leaf.
bool cpuid_count(unsigned leaf, unsigned sub, unsigned* a, unsigned* b, unsigned* c, unsigned* d) {
    int r[4];
    __cpuid(r, 0);
    if (static_cast<unsigned>(r[0]) < leaf) return false;
    __cpuidex(r, static_cast<int>(leaf), static_cast<int>(sub));
    *a = static_cast<unsigned>(r[0]), *b = static_cast<unsigned>(r[1]);
    *c = static_cast<unsigned>(r[2]), *d = static_cast<unsigned>(r[3]);
    return true;
}
#else
uint64_t xgetbv0() {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool cpuid_count(unsigned leaf, unsigned sub, unsigned* a, unsigned* b, unsigned* c, unsigned* d) {
    return __get_cpuid_count(leaf, sub, a, b, c, d);
}
#endif

bool cpu_has_avx2() {
    unsigned a, b, c, d;
    if (!cpuid_count(1, 0, &a, &b, &c, &d)) return false;
    bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
    if (!(osxsave && fma && f16c && avx)) return false;
    if ((xgetbv0() & 0x6) != 0x6) return false;  // OS saves XMM and YMM state
    if (!cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return b & (1u << 5);
}

bool cpu_has_avx512() {
    if (!cpu_has_avx2()) return false;
    unsigned a, b, c, d;
    if ((xgetbv0() & 0xe6) != 0xe6) return false;  // and opmask, ZMM_Hi256, Hi16_ZMM
    if (!cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
    return f && dq && bw && vl;
}

bool cpu_has_avx512bf16() {
    unsigned a, b, c, d;  // AVX512_BF16 is CPUID.(EAX=7, ECX=1):EAX[5]; the OS state is avx512's
    return cpu_has_avx512() && cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
}
#endif
}  // namespace

#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx512vnni() {
    unsigned a, b, c, d;  // CPUID.(EAX=7, ECX=0):ECX[11]
    return cpu_has_avx512() && cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 11));
}

bool cpu_is_intel() {
    unsigned a, b, c, d;  // leaf 0's vendor string, "GenuineIntel", in ebx, edx, ecx
    return cpuid_count(0, 0, &a, &b, &c, &d) && b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;
}
#endif

namespace {

// Tables this machine can run, worst first.
std::vector<const Kernels*> detect() {
    std::vector<const Kernels*> out{scalar_kernels()};
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx2()) out.push_back(avx2_kernels());
    if (cpu_has_avx512()) out.push_back(avx512_kernels());
    if (cpu_has_avx512bf16()) out.push_back(avx512bf16_kernels());
#elif defined(__aarch64__)
    out.push_back(neon_kernels());  // NEON is baseline on aarch64
#endif
    return out;
}

// Never destroyed, like every static here: a thread still inside kvfold at exit may pick a table.
const std::vector<const Kernels*>& runnable() {
    static const auto* tables = new std::vector<const Kernels*>(detect());
    return *tables;
}

// Every backend name, and this architecture's ladder of them, least capable first.
constexpr const char* kKnown[] = {"scalar", "avx2", "avx512", "avx512bf16", "neon"};
#if defined(__x86_64__) || defined(_M_X64)
constexpr const char* kLadder[] = {"scalar", "avx2", "avx512", "avx512bf16"};
#elif defined(__aarch64__)
constexpr const char* kLadder[] = {"scalar", "neon"};
#else
constexpr const char* kLadder[] = {"scalar"};
#endif

int rung(const std::string& name) {
    for (size_t i = 0; i < std::size(kLadder); ++i)
        if (kLadder[i] == name) return static_cast<int>(i);
    return -1;
}

// Tables the machine runs but that are picked only when named: avx512bf16 rounds the query of a
// bfloat16 cache to bfloat16 and measures no faster than avx512 (docs/performance.md).
bool opt_in(const std::string& name) { return name == "avx512bf16"; }

// The best table at or below the cap: a cap above what the machine runs means the best it runs,
// and no cap, or a name of another architecture, means the best that is not opt-in. Null for a
// name kvfold does not know.
const Kernels* pick(const std::string& cap) {
    const auto& tables = runnable();
    if (!cap.empty() && std::find(std::begin(kKnown), std::end(kKnown), cap) == std::end(kKnown)) return nullptr;
    const int limit = cap.empty() ? -1 : rung(cap);
    const Kernels* best = tables.front();
    for (auto* t : tables)
        if (limit < 0 ? !opt_in(t->name) : rung(t->name) <= limit) best = t;
    return best;
}

const Kernels* initial() {
    const char* env = std::getenv("KVFOLD_SIMD");
    const Kernels* t = pick(env ? env : "");
    // An unknown name in the environment leaves the best table; the Python package warns at import.
    return t ? t : pick("");
}

std::atomic<const Kernels*> active{initial()};

}  // namespace

const Kernels& kernels() { return *active.load(std::memory_order_relaxed); }

const char* simd_backend() { return kernels().name; }

std::vector<std::string> available_backends() {
    std::vector<std::string> names;
    for (auto* t : runnable()) names.push_back(t->name);
    return names;
}

std::vector<std::string> known_backends() { return {std::begin(kKnown), std::end(kKnown)}; }

void set_simd_backend(const std::string& name) {
    const Kernels* t = pick(name);
    if (!t) {
        std::string names;
        for (const char* n : kKnown) names += (names.empty() ? "" : ", ") + std::string(n);
        throw ValueError("simd backend: expected one of " + names + ", got '" + name + "'");
    }
    active.store(t);
}

}  // namespace kvfold
