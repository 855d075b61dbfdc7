// Per-sample building blocks of the fused generate / augment CPU kernels (csrc/genaug.cpp).
//
// Every function here works on ONE sample and touches only that sample's buffers, so the callers can run
// samples in parallel (at::parallel_for) without locks or atomics. Inner loops run over the contiguous width
// axis with `#pragma omp simd` (the buffers of one call never overlap, which the pragma asserts) so that GCC
// emits packed FMAs; reductions use `simd reduction` because -O3 alone does not reorder float sums.
//
// Layouts (row-major, one sample):
//   x  [cb, H, W]   basis              z, a, ga, gz [C, Ho, Wo]   Ho = H-K+1, Wo = W-K+1
//   ew [C, cb, K, K] encoder (Conv2d)   dw [C, C, K, K] decoder (ConvTranspose2d: [in, out, K, K])
//   y  [C, H, W]    generated sample
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace haba_fast {
namespace genaug {

struct GenDims {
  int64_t cb, C, H, W, K, Ho, Wo;
};

// z[o,i,j] = eb[o] + sum_{c,u,v} ew[o,c,u,v] * x[c,i+u,j+v]   (valid cross-correlation, like Conv2d)
template <typename T>
inline void enc_forward(const GenDims& d, const T* x, const T* ew, const T* eb, T* z) {
  const int64_t K = d.K, Wo = d.Wo;
  for (int64_t o = 0; o < d.C; ++o) {
    for (int64_t i = 0; i < d.Ho; ++i) {
      T* zr = z + (o * d.Ho + i) * Wo;
      const T b = eb[o];
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j) zr[j] = b;
      for (int64_t c = 0; c < d.cb; ++c) {
        for (int64_t u = 0; u < K; ++u) {
          const T* xr = x + (c * d.H + i + u) * d.W;
          const T* wr = ew + ((o * d.cb + c) * K + u) * K;
          for (int64_t v = 0; v < K; ++v) {
            const T w = wr[v];
            const T* xs = xr + v;
#pragma omp simd
            for (int64_t j = 0; j < Wo; ++j) zr[j] += w * xs[j];
          }
        }
      }
    }
  }
}

// y[p,I,J] = db[p] + sum_{o,u,v} dw[o,p,u,v] * a[o,I-u,J-v]   (stride-1 transposed conv, scatter form)
template <typename T>
inline void dec_forward(const GenDims& d, const T* a, const T* dw, const T* db, T* y) {
  const int64_t K = d.K, Wo = d.Wo, HW = d.H * d.W;
  for (int64_t p = 0; p < d.C; ++p) {
    T* yp = y + p * HW;
    const T b = db[p];
#pragma omp simd
    for (int64_t q = 0; q < HW; ++q) yp[q] = b;
    for (int64_t o = 0; o < d.C; ++o) {
      const T* wo = dw + (o * d.C + p) * K * K;
      for (int64_t i = 0; i < d.Ho; ++i) {
        const T* ar = a + (o * d.Ho + i) * Wo;
        for (int64_t u = 0; u < K; ++u) {
          T* yr = yp + (i + u) * d.W;
          for (int64_t v = 0; v < K; ++v) {
            const T w = wo[u * K + v];
            T* ys = yr + v;
#pragma omp simd
            for (int64_t j = 0; j < Wo; ++j) ys[j] += w * ar[j];
          }
        }
      }
    }
  }
}

// One generated sample: y = dec(scale * enc(x) + shift). zbuf: [C, Ho, Wo] scratch.
template <typename T>
inline void generate_sample(const GenDims& d, const T* x, const T* ew, const T* eb, const T* sc, const T* sh,
                            const T* dw, const T* db, T* zbuf, T* y) {
  enc_forward(d, x, ew, eb, zbuf);
  const int64_t P = d.C * d.Ho * d.Wo;
#pragma omp simd
  for (int64_t q = 0; q < P; ++q) zbuf[q] = sc[q] * zbuf[q] + sh[q];
  dec_forward(d, zbuf, dw, db, y);
}

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

// Backward of generate_sample for one sample, given gy = dL/dy [C, H, W].
//   hall_row (or nullptr): packed per-sample gradient of the hallucinator's parameters (HallLayout), overwritten.
//   gx (or nullptr): dL/dx [cb, H, W], overwritten.
//   z, a, gz: [C, Ho, Wo] scratch each.
//
//   ga[o,i,j] = sum_{p,u,v} dw[o,p,u,v] gy[p,i+u,j+v]      gdw[o,p,u,v] = sum_{i,j} a[o,i,j] gy[p,i+u,j+v]
//   gscale = ga * z, gshift = ga, gz = ga * scale          gdb[p] = sum gy[p]
//   gew[o,c,u,v] = sum_{i,j} gz[o,i,j] x[c,i+u,j+v]        geb[o] = sum gz[o]
//   gx[c,I,J] = sum_{o,u,v} ew[o,c,u,v] gz[o,I-u,J-v]
template <typename T>
inline void generate_sample_backward(const GenDims& d, const T* x, const T* ew, const T* eb, const T* sc,
                                     const T* sh, const T* dw, const T* gy, T* z, T* a, T* gz, T* hall_row, T* gx) {
  const int64_t K = d.K, Wo = d.Wo, Ho = d.Ho, H = d.H, W = d.W, C = d.C;
  const int64_t nz = C * Ho * Wo;
  const HallLayout L(d);
  // Recompute the encoder output instead of saving it: the op stays memory-light and z is cache-hot here.
  enc_forward(d, x, ew, eb, z);
#pragma omp simd
  for (int64_t q = 0; q < nz; ++q) a[q] = sc[q] * z[q] + sh[q];

  // ga -> written straight into gshift's slot when hallucinator grads are wanted (gshift == ga), else into gz.
  T* ga = hall_row ? hall_row + L.shift : gz;
  for (int64_t o = 0; o < C; ++o) {
    for (int64_t i = 0; i < Ho; ++i) {
      T* gr = ga + (o * Ho + i) * Wo;
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j) gr[j] = T(0);
      for (int64_t p = 0; p < C; ++p) {
        const T* wp = dw + (o * C + p) * K * K;
        for (int64_t u = 0; u < K; ++u) {
          const T* yr = gy + (p * H + i + u) * W;
          for (int64_t v = 0; v < K; ++v) {
            const T w = wp[u * K + v];
            const T* ys = yr + v;
#pragma omp simd
            for (int64_t j = 0; j < Wo; ++j) gr[j] += w * ys[j];
          }
        }
      }
    }
  }
  if (hall_row) {
    T* gdb = hall_row + L.db;
    for (int64_t p = 0; p < C; ++p) {
      const T* yp = gy + p * H * W;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t q = 0; q < H * W; ++q) s += yp[q];
      gdb[p] = s;
    }
    T* gdw = hall_row + L.dw;
    for (int64_t o = 0; o < C; ++o)
      for (int64_t p = 0; p < C; ++p)
        for (int64_t u = 0; u < K; ++u)
          for (int64_t v = 0; v < K; ++v) {
            T s = 0;
            for (int64_t i = 0; i < Ho; ++i) {
              const T* ar = a + (o * Ho + i) * Wo;
              const T* ys = gy + (p * H + i + u) * W + v;
#pragma omp simd reduction(+ : s)
              for (int64_t j = 0; j < Wo; ++j) s += ar[j] * ys[j];
            }
            gdw[((o * C + p) * K + u) * K + v] = s;
          }
    T* gsc = hall_row + L.scale;
#pragma omp simd
    for (int64_t q = 0; q < nz; ++q) {
      gsc[q] = ga[q] * z[q];
      gz[q] = ga[q] * sc[q];
    }
    T* geb = hall_row + L.eb;
    T* gew = hall_row + L.ew;
    for (int64_t o = 0; o < C; ++o) {
      const T* go = gz + o * Ho * Wo;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t q = 0; q < Ho * Wo; ++q) s += go[q];
      geb[o] = s;
      for (int64_t c = 0; c < d.cb; ++c)
        for (int64_t u = 0; u < K; ++u)
          for (int64_t v = 0; v < K; ++v) {
            T t = 0;
            for (int64_t i = 0; i < Ho; ++i) {
              const T* gr = go + i * Wo;
              const T* xs = x + (c * H + i + u) * W + v;
#pragma omp simd reduction(+ : t)
              for (int64_t j = 0; j < Wo; ++j) t += gr[j] * xs[j];
            }
            gew[((o * d.cb + c) * K + u) * K + v] = t;
          }
    }
  } else {
#pragma omp simd
    for (int64_t q = 0; q < nz; ++q) gz[q] *= sc[q];  // ga lives in gz: gz = ga * scale in place
  }
  if (gx) {
    std::fill(gx, gx + d.cb * H * W, T(0));
    for (int64_t c = 0; c < d.cb; ++c) {
      T* gc = gx + c * H * W;
      for (int64_t o = 0; o < C; ++o) {
        const T* wc = ew + (o * d.cb + c) * K * K;
        for (int64_t i = 0; i < Ho; ++i) {
          const T* gr = gz + (o * Ho + i) * Wo;
          for (int64_t u = 0; u < K; ++u) {
            T* xr = gc + (i + u) * W;
            for (int64_t v = 0; v < K; ++v) {
              const T w = wc[u * K + v];
              T* xs = xr + v;
#pragma omp simd
              for (int64_t j = 0; j < Wo; ++j) xs[j] += w * gr[j];
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Augmentation of one sample [C, H, W]. Every DSA family is linear in x, so the backward is the adjoint map.
// Families (codes shared with haba_fast/ops.py and kernels/augment.py):
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

// Sampling taps of the affine map for every output pixel: 4 source offsets and weights (0 where outside).
template <typename T>
inline void affine_taps(const AugDims& d, const T* fp, int64_t* idx, T* wt) {
  const int64_t H = d.H, W = d.W;
  const T sx = W > 1 ? T(2) / T(W - 1) : T(0), sy = H > 1 ? T(2) / T(H - 1) : T(0);
  for (int64_t i = 0; i < H; ++i) {
    const T yn = T(-1) + sy * T(i);
    for (int64_t j = 0; j < W; ++j) {
      const T xn = T(-1) + sx * T(j);
      const T gxv = fp[0] * xn + fp[1] * yn;
      const T gyv = fp[2] * xn + fp[3] * yn;
      const T ix = (gxv + T(1)) / T(2) * T(W - 1);
      const T iy = (gyv + T(1)) / T(2) * T(H - 1);
      const T fx = std::floor(ix), fy = std::floor(iy);
      const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
      const T wx1 = ix - fx, wy1 = iy - fy, wx0 = T(1) - wx1, wy0 = T(1) - wy1;
      const int64_t q = i * W + j;
      const int64_t xs[2] = {x0, x0 + 1}, ys[2] = {y0, y0 + 1};
      const T wxs[2] = {wx0, wx1}, wys[2] = {wy0, wy1};
      for (int t = 0; t < 4; ++t) {
        const int64_t xx = xs[t & 1], yy = ys[t >> 1];
        const bool ok = xx >= 0 && xx < W && yy >= 0 && yy < H;
        idx[t * H * W + q] = ok ? yy * W + xx : 0;
        wt[t * H * W + q] = ok ? wxs[t & 1] * wys[t >> 1] : T(0);
      }
    }
  }
}

// Forward (adjoint == false) or backward (adjoint == true: maps dL/dy to dL/dx) of one family on one sample.
// idx/wt: scratch of 4*H*W each (affine only).
template <typename T>
inline void augment_sample(const AugDims& d, int64_t family, const T* fp, const int64_t* ip, const T* x, T* y,
                           bool adjoint, int64_t* idx, T* wt) {
  const int64_t C = d.C, H = d.H, W = d.W, HW = H * W, N = C * HW;
  switch (family) {
    case kColor: {
      const T add = fp[0], sat = fp[1], con = fp[2];
      // mean over channels per pixel (into y's first plane area is unsafe when x == y: use wt as scratch)
      T* mc = wt;
      std::fill(mc, mc + HW, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = x + c * HW;
#pragma omp simd
        for (int64_t q = 0; q < HW; ++q) mc[q] += xc[q];
      }
      T tot = 0;
      const T invC = T(1) / T(C);
#pragma omp simd reduction(+ : tot)
      for (int64_t q = 0; q < HW; ++q) {
        mc[q] *= invC;
        tot += mc[q];
      }
      const T mean = tot / T(HW);
      if (!adjoint) {
        // y = con*sat*(x - mC) + con*(mC + add) + (1 - con)*(mean + add)
        const T k0 = con * sat, k1 = (T(1) - con) * (mean + add) + con * add;
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = x + c * HW;
          T* yc = y + c * HW;
#pragma omp simd
          for (int64_t q = 0; q < HW; ++q) yc[q] = k0 * (xc[q] - mc[q]) + con * mc[q] + k1;
        }
      } else {
        // gx = con*sat*g + con*(1 - sat)*mC(g) + (1 - con)*mean(g)
        const T k0 = con * sat, k1 = con * (T(1) - sat), k2 = (T(1) - con) * mean;
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = x + c * HW;
          T* yc = y + c * HW;
#pragma omp simd
          for (int64_t q = 0; q < HW; ++q) yc[q] = k0 * xc[q] + k1 * mc[q] + k2;
        }
      }
      break;
    }
    case kCrop: {
      const int64_t tx = adjoint ? -ip[0] : ip[0], ty = adjoint ? -ip[1] : ip[1];
      // columns j with 0 <= j+ty < W
      const int64_t j0 = std::max<int64_t>(0, -ty), j1 = std::min<int64_t>(W, W - ty);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < H; ++i) {
          T* yr = y + (c * H + i) * W;
          const int64_t si = i + tx;
          if (si < 0 || si >= H || j0 >= j1) {
            std::fill(yr, yr + W, T(0));
            continue;
          }
          const T* xr = x + (c * H + si) * W + ty;
          for (int64_t j = 0; j < j0; ++j) yr[j] = T(0);
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) yr[j] = xr[j];
          for (int64_t j = j1; j < W; ++j) yr[j] = T(0);
        }
      }
      break;
    }
    case kCutout: {
      const int64_t r0 = ip[0], r1 = ip[1], c0 = ip[2], c1 = ip[3];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < H; ++i) {
          const T* xr = x + (c * H + i) * W;
          T* yr = y + (c * H + i) * W;
          const bool row_cut = i >= r0 && i <= r1;
#pragma omp simd
          for (int64_t j = 0; j < W; ++j) yr[j] = (row_cut && j >= c0 && j <= c1) ? T(0) : xr[j];
        }
      break;
    }
    case kFlip: {
      if (ip[0] == 0) {
        std::copy(x, x + N, y);
        break;
      }
      for (int64_t r = 0; r < C * H; ++r) {
        const T* xr = x + r * W;
        T* yr = y + r * W;
        for (int64_t j = 0; j < W; ++j) yr[j] = xr[W - 1 - j];
      }
      break;
    }
    case kAffine: {
      affine_taps(d, fp, idx, wt);
      if (!adjoint) {
        for (int64_t c = 0; c < C; ++c) {
          const T* xc = x + c * HW;
          T* yc = y + c * HW;
          for (int64_t q = 0; q < HW; ++q)
            yc[q] = wt[q] * xc[idx[q]] + wt[HW + q] * xc[idx[HW + q]] + wt[2 * HW + q] * xc[idx[2 * HW + q]] +
                    wt[3 * HW + q] * xc[idx[3 * HW + q]];
        }
      } else {
        std::fill(y, y + N, T(0));
        for (int64_t c = 0; c < C; ++c) {
          const T* gc = x + c * HW;
          T* xc = y + c * HW;
          for (int t = 0; t < 4; ++t) {
            const int64_t* it = idx + t * HW;
            const T* wtt = wt + t * HW;
            for (int64_t q = 0; q < HW; ++q) xc[it[q]] += wtt[q] * gc[q];
          }
        }
      }
      break;
    }
    default:  // identity
      std::copy(x, x + N, y);
  }
}

}  // namespace genaug
}  // namespace haba_fast
