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
// All sums accumulate in double. Deterministic: every output element and partial sum has exactly one writer.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace haba_fast {
namespace traj {

struct BlockDims {
  int64_t B, C, H, W, G;
  bool norm;
  int act;  // 0 relu, 1 sigmoid, 2 leakyrelu (slope 0.01)
  bool avgpool;
};

template <typename T>
struct Params {
  const T* gam = nullptr;
  const T* bet = nullptr;
  const T* gamd = nullptr;
  const T* betd = nullptr;
};

template <typename T>
inline void act_fwd(int act, T n, T& r, T& d1) {
  if (act == 0) {
    d1 = n > T(0) ? T(1) : T(0);
    r = n * d1;
  } else if (act == 2) {
    d1 = n > T(0) ? T(1) : T(0.01);
    r = n * d1;
  } else {
    T s = T(1) / (T(1) + std::exp(-n));
    r = s;
    d1 = s * (T(1) - s);
  }
}

constexpr double kEps = 1e-5;

template <typename T>
void block_forward(const BlockDims& d, const Params<T>& p, const T* z, const T* zd, T* xh, T* xhd, T* rstd_out,
                   T* k_out, T* out, T* outd) {
  const int64_t HW = d.H * d.W;
  const int64_t Cg = d.C / d.G;
  const int64_t M = Cg * HW;
  const int64_t Ho = d.avgpool ? d.H / 2 : d.H, Wo = d.avgpool ? d.W / 2 : d.W;
  const bool tan = zd != nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1));
  at::parallel_for(0, d.B * d.G, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> rbuf(HW), rdbuf(tan ? HW : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.G, g = task % d.G;
      const int64_t base = (b * d.C + g * Cg) * HW;
      const T* zp = z + base;
      const T* zdp = tan ? zd + base : nullptr;
      T* xp = xh + base;
      T* xdp = tan ? xhd + base : nullptr;
      double rstd = 1.0, k = 0.0, mu = 0.0, mzd = 0.0;
      if (d.norm) {
        double s = 0.0, sd = 0.0;
        for (int64_t i = 0; i < M; ++i) s += zp[i];
        mu = s / M;
        if (tan)
          for (int64_t i = 0; i < M; ++i) sd += zdp[i];
        mzd = sd / M;
        double v = 0.0, cov = 0.0;
        for (int64_t i = 0; i < M; ++i) {
          double c = zp[i] - mu;
          v += c * c;
        }
        if (tan)
          for (int64_t i = 0; i < M; ++i) cov += (zp[i] - mu) * zdp[i];
        rstd = 1.0 / std::sqrt(v / M + kEps);
        k = rstd * rstd * cov / M;
      }
      rstd_out[task] = T(rstd);
      k_out[task] = T(k);
      const T trstd = T(rstd), tk = T(k), tmu = T(mu), tmzd = T(mzd);
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const int64_t off = cc * HW;
        T gm = 1, bt = 0, gmd = 0, btd = 0;
        if (d.norm) {
          gm = p.gam[c];
          bt = p.bet[c];
          if (tan) {
            gmd = p.gamd[c];
            btd = p.betd[c];
          }
        }
        for (int64_t i = 0; i < HW; ++i) {
          T n, nd = 0;
          if (d.norm) {
            T x = (zp[off + i] - tmu) * trstd;
            xp[off + i] = x;
            n = x * gm + bt;
            if (tan) {
              T xd = (zdp[off + i] - tmzd) * trstd - x * tk;
              xdp[off + i] = xd;
              nd = xd * gm + x * gmd + btd;
            }
          } else {
            n = zp[off + i];
            xp[off + i] = n;
            if (tan) {
              nd = zdp[off + i];
              xdp[off + i] = nd;
            }
          }
          T r, d1;
          act_fwd(d.act, n, r, d1);
          rbuf[i] = r;
          if (tan) rdbuf[i] = d1 * nd;
        }
        T* op = out + (b * d.C + c) * Ho * Wo;
        T* odp = tan ? outd + (b * d.C + c) * Ho * Wo : nullptr;
        if (d.avgpool) {
          for (int64_t i = 0; i < Ho; ++i)
            for (int64_t j = 0; j < Wo; ++j) {
              const int64_t q = 2 * i * d.W + 2 * j;
              op[i * Wo + j] = T(0.25) * (rbuf[q] + rbuf[q + 1] + rbuf[q + d.W] + rbuf[q + d.W + 1]);
              if (tan) odp[i * Wo + j] = T(0.25) * (rdbuf[q] + rdbuf[q + 1] + rdbuf[q + d.W] + rdbuf[q + d.W + 1]);
            }
        } else {
          for (int64_t i = 0; i < HW; ++i) op[i] = rbuf[i];
          if (tan)
            for (int64_t i = 0; i < HW; ++i) odp[i] = rdbuf[i];
        }
      }
    }
  });
}

