// Run-time choice between the copies of the fused CPU loops. genaug_kernels.h is compiled for the build's
// baseline ISA and under `#pragma GCC target("avx2,fma")`; trajectory_kernels.h also for Skylake-AVX512. A
// portable binary then still uses the CPU's full vector width (x86-64's baseline ISA is SSE2). Measured on the
// 2-core CI machine (Skylake-AVX512 Xeon), ConvNet-128, batch 100, the engine's fused norm/act/pool loops: the
// AVX-512 copy 2.2x (backward sweep) and 3.4x (forward sweep) faster than the baseline copy, the AVX2 copy only
// ~1.05x, hence the third copy.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HABA_FAST_ISA_COPIES 1  // the AVX2 / AVX-512 copies (GCC or clang on x86)
#endif

namespace haba_fast {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best copy this CPU runs, capped by HABA_FAST_CPU_ISA=baseline|avx2|avx512 (tests compare the copies).
inline CpuIsa kernel_isa() {
#ifdef HABA_FAST_ISA_COPIES
  static const CpuIsa cpu = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512cd"))
      return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
    return CpuIsa::kBaseline;
  }();
  const char* env = std::getenv("HABA_FAST_CPU_ISA");
  CpuIsa cap = CpuIsa::kAvx512;
  if (env && std::strcmp(env, "baseline") == 0) cap = CpuIsa::kBaseline;
  if (env && std::strcmp(env, "avx2") == 0) cap = CpuIsa::kAvx2;
  return static_cast<int>(cpu) < static_cast<int>(cap) ? cpu : cap;
#else
  return CpuIsa::kBaseline;
#endif
}

// genaug has a baseline and an AVX2+FMA copy only.
inline bool use_avx2_kernels() { return kernel_isa() != CpuIsa::kBaseline; }

}  // namespace haba_fast
