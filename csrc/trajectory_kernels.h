// Fused CPU loops of one ConvNet block (norm -> activation -> pooling) for the trajectory engine, carrying a primal
// and a tangent (directional derivative along the parameter direction lam) forward and back.
//
// Layout: conv output z [B, C, H, W] contiguous; a task is one (sample b, group g): channels
// [g*C/G, (g+1)*C/G), which are contiguous in memory (M = C/G*H*W values), so a task's data stays in cache across
// the passes below. norm == false: no normalization (G = C, each channel its own task).
//
// Forward, per group (mean/var biased, eps 1e-5):
//   xh = (z - mu) * rstd,  rstd = 1/sqrt(var + eps)
//   k  = rstd * mean(zd * xh)                          (tangent of log sigma)
//   xhd = (zd - mean(zd)) * rstd - xh * k              (tangent of xh)
//   n = xh * gam_c + bet_c,  nd = xhd * gam_c + xh * gamd_c + betd_c
//   r = act(n), rd = act'(n) nd;  out = avgpool2x2(r) (floor) or r; same for the tangent.
// Saved: xh, xhd (no norm: n, nd), rstd, k.
// Backward, per group, from ga/gad (w.r.t. the block output):
//   gr = avgpool^T(ga); gn = gr act'(n); gnd = grd act'(n) + gr act''(n) nd
//   parameter sums per (b, c): sum gn xh, sum gn, sum (gnd xh + gn xhd), sum gnd
//   gx = gn gam_c; gxd = gnd gam_c + gn gamd_c
//   gz  = rstd (gx - mean(gx) - xh mean(gx xh))
//   gzd = rstd (gxd - mean(gxd) - xhd mean(gx xh) - xh mean(gxd xh + gx xhd)) - k gz
// Sums accumulate per channel plane in T (SIMD lanes), group totals in double. Deterministic: every output element and partial sum has exactly one writer.
// Included three times by trajectory.cpp, with TRAJ_NS = traj (the build's baseline ISA), traj_avx2 (under
// `#pragma GCC target("avx2,fma")`) and traj_avx512 (Skylake-AVX512); trajectory.cpp picks the best copy the CPU
// runs (cpu_isa.h, which also records what each copy gains). Hence no include guard. The loops below vectorize
// with `omp simd`.
#ifndef TRAJ_NS
#error "define TRAJ_NS before including trajectory_kernels.h"
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "trajectory_types.h"

