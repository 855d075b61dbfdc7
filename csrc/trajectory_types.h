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

}  // namespace traj_types
}  // namespace haba_fast
