// Run-time choice of the CPU instruction set. The library is compiled for AVX2 + FMA (setup.py);
// kernels that have an AVX-512 variant compile it with __attribute__((target("avx512f"))) and
// pick it when use_avx512() says so, so the library stays loadable on any AVX2 CPU.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TOKCOMP_X86_DISPATCH 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TOKCOMP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TOKCOMP_ALWAYS_INLINE inline
#endif

namespace tokcomp::cpu {

// Whether the AVX-512 kernels run: the CPU has AVX-512F and the environment does not set
// TOKCOMP_CPU_AVX512=0 (to test or compare the portable path). Checked once.
inline bool use_avx512() {
  static const bool enabled = [] {
#ifdef TOKCOMP_X86_DISPATCH
    const char* env = std::getenv("TOKCOMP_CPU_AVX512");
    const bool allowed = env == nullptr || std::string(env) != "0";
    return allowed && __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return enabled;
}

}  // namespace tokcomp::cpu
