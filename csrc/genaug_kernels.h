// Per-sample building blocks of the fused generate / augment CPU kernels (csrc/genaug.cpp).
//
// Every function here works on ONE sample and touches only that sample's buffers, so the callers can run
// samples in parallel (at::parallel_for) without locks or atomics. Inner loops run over the contiguous width
// axis with `#pragma omp simd` (the buffers of one call never overlap, which the pragma asserts) so that GCC
// emits packed FMAs; reductions use `simd reduction` because -O3 alone does not reorder float sums.
//
// Layouts (row-major, one sample):
//   x  [cb, H, W]   basis              z, a, ga, gz [C, Ho, W] ("wide", see below)   Ho = H-K+1, Wo = W-K+1
//   ew [C, cb, K, K] encoder (Conv2d)   dw [C, C, K, K] decoder (ConvTranspose2d: [in, out, K, K])
//   y  [C, H, W]    generated sample
//
// This header is included twice by genaug.cpp, with GENAUG_NS = genaug (baseline ISA) and GENAUG_NS =
// genaug_avx2 under `#pragma GCC target("avx2,fma")` (no AVX-512 copy here, unlike trajectory_kernels.h; see
// cpu_isa.h); the driver picks the AVX2 copy at run time when the CPU has it (setup.py builds without -march, so
// the baseline copy is plain SSE2). Hence no include guard. The
// baseline copy is included first, so std:: templates are instantiated for the baseline ISA, which the AVX2
// copy may call safely.
#ifndef GENAUG_NS
#error "define GENAUG_NS before including genaug_kernels.h"
#endif