namespace haba_fast {
namespace TRAJ_NS {

using traj_types::BlockDims;
using traj_types::Params;

// Activation and its first two derivatives (compile-time choice so the loops below stay branch-free and vectorize).
// Branch-free (a compare converted to 0/1) so that the loops vectorize: a ternary here compiled to a branch and
// left the main loops scalar (perf annotate, ConvNet-128 batch 100).
template <int ACT, typename T>
inline T act_d1(T n) {
  const T pos = static_cast<T>(n > T(0));
  if (ACT == 0) return pos;
  if (ACT == 2) return T(0.01) + T(0.99) * pos;
  T s = T(1) / (T(1) + std::exp(-n));
  return s * (T(1) - s);
}

template <int ACT, typename T>
inline T act_val(T n) {
  if (ACT == 1) return T(1) / (T(1) + std::exp(-n));
  return n * act_d1<ACT, T>(n);
}

using traj_types::kEps;

template <typename T, bool TAN, bool NORM, int ACT, bool POOL>
void block_forward_impl(const BlockDims& d, const Params<T>& p, const T* z, const T* zd, T* xh, T* xhd,
                        T* rstd_out, T* k_out, T* out, T* outd) {
  const int64_t HW = d.H * d.W;
  const int64_t Cg = d.C / d.G;
  const int64_t M = Cg * HW;
  const int64_t Ho = POOL ? d.H / 2 : d.H, Wo = POOL ? d.W / 2 : d.W;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1));
  at::parallel_for(0, d.B * d.G, grain, [&](int64_t begin, int64_t end) {
    traj_types::Scratch<T> rbuf(HW), rdbuf(TAN ? HW : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.G, g = task % d.G;
      const int64_t base = (b * d.C + g * Cg) * HW;
      const int64_t iob = b * d.io_bs + g * Cg * HW;
      const T* zp = z + iob;
      const T* zdp = TAN ? zd + iob : nullptr;
      T* xp = xh + base;
      T* xdp = TAN ? xhd + base : nullptr;
      T trstd = T(1), tk = T(0), tmu = T(0), tmzd = T(0);
      if (NORM) {
        // Two passes (mean, then centred moments) per channel plane, in T with SIMD lanes; totals in double.
        double s = 0.0, sd = 0.0;
        for (int64_t cc = 0; cc < Cg; ++cc) {
          const T* zc = zp + cc * HW;
          T a = 0, ad = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t i = 0; i < HW; ++i) a += zc[i];
          s += a;
          if (TAN) {
            const T* zdc = zdp + cc * HW;
#pragma omp simd reduction(+ : ad)
            for (int64_t i = 0; i < HW; ++i) ad += zdc[i];
            sd += ad;
          }
        }
        const double mu = s / M;
        tmu = T(mu);
        tmzd = T(sd / M);
        double v = 0.0, cov = 0.0;
        for (int64_t cc = 0; cc < Cg; ++cc) {
          const T* zc = zp + cc * HW;
          T a = 0, ad = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t i = 0; i < HW; ++i) {
            const T c = zc[i] - tmu;
            a += c * c;
          }
          v += a;
          if (TAN) {
            const T* zdc = zdp + cc * HW;
#pragma omp simd reduction(+ : ad)
            for (int64_t i = 0; i < HW; ++i) ad += (zc[i] - tmu) * zdc[i];
            cov += ad;
          }
        }
        const double rstd = 1.0 / std::sqrt(v / M + kEps);
        trstd = T(rstd);
        tk = T(rstd * rstd * cov / M);
      }
      rstd_out[task] = trstd;
      k_out[task] = tk;
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const int64_t off = cc * HW;
        T gm = 1, bt = 0, gmd = 0, btd = 0;
        if (NORM) {
          gm = p.gam[c];
          bt = p.bet[c];
          if (TAN) {
            gmd = p.gamd[c];
            btd = p.betd[c];
          }
        }
        const T* zc = zp + off;
        const T* zdc = TAN ? zdp + off : nullptr;
        T* xc = xp + off;
        T* xdc = TAN ? xdp + off : nullptr;
        T* rb = rbuf.data();
        T* rdb = TAN ? rdbuf.data() : nullptr;
#pragma omp simd
        for (int64_t i = 0; i < HW; ++i) {
          T n, nd = T(0);
          if (NORM) {
            const T x = (zc[i] - tmu) * trstd;
            xc[i] = x;
            n = x * gm + bt;
            if (TAN) {
              const T xd = (zdc[i] - tmzd) * trstd - x * tk;
              xdc[i] = xd;
              nd = xd * gm + x * gmd + btd;
            }
          } else {
            n = zc[i];
            xc[i] = n;
            if (TAN) {
              nd = zdc[i];
              xdc[i] = nd;
            }
          }
          rb[i] = act_val<ACT, T>(n);
          if (TAN) rdb[i] = act_d1<ACT, T>(n) * nd;
        }
        T* op = out + (b * d.C + c) * Ho * Wo;
        T* odp = TAN ? outd + (b * d.C + c) * Ho * Wo : nullptr;
        if (POOL) {
          for (int64_t i = 0; i < Ho; ++i) {
            const T* r0 = rb + 2 * i * d.W;
            const T* r1 = r0 + d.W;
            T* o = op + i * Wo;
            for (int64_t j = 0; j < Wo; ++j) o[j] = T(0.25) * ((r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1]));
            if (TAN) {
              const T* q0 = rdb + 2 * i * d.W;
              const T* q1 = q0 + d.W;
              T* od = odp + i * Wo;
              for (int64_t j = 0; j < Wo; ++j)
                od[j] = T(0.25) * ((q0[2 * j] + q0[2 * j + 1]) + (q1[2 * j] + q1[2 * j + 1]));
            }
          }
        } else {
          std::copy(rb, rb + HW, op);
          if (TAN) std::copy(rdb, rdb + HW, odp);
        }
      }
    }
  });
}

