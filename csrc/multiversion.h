// EOTFAST_MULTIVERSION: one build serves every x86-64 CPU. GCC compiles a function so marked
// for AVX2+FMA (x86-64-v3) and for the baseline, and picks the version at load time; other
// compilers and architectures get the plain function. Used by the CPU kernels' hot loops
// (the Sinkhorn row sweep, the auction's row scan).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EOTFAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EOTFAST_MULTIVERSION
#endif