// part: [4, B, C] partial sums (norm only): sum gn xh, sum gn, sum (gnd xh + gn xhd), sum gnd.
template <typename T>
void block_backward(const BlockDims& d, const Params<T>& p, const T* ga, const T* gad, const T* xh, const T* xhd,
                    const T* rstd_in, const T* k_in, T* gz, T* gzd, T* part, bool want_param_tangent) {
  const int64_t HW = d.H * d.W;
  const int64_t Cg = d.C / d.G;
  const int64_t M = Cg * HW;
  const int64_t Ho = d.avgpool ? d.H / 2 : d.H, Wo = d.avgpool ? d.W / 2 : d.W;
  const bool tan = gad != nullptr;
  const int64_t BC = d.B * d.C;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1));
  at::parallel_for(0, d.B * d.G, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.G, g = task % d.G;
      const int64_t base = (b * d.C + g * Cg) * HW;
      const T* xp = xh + base;
      const T* xdp = tan ? xhd + base : nullptr;
      T* gzp = gz + base;
      T* gzdp = tan ? gzd + base : nullptr;
      double A = 0, Bm = 0, Cs = 0, Dm = 0;
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        const int64_t off = cc * HW;
        const T* gap = ga + (b * d.C + c) * Ho * Wo;
        const T* gadp = tan ? gad + (b * d.C + c) * Ho * Wo : nullptr;
        T gm = 1, bt = 0, gmd = 0, btd = 0;
        if (d.norm) {
          gm = p.gam[c];
          bt = p.bet[c];
          if (tan) {
            gmd = p.gamd[c];
            btd = p.betd[c];
          }
        }
        double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
        for (int64_t i = 0; i < d.H; ++i) {
          for (int64_t j = 0; j < d.W; ++j) {
            const int64_t q = off + i * d.W + j;
            T gr = 0, grd = 0;
            if (d.avgpool) {
              if (i < 2 * Ho && j < 2 * Wo) {
                const int64_t o = (i / 2) * Wo + (j / 2);
                gr = T(0.25) * gap[o];
                if (tan) grd = T(0.25) * gadp[o];
              }
            } else {
              gr = gap[i * d.W + j];
              if (tan) grd = gadp[i * d.W + j];
            }
            const T x = xp[q];
            const T xd = tan ? xdp[q] : T(0);
            T n, nd = 0;
            if (d.norm) {
              n = x * gm + bt;
              if (tan) nd = xd * gm + x * gmd + btd;
            } else {
              n = x;
              nd = xd;
            }
            T gn, gnd = 0;
            if (d.act == 1) {
              T s = T(1) / (T(1) + std::exp(-n));
              T d1 = s * (T(1) - s);
              gn = gr * d1;
              if (tan) gnd = grd * d1 + gr * d1 * (T(1) - T(2) * s) * nd;
            } else {
              T d1 = n > T(0) ? T(1) : (d.act == 2 ? T(0.01) : T(0));
              gn = gr * d1;
              if (tan) gnd = grd * d1;
            }
            if (d.norm) {
              s1 += gn * x;
              s2 += gn;
              const T gx = gn * gm;
              A += gx;
              Bm += gx * x;
              gzp[q] = gx;
              if (tan) {
                s3 += gnd * x + gn * xd;
                s4 += gnd;
                const T gxd = gnd * gm + gn * gmd;
                Cs += gxd;
                Dm += gxd * x + gx * xd;
                gzdp[q] = gxd;
              }
            } else {
              gzp[q] = gn;
              if (tan) gzdp[q] = gnd;
            }
          }
        }
        if (d.norm) {
          part[0 * BC + b * d.C + c] = T(s1);
          part[1 * BC + b * d.C + c] = T(s2);
          part[2 * BC + b * d.C + c] = want_param_tangent ? T(s3) : T(0);
          part[3 * BC + b * d.C + c] = want_param_tangent ? T(s4) : T(0);
        }
      }
      if (d.norm) {
        const T rs = rstd_in[task], k = k_in[task];
        const T mg = T(A / M), m1 = T(Bm / M), mgd = T(Cs / M), m2 = T(Dm / M);
        for (int64_t i = 0; i < M; ++i) {
          const T x = xp[i];
          const T gzv = rs * (gzp[i] - mg - x * m1);
          gzp[i] = gzv;
          if (tan) gzdp[i] = rs * (gzdp[i] - mgd - xdp[i] * m1 - x * m2) - k * gzv;
        }
      }
    }
  });
}

}  // namespace traj
}  // namespace haba_fast
