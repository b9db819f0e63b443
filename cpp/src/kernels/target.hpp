// How each compiler spells what the kernel files ask of it (GCC, Clang and Apple Clang, MSVC).
// Included by the kernel files before their target region.
#pragma once

// Inlining the kernels' speed depends on, where the compiler's own choice varies.
#if defined(_MSC_VER) && !defined(__clang__)
#define KVFOLD_ALWAYS_INLINE __forceinline
#else
#define KVFOLD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif
