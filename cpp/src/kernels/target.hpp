// How each compiler spells what the kernel files ask of it (GCC, Clang and Apple Clang, MSVC).
// Included by the kernel files before their target region.
#pragma once

#define KVFOLD_PRAGMA(text) _Pragma(#text)

// A target region: functions defined between KVFOLD_TARGET_BEGIN("avx2,fma") and
// KVFOLD_TARGET_END are compiled for those instruction sets, the rest of the build for the
// baseline. GCC takes a target pragma, Clang an attribute pushed onto every function of the
// region. MSVC needs neither: its intrinsics compile anywhere, without /arch, so there nothing but
// the dispatch's CPU check keeps a kernel off a CPU without its instructions, as on the others.
#if defined(__clang__)
#define KVFOLD_TARGET_BEGIN(isa) KVFOLD_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define KVFOLD_TARGET_END KVFOLD_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define KVFOLD_TARGET_BEGIN(isa) KVFOLD_PRAGMA(GCC push_options) KVFOLD_PRAGMA(GCC target(isa))
#define KVFOLD_TARGET_END KVFOLD_PRAGMA(GCC pop_options)
#else
#define KVFOLD_TARGET_BEGIN(isa)
#define KVFOLD_TARGET_END
#endif

// Unroll the next loop n times (its trip count is a template argument: the registers it indexes
// then stay registers).
#if defined(__clang__) || defined(__GNUC__)
#define KVFOLD_UNROLL(n) KVFOLD_PRAGMA(GCC unroll n)
#else
#define KVFOLD_UNROLL(n)
#endif

// Inlining the kernels' speed depends on, where the compiler's own choice varies.
#if defined(_MSC_VER) && !defined(__clang__)
#define KVFOLD_ALWAYS_INLINE __forceinline
#else
#define KVFOLD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif
