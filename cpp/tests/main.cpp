#include <cstdio>

#include "check.hpp"
#include "kvfold/kvfold.hpp"

int main() {
    std::printf("kvfold %s native tests, kernels: ", kvfold::version());
    for (const auto& b : kvfold::available_backends()) std::printf("%s ", b.c_str());
    std::printf("\n");
    for (const auto& backend : kvfold::available_backends()) {
        kvfold::set_simd_backend(backend);
        for (const auto& t : check::registry()) {
            int before = check::failures();
            t.fn();
            std::printf("%s %-40s [%s]\n", check::failures() == before ? "ok  " : "FAIL", t.name, backend.c_str());
        }
    }
    std::printf("%d failure(s)\n", check::failures());
    return check::failures() ? 1 : 0;
}
