// x86 AVX-512 kernels: not yet specialised, this machine's AVX-512 table is filled in later.
#include "kernels.hpp"
namespace kvfold {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace kvfold
