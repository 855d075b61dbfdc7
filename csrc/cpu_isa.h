// Run-time choice between the copies of the fused CPU loops, the one place that says which copies exist:
// genaug_kernels.h is compiled twice (the build's baseline ISA, and AVX2+FMA under `#pragma GCC target`),
// trajectory_kernels.h three times (baseline, AVX2+FMA, Skylake-AVX512). A portable binary (setup.py builds without
// -march; x86-64's baseline ISA is SSE2) then still uses the CPU's full vector width.
// Measured on the 2-core CI machine (Skylake-AVX512 Xeon), ConvNet-128, batch 100, the engine's fused norm/act/pool
// loops alone: the AVX-512 copy 2.2x (backward sweep) and 3.4x (forward sweep) faster than the baseline copy, the
// AVX2 copy only ~1.05x, hence the third copy. The whole trajectory_match op (its convolutions run in ATen, the same
// for every copy) gains less: 2 steps of batch 50, 1 thread, busy 2-core VM, best of 3: forward 1.16 / 1.20 / 0.90 s
// and backward 3.11 / 3.39 / 2.80 s for baseline / AVX2 / AVX-512 (HABA_FAST_CPU_ISA caps the choice).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(HABA_FAST_NO_ISA_COPIES)
// the AVX2 / AVX-512 copies (GCC or clang on x86; HABA_FAST_ISA_COPIES=0 at build time, setup.py, defines
// HABA_FAST_NO_ISA_COPIES and leaves them out)
#define HABA_FAST_HAVE_ISA_COPIES 1
#endif

namespace haba_fast {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best copy this CPU runs, capped by HABA_FAST_CPU_ISA=baseline|avx2|avx512 (tests compare the copies).
inline CpuIsa kernel_isa() {
#ifdef HABA_FAST_HAVE_ISA_COPIES
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
