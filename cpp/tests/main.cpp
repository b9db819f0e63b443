#include <cstdio>
#include <cstring>

#include "check.hpp"
#include "kvfold/kvfold.hpp"

// kvfold_tests [WORD ...]: every test, or those whose name contains one of the words.
static bool selected(const char* name, int argc, char** argv) {
    for (int i = 1; i < argc; ++i)
        if (std::strstr(name, argv[i])) return true;
    return argc < 2;
}

int main(int argc, char** argv) {
    std::printf("kvfold %s native tests, kernels: ", kvfold::version());
    for (const auto& b : kvfold::available_backends()) std::printf("%s ", b.c_str());
    std::printf("\n");
    for (const auto& backend : kvfold::available_backends()) {
        kvfold::set_simd_backend(backend);
        for (const auto& t : check::registry()) {
            if (!selected(t.name, argc, argv)) continue;
            int before = check::failures();
            t.fn();
            std::printf("%s %-40s [%s]\n", check::failures() == before ? "ok  " : "FAIL", t.name, backend.c_str());
        }
    }
    std::printf("%d failure(s)\n", check::failures());
    return check::failures() ? 1 : 0;
}