namespace haba_fast {
namespace GENAUG_NS {

using namespace genaug_types;

// Intermediate maps (z, a, ga, gz) use the "wide" layout [C, Ho, W]: rows keep the image's stride W, so every
// tap of every convolution is ONE contiguous loop over q = i*W + j, q < Lq = (Ho-1)*W + Wo, instead of Ho
// loops of Wo (= 30 at 32x32: a 3-iteration AVX loop plus a 6-iteration scalar tail). Columns j >= Wo of a
// wide row are don't-care for z/ga and are kept ZERO in a and gz, so scatters and dot products over the whole
// contiguous range stay exact. Measured on the 2-core dev VM (batch 500, 3x32x32, k=3, 1 thread, AVX2):
// generate forward 47 -> 22 ms, backward 119 -> 55 ms. (Keeping a block of outputs in registers across all
// taps was tried; it measured no faster on the shared VM, so the simpler per-tap loops stay.)
inline int64_t wide_len(const GenDims& d) { return (d.Ho - 1) * d.W + d.Wo; }

// sum_{q < n} p[q]
template <typename T>
inline T sum_of(const T* p, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t q = 0; q < n; ++q) s += p[q];
  return s;
}

// The three tap loops every convolution here is made of. src is image-shaped [nin, H, W]; dst/g one wide map
// row block [Ho, W] (q < Lq); w points at one output channel's [nin, K, K] weights (or its gradient).

// dst[q] = bias + sum_{c,u,v} w[c,u,v] * src[c, u*W+v + q]   (valid cross-correlation of nin channels)
template <typename T>
inline void correlate_wide(const GenDims& d, const T* src, int64_t nin, const T* w, T bias, T* dst) {
  const int64_t K = d.K, W = d.W, HW = d.H * d.W, Lq = wide_len(d);
#pragma omp simd
  for (int64_t q = 0; q < Lq; ++q) dst[q] = bias;
  for (int64_t c = 0; c < nin; ++c)
    for (int64_t u = 0; u < K; ++u)
      for (int64_t v = 0; v < K; ++v) {
        const T wv = w[(c * K + u) * K + v];
        const T* xs = src + c * HW + u * W + v;
#pragma omp simd
        for (int64_t q = 0; q < Lq; ++q) dst[q] += wv * xs[q];
      }
}

// gw[c,u,v] = <g, src[c] shifted by (u, v)> = sum_q g[q] * src[c, u*W+v + q]   (the weight gradient of the
// correlation above; g's padding columns are 0, so one long dot product per tap)
template <typename T>
inline void correlate_wide_weight_grad(const GenDims& d, const T* src, int64_t nin, const T* g, T* gw) {
  const int64_t K = d.K, W = d.W, HW = d.H * d.W, Lq = wide_len(d);
  for (int64_t c = 0; c < nin; ++c)
    for (int64_t u = 0; u < K; ++u)
      for (int64_t v = 0; v < K; ++v) {
        const T* xs = src + c * HW + u * W + v;
        T t = 0;
#pragma omp simd reduction(+ : t)
        for (int64_t q = 0; q < Lq; ++q) t += g[q] * xs[q];
        gw[(c * K + u) * K + v] = t;
      }
}

// dst[c, q] += sum_{o,u,v} w[o,c,u,v] * src[o, q - u*W - v]  for every c < nout   (stride-1 transposed
// convolution, scatter form; src is wide [C, Ho, W] with zero padding, w is [C, nout, K, K])
template <typename T>
inline void transposed_accumulate(const GenDims& d, const T* src, const T* w, int64_t nout, T* dst) {
  const int64_t K = d.K, W = d.W, HW = d.H * d.W, Lz = d.Ho * W, Lq = wide_len(d);
  for (int64_t c = 0; c < nout; ++c) {
    T* dc = dst + c * HW;
    for (int64_t o = 0; o < d.C; ++o) {
      const T* so = src + o * Lz;
      for (int64_t u = 0; u < K; ++u)
        for (int64_t v = 0; v < K; ++v) {
          const T wv = w[((o * nout + c) * K + u) * K + v];
          T* ds = dc + u * W + v;
#pragma omp simd
          for (int64_t q = 0; q < Lq; ++q) ds[q] += wv * so[q];
        }
    }
  }
}

// z[o, i*W+j] = eb[o] + sum_{c,u,v} ew[o,c,u,v] * x[c, (i+u)*W + j+v]   (valid cross-correlation, like Conv2d)
template <typename T>
inline void enc_forward(const GenDims& d, const T* x, const T* ew, const T* eb, T* z) {
  const int64_t KK = d.K * d.K, Lz = d.Ho * d.W;
  for (int64_t o = 0; o < d.C; ++o) correlate_wide(d, x, d.cb, ew + o * d.cb * KK, eb[o], z + o * Lz);
}

// a = scale * z + shift on the valid columns, 0 on the wide padding (scale/shift are compact [C, Ho, Wo]).
template <typename T>
inline void scale_shift_wide(const GenDims& d, const T* sc, const T* sh, const T* z, T* a) {
  const int64_t W = d.W, Wo = d.Wo;
  for (int64_t r = 0; r < d.C * d.Ho; ++r) {
    const T* zr = z + r * W;
    T* ar = a + r * W;
    const T* sr = sc + r * Wo;
    const T* hr = sh + r * Wo;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) ar[j] = sr[j] * zr[j] + hr[j];
    for (int64_t j = Wo; j < W; ++j) ar[j] = T(0);
  }
}

// y[p, I*W+J] = db[p] + sum_{o,u,v} dw[o,p,u,v] * a[o, (I-u)*W + J-v]   (stride-1 transposed conv, scatter form)
template <typename T>
inline void dec_forward(const GenDims& d, const T* a, const T* dw, const T* db, T* y) {
  const int64_t HW = d.H * d.W;
  for (int64_t p = 0; p < d.C; ++p) {
    T* yp = y + p * HW;
    const T b = db[p];
#pragma omp simd
    for (int64_t q = 0; q < HW; ++q) yp[q] = b;
  }
  transposed_accumulate(d, a, dw, d.C, y);
}

// One generated sample: y = dec(scale * enc(x) + shift). z, a: [C, Ho, W] scratch each.
template <typename T>
inline void generate_sample(const GenDims& d, const T* x, const T* ew, const T* eb, const T* sc, const T* sh,
                            const T* dw, const T* db, T* z, T* a, T* y) {
  enc_forward(d, x, ew, eb, z);
  scale_shift_wide(d, sc, sh, z, a);
  dec_forward(d, a, dw, db, y);
}

