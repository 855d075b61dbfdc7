// Types shared by the fused CPU loops of the trajectory engine (trajectory_kernels.h, compiled once per ISA) and
// their driver (trajectory.cpp).
#pragma once

#include <cstdint>

namespace haba_fast {
namespace traj_types {

struct BlockDims {
  int64_t B, C, H, W, G;
  bool norm;
  int act;  // 0 relu, 1 sigmoid, 2 leakyrelu (slope 0.01)
  bool avgpool;
  // Batch stride (elements) of z / zd (forward) and gz / gzd (backward): C*H*W when contiguous, 2*C*H*W when the
  // primal and the tangent are the two channel halves of one [B, 2C, H, W] tensor (one convolution call for both).
  int64_t io_bs;
};

template <typename T>
struct Params {
  const T* gam = nullptr;
  const T* bet = nullptr;
  const T* gamd = nullptr;
  const T* betd = nullptr;
};

constexpr double kEps = 1e-5;

// A zero-filled per-thread scratch array for the fused loops, in place of std::vector: trajectory_kernels.h is also
// compiled under `#pragma GCC target("arch=skylake-avx512")`, and GCC refuses to inline an always_inline function
// defined for the default target into such code ("inlining failed in call to 'always_inline' ...: target specific
// option mismatch", a hard error). libstdc++ 13 marks std::allocator's constructor and destructor always_inline, so
// a std::vector there failed to compile with GCC 13 (GCC 12's libstdc++ did not mark them). Plain inline members
// are inlined or called as the compiler sees fit.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : p_(n > 0 ? new T[n]() : nullptr) {}
  ~Scratch() { delete[] p_; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
};

}  // namespace traj_types
}  // namespace haba_fast
