// Types shared by the per-sample CPU kernels (genaug_kernels.h) and their driver (genaug.cpp).
#pragma once

#include <cstdint>

namespace haba_fast {
namespace genaug_types {

struct GenDims {
  int64_t cb, C, H, W, K, Ho, Wo;
};

// Offsets of one hallucinator's parameters inside a packed gradient row: ew | eb | scale | shift | dw | db.
struct HallLayout {
  int64_t ew, eb, scale, shift, dw, db, total;
  explicit HallLayout(const GenDims& d) {
    const int64_t nz = d.C * d.Ho * d.Wo;
    ew = 0;
    eb = ew + d.C * d.cb * d.K * d.K;
    scale = eb + d.C;
    shift = scale + nz;
    dw = shift + nz;
    db = dw + d.C * d.C * d.K * d.K;
    total = db + d.C;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Augmentation of one sample [C, H, W]. Every DSA family is linear in x, so the backward is the adjoint map.
// Kernel codes: haba_fast.aug_families.KernelCode holds the same numbers for Python (the Triton kernels and each
// family's `encode`; tests/test_aug_families.py checks they agree). Several families may share a code.
enum Family : int64_t { kIdentity = 0, kColor = 1, kCrop = 2, kCutout = 3, kFlip = 4, kAffine = 5 };
// Per-sample parameters: fp[4] (dtype of x), ip[4] (int64):
//   color : fp = (add, sat, con): y = con*(sat*(x - mC) + mC + add - m) + m, mC = channel mean per pixel,
//           m = mean(x) + add  (brightness, saturation, contrast composed; saturation keeps the global mean)
//   crop  : ip = (tx, ty): y[i,j] = x[i+tx, j+ty], 0 outside
//   cutout: ip = (r0, r1, c0, c1): y = 0 on rows [r0, r1] x cols [c0, c1] (inclusive, already clamped)
//   flip  : ip[0] != 0 flips the width axis
//   affine: fp = (t00, t01, t10, t11): bilinear sample at theta @ (xn, yn), zero padding, align_corners=True
struct AugDims {
  int64_t C, H, W;
};

}  // namespace genaug_types
}  // namespace haba_fast