// Backward of generate_sample for one sample, given gy = dL/dy [C, H, W].
//   hall_row (or nullptr): packed per-sample gradient of the hallucinator's parameters (HallLayout), overwritten.
//   gx (or nullptr): dL/dx [cb, H, W], overwritten.
//   z, a, ga, gz: [C, Ho, W] scratch each (wide layout).
//
//   ga[o,i,j] = sum_{p,u,v} dw[o,p,u,v] gy[p,i+u,j+v]      gdw[o,p,u,v] = sum_{i,j} a[o,i,j] gy[p,i+u,j+v]
//   gscale = ga * z, gshift = ga, gz = ga * scale          gdb[p] = sum gy[p]
//   gew[o,c,u,v] = sum_{i,j} gz[o,i,j] x[c,i+u,j+v]        geb[o] = sum gz[o]
//   gx[c,I,J] = sum_{o,u,v} ew[o,c,u,v] gz[o,I-u,J-v]
template <typename T>
inline void generate_sample_backward(const GenDims& d, const T* x, const T* ew, const T* eb, const T* sc,
                                     const T* sh, const T* dw, const T* gy, T* z, T* a, T* ga, T* gz, T* hall_row,
                                     T* gx) {
  const int64_t KK = d.K * d.K, Wo = d.Wo, Ho = d.Ho, W = d.W, C = d.C, HW = d.H * d.W;
  const int64_t Lz = Ho * W, Lq = wide_len(d);
  const HallLayout L(d);
  // Recompute the encoder output instead of saving it: the op stays memory-light and z is cache-hot here.
  enc_forward(d, x, ew, eb, z);
  if (hall_row) scale_shift_wide(d, sc, sh, z, a);

  // ga[o] = valid correlation of gy with dw[o, :]
  for (int64_t o = 0; o < C; ++o) correlate_wide(d, gy, C, dw + o * C * KK, T(0), ga + o * Lz);
  // gz = ga * scale on valid columns, 0 on the padding; gscale / gshift rows (compact) when wanted.
  T* gsc = hall_row ? hall_row + L.scale : nullptr;
  T* gsh = hall_row ? hall_row + L.shift : nullptr;
  for (int64_t r = 0; r < C * Ho; ++r) {
    const T* gar = ga + r * W;
    const T* zr = z + r * W;
    const T* sr = sc + r * Wo;
    T* gzr = gz + r * W;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) gzr[j] = gar[j] * sr[j];
    for (int64_t j = Wo; j < W; ++j) gzr[j] = T(0);
    if (hall_row) {
      T* g1 = gsc + r * Wo;
      T* g2 = gsh + r * Wo;
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j) {
        g1[j] = gar[j] * zr[j];
        g2[j] = gar[j];
      }
    }
  }
  if (hall_row) {
    T* gdb = hall_row + L.db;
    for (int64_t p = 0; p < C; ++p) gdb[p] = sum_of(gy + p * HW, HW);
    // gdw[o,p,u,v] = <a[o], gy[p] shifted by (u, v)>: a's padding is 0, so one long dot product per tap.
    T* gdw = hall_row + L.dw;
    for (int64_t o = 0; o < C; ++o) correlate_wide_weight_grad(d, gy, C, a + o * Lz, gdw + o * C * KK);
    T* geb = hall_row + L.eb;
    T* gew = hall_row + L.ew;
    for (int64_t o = 0; o < C; ++o) {
      const T* go = gz + o * Lz;
      geb[o] = sum_of(go, Lq);
      correlate_wide_weight_grad(d, x, d.cb, go, gew + o * d.cb * KK);
    }
  }
  if (gx) {
    // gx[c] = sum_o full convolution of gz[o] with ew[o, c] (scatter form; gz's padding is 0)
    for (int64_t q = 0; q < d.cb * HW; ++q) gx[q] = T(0);
    transposed_accumulate(d, gz, ew, d.cb, gx);
  }
}

// Sampling taps of the affine map for every output pixel: 4 source offsets and weights (0 where outside).
template <typename T>
inline void affine_taps(const AugDims& d, const T* fp, int64_t* idx, T* wt) {
  const int64_t H = d.H, W = d.W;
  // Normalized base grid as affine_grid(align_corners=True) makes it: -1 .. 1, and 0 for a size-1 axis.
  const T sx = W > 1 ? T(2) / T(W - 1) : T(0), sy = H > 1 ? T(2) / T(H - 1) : T(0);
  const T ox = W > 1 ? T(-1) : T(0), oy = H > 1 ? T(-1) : T(0);
  for (int64_t i = 0; i < H; ++i) {
    const T yn = oy + sy * T(i);
    for (int64_t j = 0; j < W; ++j) {
      const T xn = ox + sx * T(j);
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

}  // namespace GENAUG_NS
}  // namespace haba_fast