// part: [4, B, C] partial sums (norm only): sum gn xh, sum gn, sum (gnd xh + gn xhd), sum gnd.
template <typename T, bool TAN, bool NORM, int ACT, bool POOL>
void block_backward_impl(const BlockDims& d, const Params<T>& p, const T* ga, const T* gad, const T* xh,
                         const T* xhd, const T* rstd_in, const T* k_in, T* gz, T* gzd, T* part) {
  const int64_t HW = d.H * d.W;
  const int64_t Cg = d.C / d.G;
  const int64_t M = Cg * HW;
  const int64_t Ho = POOL ? d.H / 2 : d.H, Wo = POOL ? d.W / 2 : d.W;
  const int64_t BC = d.B * d.C;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1));
  at::parallel_for(0, d.B * d.G, grain, [&](int64_t begin, int64_t end) {
    traj_types::Scratch<T> grbuf(POOL ? HW : 0), grdbuf(POOL && TAN ? HW : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.G, g = task % d.G;
      const int64_t base = (b * d.C + g * Cg) * HW;
      const T* xp = xh + base;
      const T* xdp = TAN ? xhd + base : nullptr;
      const int64_t iob = b * d.io_bs + g * Cg * HW;
      T* gzp = gz + iob;
      T* gzdp = TAN ? gzd + iob : nullptr;
      double A = 0, Bm = 0, Cs = 0, Dm = 0;
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const int64_t off = cc * HW;
        const T* gap = ga + (b * d.C + c) * Ho * Wo;
        const T* gadp = TAN ? gad + (b * d.C + c) * Ho * Wo : nullptr;
        const T* gr;
        const T* grd = nullptr;
        if (POOL) {
          // Upsample the pooled gradients (x 1/4); rows/columns cut off by the floor get 0.
          T* u = grbuf.data();
          T* ud = TAN ? grdbuf.data() : nullptr;
          for (int64_t i = 0; i < d.H; ++i) {
            T* ur = u + i * d.W;
            T* udr = TAN ? ud + i * d.W : nullptr;
            if (i < 2 * Ho) {
              const T* src = gap + (i / 2) * Wo;
              for (int64_t j = 0; j < Wo; ++j) ur[2 * j] = ur[2 * j + 1] = T(0.25) * src[j];
              if (TAN) {
                const T* srcd = gadp + (i / 2) * Wo;
                for (int64_t j = 0; j < Wo; ++j) udr[2 * j] = udr[2 * j + 1] = T(0.25) * srcd[j];
              }
              for (int64_t j = 2 * Wo; j < d.W; ++j) {
                ur[j] = T(0);
                if (TAN) udr[j] = T(0);
              }
            } else {
              for (int64_t j = 0; j < d.W; ++j) {
                ur[j] = T(0);
                if (TAN) udr[j] = T(0);
              }
            }
          }
          gr = u;
          grd = ud;
        } else {
          gr = gap;
          grd = gadp;
        }
        T gm = 1, bt = 0, gmd = 0, btd = 0;
        if (NORM) {
          gm = p.gam[c];
          bt = p.bet[c];
          if (TAN) {
            gmd = p.gamd[c];
            btd = p.betd[c];
          }
        }
        const T* xc = xp + off;
        const T* xdc = TAN ? xdp + off : nullptr;
        T* gzc = gzp + off;
        T* gzdc = TAN ? gzdp + off : nullptr;
        T s1 = 0, s2 = 0, s3 = 0, s4 = 0, a = 0, bm = 0, cs = 0, dm = 0;
#pragma omp simd reduction(+ : s1, s2, s3, s4, a, bm, cs, dm)
        for (int64_t i = 0; i < HW; ++i) {
          const T x = xc[i];
          const T xd = TAN ? xdc[i] : T(0);
          T n, nd = T(0);
          if (NORM) {
            n = x * gm + bt;
            if (TAN) nd = xd * gm + x * gmd + btd;
          } else {
            n = x;
            nd = xd;
          }
          const T d1 = act_d1<ACT, T>(n);
          const T gn = gr[i] * d1;
          T gnd = T(0);
          if (TAN) {
            gnd = grd[i] * d1;
            if (ACT == 1) {
              const T s = T(1) / (T(1) + std::exp(-n));
              gnd += gr[i] * d1 * (T(1) - T(2) * s) * nd;
            }
          }
          if (NORM) {
            s1 += gn * x;
            s2 += gn;
            const T gx = gn * gm;
            a += gx;
            bm += gx * x;
            gzc[i] = gx;
            if (TAN) {
              s3 += gnd * x + gn * xd;
              s4 += gnd;
              const T gxd = gnd * gm + gn * gmd;
              cs += gxd;
              dm += gxd * x + gx * xd;
              gzdc[i] = gxd;
            }
          } else {
            gzc[i] = gn;
            if (TAN) gzdc[i] = gnd;
          }
        }
        if (NORM) {
          A += a;
          Bm += bm;
          Cs += cs;
          Dm += dm;
          part[0 * BC + b * d.C + c] = s1;
          part[1 * BC + b * d.C + c] = s2;
          part[2 * BC + b * d.C + c] = s3;
          part[3 * BC + b * d.C + c] = s4;
        }
      }
      if (NORM) {
        const T rs = rstd_in[task], k = k_in[task];
        const T mg = T(A / M), m1 = T(Bm / M), mgd = T(Cs / M), m2 = T(Dm / M);
#pragma omp simd
        for (int64_t i = 0; i < M; ++i) {
          const T x = xp[i];
          const T gzv = rs * (gzp[i] - mg - x * m1);
          gzp[i] = gzv;
          if (TAN) gzdp[i] = rs * (gzdp[i] - mgd - xdp[i] * m1 - x * m2) - k * gzv;
        }
      }
    }
  });
}

