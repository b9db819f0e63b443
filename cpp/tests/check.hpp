// A minimal test harness: no dependencies, so the tests also run cross-compiled under qemu.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace check {

struct Test {
    const char* name;
    std::function<void()> fn;
};
inline std::vector<Test>& registry() {
    static std::vector<Test> tests;
    return tests;
}
inline int& failures() {
    static int n = 0;
    return n;
}
struct Register {
    Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void fail(const char* file, int line, const std::string& what) {
    std::printf("  FAIL %s:%d: %s\n", file, line, what.c_str());
    ++failures();
}

}  // namespace check

#define TEST(name)                                       \
    static void name();                                  \
    static check::Register register_##name(#name, name); \
    static void name()

#define CHECK(cond)                                          \
    do {                                                     \
        if (!(cond)) check::fail(__FILE__, __LINE__, #cond); \
    } while (0)

// CHECK, and the test ends at once when cond fails (what follows needs it).
#define REQUIRE(cond)                               \
    do {                                            \
        if (!(cond)) {                              \
            check::fail(__FILE__, __LINE__, #cond); \
            return;                                 \
        }                                           \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                              \
    do {                                                                                                   \
        double a_ = (a), b_ = (b);                                                                         \
        if (!(std::fabs(a_ - b_) <= (tol) * (1.0 + std::fabs(b_))))                                        \
            check::fail(__FILE__, __LINE__,                                                                \
                        std::string(#a " ~ " #b ": ") + std::to_string(a_) + " vs " + std::to_string(b_)); \
    } while (0)

#define CHECK_THROWS(expr, type)                                                         \
    do {                                                                                 \
        bool thrown_ = false;                                                            \
        try {                                                                            \
            expr;                                                                        \
        } catch (const type&) {                                                          \
            thrown_ = true;                                                              \
        }                                                                                \
        if (!thrown_) check::fail(__FILE__, __LINE__, "expected " #type " from " #expr); \
    } while (0)