// Runtime flags -> template instance.
template <typename T, bool TAN, bool NORM, bool POOL>
void fwd_act(const BlockDims& d, const Params<T>& p, const T* z, const T* zd, T* xh, T* xhd, T* rs, T* k, T* out,
             T* outd) {
  if (d.act == 0) block_forward_impl<T, TAN, NORM, 0, POOL>(d, p, z, zd, xh, xhd, rs, k, out, outd);
  else if (d.act == 1) block_forward_impl<T, TAN, NORM, 1, POOL>(d, p, z, zd, xh, xhd, rs, k, out, outd);
  else block_forward_impl<T, TAN, NORM, 2, POOL>(d, p, z, zd, xh, xhd, rs, k, out, outd);
}

template <typename T>
void block_forward(const BlockDims& d, const Params<T>& p, const T* z, const T* zd, T* xh, T* xhd, T* rs, T* k,
                   T* out, T* outd) {
  const bool tan = zd != nullptr;
#define HF_FWD(TAN, NORM, POOL) fwd_act<T, TAN, NORM, POOL>(d, p, z, zd, xh, xhd, rs, k, out, outd)
  if (tan) {
    if (d.norm) { if (d.avgpool) HF_FWD(true, true, true); else HF_FWD(true, true, false); }
    else { if (d.avgpool) HF_FWD(true, false, true); else HF_FWD(true, false, false); }
  } else {
    if (d.norm) { if (d.avgpool) HF_FWD(false, true, true); else HF_FWD(false, true, false); }
    else { if (d.avgpool) HF_FWD(false, false, true); else HF_FWD(false, false, false); }
  }
#undef HF_FWD
}

template <typename T, bool TAN, bool NORM, bool POOL>
void bwd_act(const BlockDims& d, const Params<T>& p, const T* ga, const T* gad, const T* xh, const T* xhd,
             const T* rs, const T* k, T* gz, T* gzd, T* part) {
  if (d.act == 0) block_backward_impl<T, TAN, NORM, 0, POOL>(d, p, ga, gad, xh, xhd, rs, k, gz, gzd, part);
  else if (d.act == 1) block_backward_impl<T, TAN, NORM, 1, POOL>(d, p, ga, gad, xh, xhd, rs, k, gz, gzd, part);
  else block_backward_impl<T, TAN, NORM, 2, POOL>(d, p, ga, gad, xh, xhd, rs, k, gz, gzd, part);
}

template <typename T>
void block_backward(const BlockDims& d, const Params<T>& p, const T* ga, const T* gad, const T* xh, const T* xhd,
                    const T* rs, const T* k, T* gz, T* gzd, T* part, bool /*want_param_tangent*/) {
  const bool tan = gad != nullptr;
#define HF_BWD(TAN, NORM, POOL) bwd_act<T, TAN, NORM, POOL>(d, p, ga, gad, xh, xhd, rs, k, gz, gzd, part)
  if (tan) {
    if (d.norm) { if (d.avgpool) HF_BWD(true, true, true); else HF_BWD(true, true, false); }
    else { if (d.avgpool) HF_BWD(true, false, true); else HF_BWD(true, false, false); }
  } else {
    if (d.norm) { if (d.avgpool) HF_BWD(false, true, true); else HF_BWD(false, true, false); }
    else { if (d.avgpool) HF_BWD(false, false, true); else HF_BWD(false, false, false); }
  }
#undef HF_BWD
}

}  // namespace TRAJ_NS
}  // namespace haba_fast
