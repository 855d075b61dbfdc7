// The exact constant-memory unrolled trajectory engine for the ConvNet family (see docs/DESIGN.md,
// "The exact constant-memory engine").
//
// Ops (torch.ops.haba_fast.*):
//   trajectory_match(X, Y, w_start, w_target, lr, spec, first_order) -> loss            (autograd: dL/dX, dL/dlr)
//   trajectory_match_forward(X, Y, w_start, w_target, lr, spec, first_order) -> (loss, W [N+1, P])
//   trajectory_match_backward(grad, X, Y, W, w_target, lr, spec, first_order) -> (dX, dlr)
//   trajectory_step_hvp(w, x, y, lam, spec) -> (g, h_w, h_x)     (one step's gradient and Hessian products; tests)
//   trajectory_step_grad(w, x, y, spec, check_values=True) -> g   (the streamed engine's forward step)
//   trajectory_step_adjoint(w, x, y, lam, spec, want_hw) -> (<g, lam>, h_w, h_x)   (its backward step)
//   trajectory_step_grad_keep(w, x, y, spec, check_values=True) -> (g, kept)   (a kept step of the memory
//                                                     budget: g and the forward sweep's per-block tensors, 3 x depth)
//   (check_values=False: no value checks, so no host read on CUDA; for callers that checked the values once per
//   unroll. On a CPU, at::one_hot still reads the labels' range.)
//   trajectory_step_adjoint_kept(w, x, y, lam, kept, spec, want_hw) -> as trajectory_step_adjoint, reusing kept
//
//   X [N, B, C, H, W] float/double, Y [N, B] int64, w_start/w_target [P], lr 0-dim (all on one device).
//   spec = [channel, num_classes, width, depth, norm, act, pool, first_padding] with
//   norm 0 none | 1 instancenorm | 2 groupnorm (4 groups) | 3 layernorm; act 0 relu | 1 sigmoid | 2 leakyrelu (0.01);
//   pool 0 none | 1 avg 2x2 | 2 max 2x2. Layer math and flat parameter order: haba_fast/models.py ConvNet.
//
// Forward: w_{t+1} = w_t - lr * g_t, g_t = grad_w CE(f(w_t, X_t), Y_t) (mean over the batch); only the w_t are kept.
// loss = ||w_N - w*||^2 / ||w_start - w*||^2.
// Backward: lam = dL/dw_N; for t = N-1..0, with (h_w, h_x) = d/de grad_{w,x} CE(w_t + e lam, X_t) at e = 0 (a
// forward-over-reverse Hessian-vector product, written out layer by layer below):
//   dL/dX_t = -lr h_x;  dL/dlr -= <g_t, lam>;  lam <- lam - lr h_w   (first_order: lam stays fixed, no h_w;
//   an approximation, TESLA-style).
//
// Why analytic: autograd's double backward of GroupNorm/AvgPool/ReLU is a long chain of composite element-wise
// ops over the largest activations (profiled on ConvNet-128, batch 100, 3x32x32: ~60% of an autograd HVP step is
// element-wise mul/add/fill/pool-backward; the convolutions are ~40%). Here every layer carries a primal and a
// tangent through the forward pass and back; on CPU tensors the norm + activation + pooling of a block run as one
// fused loop per (sample, group) whose data stays in cache (trajectory_kernels.h). Convolutions go through
// at::convolution / at::convolution_backward, so the same code runs on CUDA tensors (composite path); on CPU
// tensors the gradients of a convolution with few input channels take ATen's im2col + GEMM kernel (conv_bwd).
// Measured (one step's g, h_w, h_x; ConvNet-128, batch 100, float32, same process, busy 2-core machine):
// autograd double backward 6.4 s, this file's fused path 2.2 s, its ATen-only path 6.5 s, a plain gradient 1.4 s.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "buffer_cache.h"
#include "check.h"
#include "cpu_isa.h"
#include "trajectory_types.h"

// Three copies of the fused loops: the build's baseline ISA, AVX2+FMA and Skylake-AVX512, chosen at run time
// (cpu_isa.h).
#define TRAJ_NS traj
#include "trajectory_kernels.h"
#undef TRAJ_NS
#ifdef HABA_FAST_HAVE_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TRAJ_NS traj_avx2
#include "trajectory_kernels.h"
#undef TRAJ_NS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=skylake-avx512,tune=skylake-avx512")
#define TRAJ_NS traj_avx512
#include "trajectory_kernels.h"
#undef TRAJ_NS
#pragma GCC pop_options
#define TRAJ_CALL(fn, ...)                                                                      \
  switch (kernel_isa()) {                                                                       \
    case CpuIsa::kAvx512: ::haba_fast::traj_avx512::fn(__VA_ARGS__); break;                     \
    case CpuIsa::kAvx2: ::haba_fast::traj_avx2::fn(__VA_ARGS__); break;                         \
    default: ::haba_fast::traj::fn(__VA_ARGS__);                                                \
  }
#else
#define TRAJ_CALL(fn, ...) ::haba_fast::traj::fn(__VA_ARGS__)
#endif

namespace haba_fast {
namespace {

using at::Tensor;

constexpr double kEps = 1e-5;

enum Norm { kNormNone = 0, kInstance = 1, kGroup = 2, kLayer = 3 };
enum Act { kRelu = 0, kSigmoid = 1, kLeaky = 2 };
enum Pool { kPoolNone = 0, kAvg = 1, kMax = 2 };

struct Spec {
  int64_t channel, classes, width, depth, norm, act, pool, pad0;
};

Spec parse_spec(at::IntArrayRef s) {
  HF_CHECK(s.size() == 8,
              "trajectory_match: spec must be [channel, num_classes, width, depth, norm, act, pool, first_padding] "
              "(8 ints), got ",
              s.size(), " values");
  Spec p{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]};
  HF_CHECK(p.channel >= 1 && p.classes >= 1 && p.width >= 1 && p.depth >= 1,
              "trajectory_match: spec channel, num_classes, width and depth must be >= 1, got ", s);
  HF_CHECK(p.norm >= 0 && p.norm <= 3, "trajectory_match: spec norm code must be 0..3 (none, instancenorm, "
              "groupnorm, layernorm), got ", p.norm);
  HF_CHECK(p.act >= 0 && p.act <= 2, "trajectory_match: spec act code must be 0..2 (relu, sigmoid, leakyrelu), got ",
              p.act);
  HF_CHECK(p.pool >= 0 && p.pool <= 2, "trajectory_match: spec pool code must be 0..2 (none, avg, max), got ",
              p.pool);
  HF_CHECK(p.pad0 >= 0, "trajectory_match: spec first_padding must be >= 0, got ", p.pad0);
  // Sizes beyond any network that fits a machine: the layout's products below then cannot overflow int64.
  constexpr int64_t kMaxSpec = int64_t(1) << 24;
  HF_CHECK(p.channel <= kMaxSpec && p.classes <= kMaxSpec && p.width <= kMaxSpec && p.depth <= 1024 &&
               p.pad0 <= 1024,
           "trajectory_match: spec channel, num_classes and width must be <= 2^24, depth and first_padding <= 1024, "
           "got ", s);
  HF_CHECK(p.norm != kGroup || p.width % 4 == 0, "trajectory_match: groupnorm uses 4 groups, width ", p.width,
              " is not a multiple of 4");
  return p;
}

// Where each parameter lives in the flat vector, for an input of spatial size H x W.
struct Slot {
  int64_t offset;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (auto v : shape) n *= v;
    return n;
  }
};

struct LayerLayout {
  Slot conv_w, conv_b, norm_w, norm_b;
  int64_t pad, cin, Hc, Wc;  // conv output size (pre-pool)
};

struct Layout {
  std::vector<LayerLayout> layers;
  Slot fc_w, fc_b;
  int64_t P = 0;
};

Layout make_layout(const Spec& s, int64_t H, int64_t W) {
  Layout L;
  int64_t off = 0;
  auto take = [&](std::vector<int64_t> shape) {
    int64_t n = 1, end = 0;
    for (int64_t v : shape) {
      HF_CHECK(!__builtin_mul_overflow(n, v, &n) && !__builtin_add_overflow(off, n, &end),
               "trajectory_match: the spec and image size give more parameters than int64 counts");
    }
    Slot sl{off, std::move(shape)};
    off += n;
    return sl;
  };
  int64_t cin = s.channel;
  for (int64_t d = 0; d < s.depth; ++d) {
    LayerLayout l;
    l.pad = d == 0 ? s.pad0 : 1;
    l.cin = cin;
    l.Hc = H + 2 * l.pad - 2;
    l.Wc = W + 2 * l.pad - 2;
    HF_CHECK(l.Hc >= 1 && l.Wc >= 1, "trajectory_match: the image is too small for depth ", s.depth,
                " (feature map vanishes at block ", d + 1, ")");
    l.conv_w = take({s.width, cin, 3, 3});
    l.conv_b = take({s.width});
    if (s.norm == kLayer) {
      l.norm_w = take({s.width, l.Hc, l.Wc});
      l.norm_b = take({s.width, l.Hc, l.Wc});
    } else if (s.norm != kNormNone) {
      l.norm_w = take({s.width});
      l.norm_b = take({s.width});
    }
    H = l.Hc;
    W = l.Wc;
    if (s.pool != kPoolNone) {
      H /= 2;
      W /= 2;
    }
    HF_CHECK(H >= 1 && W >= 1, "trajectory_match: the image is too small for depth ", s.depth,
                " (feature map vanishes after pooling in block ", d + 1, ")");
    cin = s.width;
    L.layers.push_back(l);
  }
  int64_t fc_in = 0;  // width x H x W, checked as take() checks its shapes
  HF_CHECK(!__builtin_mul_overflow(s.width, H, &fc_in) && !__builtin_mul_overflow(fc_in, W, &fc_in),
           "trajectory_match: the spec and image size give more parameters than int64 counts");
  L.fc_w = take({s.classes, fc_in});
  L.fc_b = take({s.classes});
  L.P = off;
  return L;
}

Tensor view(const Tensor& w, const Slot& s) { return w.narrow(0, s.offset, s.numel()).view(s.shape); }

// HABA_FAST_TRAJECTORY_FUSED: "0" = the composite ATen ops everywhere; "triton" = the Triton block kernels where
// they apply (see block_impl); unset or anything else = the fused CPU loops on CPU tensors, the composite ops on
// CUDA tensors.
std::string fused_mode() {
  const char* v = std::getenv("HABA_FAST_TRAJECTORY_FUSED");
  return v ? std::string(v) : std::string();
}

int64_t groups_of(const Spec& s) {
  if (s.norm == kInstance) return s.width;
  if (s.norm == kGroup) return 4;
  return 1;
}

// Tensors per block in a kept step's list (see step()): conv output, block output, gradient w.r.t. the block input.
constexpr int64_t kKeptPerBlock = 3;

// Everything a block keeps from its forward pass for the backward pass of the same step.
struct BlockCache {
  Tensor a, ad;          // block input and its tangent (ad undefined when the tangent is zero: first block)
  Tensor xh, xhd;        // normalized conv output and tangent [B, C, Hc, Wc] (norm) -- or n, nd (no norm)
  Tensor rstd, k;        // per (b, group) 1/sigma and rstd * mean(zd * xh), shape [B, G] (norm)
  Tensor d1, d2, nd;     // composite path: act'(n), act''(n) (sigmoid), tangent of n (sigmoid)
  Tensor pool_idx;       // max pooling argmax
};

// ---------------------------------------------------------------------------------------------------------------
// Composite (ATen-only) block math: runs on any device.

Tensor gview(const Tensor& t, int64_t G) { return t.reshape({t.size(0), G, -1}); }

// Forward of norm -> act -> pool on conv output z (and tangent zd, may be undefined). Returns (a_out, ad_out).
std::pair<Tensor, Tensor> block_forward_composite(const Spec& s, const Tensor& z, const Tensor& zd, const Tensor& gam,
                                                  const Tensor& bet, const Tensor& gamd, const Tensor& betd,
                                                  BlockCache& c) {
  const bool tan = zd.defined();
  Tensor n, nd;
  if (s.norm != kNormNone) {
    const int64_t G = groups_of(s);
    Tensor zg = gview(z, G);
    auto vm = at::var_mean(zg, {2}, /*correction=*/0, /*keepdim=*/true);
    Tensor rstd = (std::get<0>(vm) + kEps).rsqrt();
    // Full-size passes written as addcmul (input + t1 * t2, broadcasting the per-group / per-channel factors): on
    // CUDA each ATen op is a kernel and a pass over memory, so (zg - mean) * rstd becomes zg * rstd + (-mean * rstd).
    Tensor xh = at::addcmul(-std::get<1>(vm) * rstd, zg, rstd);
    std::vector<int64_t> ashape = s.norm == kLayer ? std::vector<int64_t>{1, z.size(1), z.size(2), z.size(3)}
                                                   : std::vector<int64_t>{1, z.size(1), 1, 1};
    Tensor g4 = gam.view(ashape), b4 = bet.view(ashape);
    if (tan) {
      Tensor zdg = gview(zd, G);
      Tensor k = rstd * (zdg * xh).mean({2}, true);
      // xhd = (zdg - mean(zdg)) * rstd - xh * k
      Tensor xhd = at::addcmul(-zdg.mean({2}, true) * rstd, zdg, rstd).addcmul_(xh, k, -1);
      xhd = xhd.view(z.sizes());
      c.xhd = xhd;
      c.k = k;
      nd = at::addcmul(betd.view(ashape), xhd, g4).addcmul_(xh.view(z.sizes()), gamd.view(ashape));
    }
    xh = xh.view(z.sizes());
    c.xh = xh;
    c.rstd = rstd;
    n = at::addcmul(b4, xh, g4);
  } else {
    n = z;
    nd = zd;
  }
  Tensor r, rd;
  if (s.act == kSigmoid) {
    Tensor sg = at::sigmoid(n);
    c.d1 = sg * (1 - sg);
    c.d2 = c.d1 * (1 - 2 * sg);
    c.nd = nd;
    r = sg;
  } else if (s.act == kRelu) {
    r = at::relu(n);
    c.d1 = at::sign(r);  // 1 where n > 0, else 0: relu's derivative in one pass
  } else {
    // where() of two 0-dim tensors of n's dtype (two Python-like scalars would give the default dtype, float32)
    c.d1 = at::where(n > 0, at::scalar_tensor(1.0, n.options()), at::scalar_tensor(0.01, n.options()));
    r = n * c.d1;
  }
  if (tan) rd = nd * c.d1;
  if (s.pool == kAvg) {
    Tensor out = at::avg_pool2d(r, {2, 2}, {2, 2});
    return {out, tan ? at::avg_pool2d(rd, {2, 2}, {2, 2}) : Tensor()};
  }
  if (s.pool == kMax) {
    auto mi = at::max_pool2d_with_indices(r, {2, 2}, {2, 2});
    c.pool_idx = std::get<1>(mi);
    Tensor out = std::get<0>(mi);
    Tensor outd;
    if (tan) outd = rd.flatten(2).gather(2, c.pool_idx.flatten(2)).view(out.sizes());
    return {out, outd};
  }
  return {r, rd};
}

// 2x2 / stride-2 average pooling's backward times d: [B, C, H, W] = d * (g [B, C, H/2, W/2] / 4, each value spread
// over its window), as one broadcast multiply. ATen's CUDA avg_pool2d_backward ran at 5.5x its forward's time on an
// H200 (bench/results/iteration_profile_cuda_h200.txt); this reads d and g once and writes the result once. Only for
// even H, W and a contiguous d (an odd edge row/column gets no gradient: avg_pool2d_backward handles those).
bool avg_pool_backward_fusable(const Tensor& d) {
  return d.dim() == 4 && d.size(2) % 2 == 0 && d.size(3) % 2 == 0 && d.is_contiguous();
}

Tensor avg_pool_backward_times(const Tensor& g, const Tensor& d) {
  const int64_t B = d.size(0), C = d.size(1), H = d.size(2), W = d.size(3);
  Tensor quarter = (g * 0.25).reshape({B, C, H / 2, 1, W / 2, 1});
  return (d.view({B, C, H / 2, 2, W / 2, 2}) * quarter).view({B, C, H, W});
}

// Instance norm's backward (and tangent) from (gn, gnd) w.r.t. its output: as the general case below, but with
// gamma constant over each (sample, channel) group, so every mean over a group factors into a few per-group means:
// P = mean(gn * xh), Q = mean(gn), R = mean(gnd * xh + gn * xhd), Qd = mean(gnd) ([B, C, 1] each), and
// mean(gx * xh) = gamma P, mean(gx) = gamma Q, mean(gxd * xh + gx * xhd) = gamma R + gamma_dot P,
// mean(gxd) = gamma Qd + gamma_dot Q (gx = gamma gn, gxd = gamma gnd + gamma_dot gn); the parameter gradients are
// those means summed over the batch, times the group size L. Fewer full-size passes: 4 reductions and 10 passes
// against the general case's 8 and 15 (with the tangent).
std::pair<Tensor, Tensor> instance_norm_backward_composite(const Tensor& gn, const Tensor& gnd, const Tensor& gam,
                                                           const Tensor& gamd, const BlockCache& c, Tensor* ggam,
                                                           Tensor* gbet, Tensor* ggamd, Tensor* gbetd) {
  const int64_t C = gn.size(1), L = gn.size(2) * gn.size(3);
  const Tensor& rstd = c.rstd;  // [B, C, 1]
  Tensor gn3 = gview(gn, C), xh3 = gview(c.xh, C);
  Tensor g3 = gam.view({1, C, 1});
  Tensor P = (gn3 * xh3).mean({2}, true);
  Tensor Q = gn3.mean({2}, true);
  *ggam = P.sum({0}).reshape({C}) * static_cast<double>(L);
  *gbet = Q.sum({0}).reshape({C}) * static_cast<double>(L);
  // The per-group factors, each [B, C, 1], times rstd: gr = gamma rstd, m1r = mean(gx * xh) rstd = P gr.
  Tensor gr = g3 * rstd;
  Tensor m1r = P * gr;
  // gz = (gamma gn - gamma Q - xh m1) * rstd
  Tensor gz = at::addcmul((Q * gr).neg_(), gn3, gr).addcmul_(xh3, m1r, -1);
  Tensor gzd;
  if (gnd.defined()) {
    Tensor gnd3 = gview(gnd, C), xhd3 = gview(c.xhd, C);
    Tensor gdr = gamd.view({1, C, 1}) * rstd;
    Tensor R = (gnd3 * xh3).addcmul_(gn3, xhd3).mean({2}, true);
    Tensor Qd = gnd3.mean({2}, true);
    if (ggamd) {
      *ggamd = R.sum({0}).reshape({C}) * static_cast<double>(L);
      *gbetd = Qd.sum({0}).reshape({C}) * static_cast<double>(L);
    }
    Tensor m2r = at::addcmul(R * gr, P, gdr);  // mean(gxd * xh + gx * xhd) rstd
    // gzd = (gxd - mean(gxd) - xhd m1 - xh m2) * rstd - k gz, gxd = gamma gnd + gamma_dot gn
    gzd = at::addcmul((Qd * gr).addcmul_(Q, gdr).neg_(), gnd3, gr)
              .addcmul_(gn3, gdr)
              .addcmul_(xhd3, m1r, -1)
              .addcmul_(xh3, m2r, -1)
              .addcmul_(gz, c.k, -1)
              .view(gn.sizes());
  }
  return {gz.view(gn.sizes()), gzd};
}

// Backward of the same block: from (ga, gad) w.r.t. the block output to (gz, gzd) w.r.t. the conv output, plus
// the norm parameter gradients (and tangents). gad undefined = primal only.
std::pair<Tensor, Tensor> block_backward_composite(const Spec& s, const Tensor& ga, const Tensor& gad,
                                                   const Tensor& gam, const Tensor& gamd, BlockCache& c,
                                                   Tensor* ggam, Tensor* gbet, Tensor* ggamd, Tensor* gbetd) {
  const bool tan = gad.defined();
  Tensor gn, gnd;
  if (s.pool == kAvg && avg_pool_backward_fusable(c.d1)) {
    gn = avg_pool_backward_times(ga, c.d1);
    if (tan) {
      gnd = avg_pool_backward_times(gad, c.d1);
      if (s.act == kSigmoid) gnd = gnd + avg_pool_backward_times(ga, c.d2 * c.nd);
    }
  } else {
    Tensor gr, grd;
    if (s.pool == kAvg) {
      gr = at::avg_pool2d_backward(ga, c.d1, {2, 2}, {2, 2}, {0, 0}, false, true, c10::nullopt);
      if (tan) grd = at::avg_pool2d_backward(gad, c.d1, {2, 2}, {2, 2}, {0, 0}, false, true, c10::nullopt);
    } else if (s.pool == kMax) {
      gr = at::max_pool2d_with_indices_backward(ga, c.d1, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false, c.pool_idx);
      if (tan)
        grd = at::max_pool2d_with_indices_backward(gad, c.d1, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false, c.pool_idx);
    } else {
      gr = ga;
      grd = gad;
    }
    gn = gr * c.d1;
    if (tan) {
      gnd = grd * c.d1;
      if (s.act == kSigmoid) gnd = gnd + gr * c.d2 * c.nd;
    }
  }
  if (s.norm == kNormNone) return {gn, gnd};
  if (s.norm == kInstance) return instance_norm_backward_composite(gn, gnd, gam, gamd, c, ggam, gbet, ggamd, gbetd);
  const int64_t G = groups_of(s);
  std::vector<int64_t> red = s.norm == kLayer ? std::vector<int64_t>{0} : std::vector<int64_t>{0, 2, 3};
  std::vector<int64_t> ashape = s.norm == kLayer ? std::vector<int64_t>{1, gn.size(1), gn.size(2), gn.size(3)}
                                                 : std::vector<int64_t>{1, gn.size(1), 1, 1};
  const Tensor& xh = c.xh;
  const Tensor& rstd = c.rstd;
  *ggam = (gn * xh).sum(red);
  *gbet = gn.sum(red);
  Tensor g4 = gam.view(ashape);
  Tensor gx = gview(gn * g4, G);
  Tensor xhg = gview(xh, G);
  Tensor m1 = (gx * xhg).mean({2}, true);
  // gz = (gx - mean(gx) - xh * m1) * rstd, as addcmuls (one pass each; see block_forward_composite)
  Tensor gz = at::addcmul(-gx.mean({2}, true) * rstd, gx, rstd).addcmul_(xhg, m1 * rstd, -1);
  Tensor gzd;
  if (tan) {
    if (ggamd) {
      *ggamd = (gnd * xh).addcmul_(gn, c.xhd).sum(red);
      *gbetd = gnd.sum(red);
    }
    Tensor gxd = gview((gnd * g4).addcmul_(gn, gamd.view(ashape)), G);
    Tensor xhdg = gview(c.xhd, G);
    Tensor m2 = (gxd * xhg).addcmul_(gx, xhdg).mean({2}, true);
    // gzd = (gxd - mean(gxd) - xhd * m1 - xh * m2) * rstd - k * gz
    gzd = at::addcmul(-gxd.mean({2}, true) * rstd, gxd, rstd)
              .addcmul_(xhdg, m1 * rstd, -1)
              .addcmul_(xhg, m2 * rstd, -1)
              .addcmul_(gz, c.k, -1);
    gzd = gzd.view(gn.sizes());
  }
  return {gz.view(gn.sizes()), gzd};
}

// ---------------------------------------------------------------------------------------------------------------
// Fused CPU block math (trajectory_kernels.h): instancenorm / groupnorm / none, any activation, avg or no pooling.

// Who runs a block's norm -> activation -> pooling. kCpuLoops and kTriton share the fused step layout (the primal
// and tangent convolutions as few wide calls, block_forward_fused / block_backward_fused); kComposite is the ATen
// chain above.
enum class BlockImpl { kComposite, kCpuLoops, kTriton };

// The Triton block kernels (kernels/trajectory_block.py) are Python: registered as implementations of the two
// schemas below by haba_fast.ops.register_trajectory_block_kernels, for CUDA tensors (and CPU tensors when
// TRITON_INTERPRET=1 is set as the extension loads); found through the dispatcher once.
const c10::OperatorHandle& triton_block_op(bool backward) {
  static const c10::OperatorHandle forward_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("haba_fast::trajectory_block_forward_kernel", "");
  static const c10::OperatorHandle backward_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("haba_fast::trajectory_block_backward_kernel", "");
  return backward ? backward_op : forward_op;
}

// With HABA_FAST_TRAJECTORY_FUSED=triton: instance norm or none, any activation, average or no pooling (layer and
// group norm, max pooling: the device's default implementation). Not registered for the tensors' device: an error
// that says so, never a silent fallback.
BlockImpl block_impl(const Spec& s, const Tensor& x) {
  const std::string mode = fused_mode();
  if (mode == "0") return BlockImpl::kComposite;
  if (mode == "triton" && (s.norm == kNormNone || s.norm == kInstance) && s.pool != kMax) {
    const bool known_device = x.device().is_cuda() || x.device().is_cpu();
    const c10::DispatchKey key = x.device().is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
    for (bool backward : {false, true}) {
      HF_CHECK(known_device && triton_block_op(backward).hasKernelForDispatchKey(key),
               "HABA_FAST_TRAJECTORY_FUSED=triton: no Triton block kernel for ", x.device().str(),
               " tensors (Triton runs on CUDA, or on the CPU when TRITON_INTERPRET=1 is set before haba_fast's ",
               "extension loads; haba_fast.ops.register_trajectory_block_kernels registers them, and needs triton)");
    }
    return BlockImpl::kTriton;
  }
  return x.device().is_cpu() && s.norm != kLayer && s.pool != kMax ? BlockImpl::kCpuLoops : BlockImpl::kComposite;
}

c10::IValue optional_ivalue(const Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

// Calls a Triton block kernel with its leading tensors `args`, then the norm's (gam, bet) and, with a tangent,
// (gamd, betd) (None where there is no norm or no tangent, as the schemas take them), act, pool, then `tail`.
void call_triton_block(bool backward, const Spec& s, bool tan, const Tensor& gam, const Tensor& bet,
                       const Tensor& gamd, const Tensor& betd, std::vector<c10::IValue> args,
                       std::vector<c10::IValue> tail) {
  const bool norm = s.norm != kNormNone;
  for (const Tensor* t : {&gam, &bet}) args.push_back(optional_ivalue(norm ? *t : Tensor()));
  for (const Tensor* t : {&gamd, &betd}) args.push_back(optional_ivalue(norm && tan ? *t : Tensor()));
  args.emplace_back(s.act);
  args.emplace_back(s.pool == kAvg);
  args.insert(args.end(), tail.begin(), tail.end());
  triton_block_op(backward).callBoxed(&args);
}

// The norm parameters (and, with a tangent, theirs) as the CPU loops read them: pointers into contiguous copies,
// which `held` keeps alive for the call. No norm: null pointers.
template <typename T>
traj_types::Params<T> loop_params(bool norm, bool tan, const Tensor& gam, const Tensor& bet, const Tensor& gamd,
                                  const Tensor& betd, std::array<Tensor, 4>& held) {
  traj_types::Params<T> p{};
  if (!norm) return p;
  held[0] = gam.contiguous();
  held[1] = bet.contiguous();
  p.gam = held[0].data_ptr<T>();
  p.bet = held[1].data_ptr<T>();
  if (tan) {
    held[2] = gamd.contiguous();
    held[3] = betd.contiguous();
    p.gamd = held[2].data_ptr<T>();
    p.betd = held[3].data_ptr<T>();
  }
  return p;
}

// z: the conv output [B, C, H, W], and zd its tangent (undefined: primal only), each contiguous within a sample and
// with one batch stride: the two channel halves of one contiguous [B, 2C, H, W] tensor, or two contiguous tensors
// (the primal kept from the forward sweep, the tangent computed now).
std::pair<Tensor, Tensor> block_forward_fused(const Spec& s, BlockImpl impl, const Tensor& z, const Tensor& zd,
                                              const Tensor& gam, const Tensor& bet, const Tensor& gamd,
                                              const Tensor& betd, BlockCache& c) {
  const bool tan = zd.defined();
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  TORCH_INTERNAL_ASSERT(z.stride(1) == H * W && z.stride(2) == W && z.stride(3) == 1);
  TORCH_INTERNAL_ASSERT(!tan || (zd.sizes() == z.sizes() && zd.strides() == z.strides()));
  const int64_t G = s.norm == kNormNone ? C : groups_of(s);
  const int64_t Ho = s.pool == kAvg ? H / 2 : H, Wo = s.pool == kAvg ? W / 2 : W;
  auto opts = z.options();
  Tensor out = at::empty({B, C, Ho, Wo}, opts);
  Tensor outd = tan ? at::empty({B, C, Ho, Wo}, opts) : Tensor();
  c.xh = at::empty({B, C, H, W}, opts);
  c.xhd = tan ? at::empty({B, C, H, W}, opts) : Tensor();
  c.rstd = at::empty({B, G}, opts);
  c.k = at::empty({B, G}, opts);
  if (impl == BlockImpl::kTriton) {
    call_triton_block(false, s, tan, gam, bet, gamd, betd, {z, optional_ivalue(zd)},
                      {out, optional_ivalue(outd), c.xh, optional_ivalue(c.xhd), c.rstd, c.k});
    return {out, outd};
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "trajectory_block_forward", [&] {
    traj_types::BlockDims dims{B, C, H, W, G, s.norm != kNormNone, static_cast<int>(s.act), s.pool == kAvg, z.stride(0)};
    std::array<Tensor, 4> held;
    auto p = loop_params<scalar_t>(s.norm != kNormNone, tan, gam, bet, gamd, betd, held);
    TRAJ_CALL(block_forward<scalar_t>, dims, p, z.data_ptr<scalar_t>(), tan ? zd.data_ptr<scalar_t>() : nullptr,
                                  c.xh.data_ptr<scalar_t>(),
                                  tan ? c.xhd.data_ptr<scalar_t>() : nullptr, c.rstd.data_ptr<scalar_t>(),
                                  c.k.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                  tan ? outd.data_ptr<scalar_t>() : nullptr);
  });
  return {out, outd};
}

// Returns gzz: [B, C, H, W] = gz (primal only) or [B, 2C, H, W] = [gz | gzd] (with tangent), contiguous.
Tensor block_backward_fused(const Spec& s, BlockImpl impl, const Tensor& ga, const Tensor& gad, const Tensor& gam,
                            const Tensor& bet, const Tensor& gamd, const Tensor& betd, BlockCache& c, Tensor* ggam,
                            Tensor* gbet, Tensor* ggamd, Tensor* gbetd) {
  const bool tan = gad.defined();
  const Tensor& xh = c.xh;
  const int64_t B = xh.size(0), C = xh.size(1), H = xh.size(2), W = xh.size(3);
  const int64_t G = s.norm == kNormNone ? C : groups_of(s);
  auto opts = xh.options();
  Tensor gzz = at::empty({B, tan ? 2 * C : C, H, W}, opts);
  const bool norm = s.norm != kNormNone;
  const bool want_pt = tan && ggamd != nullptr;
  // Per (sample, channel) partial sums of the norm parameter gradients; summed over the batch afterwards so
  // that no two threads write the same place (deterministic, thread-count independent).
  Tensor part = norm ? at::empty({4, B, C}, opts) : Tensor();
  Tensor gac = ga.contiguous();
  Tensor gadc = tan ? gad.contiguous() : Tensor();
  if (impl == BlockImpl::kTriton) {
    call_triton_block(true, s, tan, gam, bet, gamd, betd,
                      {gac, optional_ivalue(gadc), xh, optional_ivalue(tan ? c.xhd : Tensor()), c.rstd, c.k},
                      {gzz, optional_ivalue(part)});
  } else {
    AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "trajectory_block_backward", [&] {
      traj_types::BlockDims dims{B, C, H, W, G, norm, static_cast<int>(s.act), s.pool == kAvg, gzz.stride(0)};
      std::array<Tensor, 4> held;
      auto p = loop_params<scalar_t>(norm, tan, gam, bet, gamd, betd, held);
      scalar_t* gz = gzz.data_ptr<scalar_t>();
      TRAJ_CALL(block_backward<scalar_t>, dims, p, gac.data_ptr<scalar_t>(), tan ? gadc.data_ptr<scalar_t>() : nullptr,
                                     xh.data_ptr<scalar_t>(), tan ? c.xhd.data_ptr<scalar_t>() : nullptr,
                                     c.rstd.data_ptr<scalar_t>(), c.k.data_ptr<scalar_t>(), gz,
                                     tan ? gz + C * H * W : nullptr, norm ? part.data_ptr<scalar_t>() : nullptr,
                                     want_pt);
    });
  }
  if (norm) {
    Tensor sums = part.sum(1);  // [4, C]
    *ggam = sums[0];
    *gbet = sums[1];
    if (want_pt) {
      *ggamd = sums[2];
      *gbetd = sums[3];
    }
  }
  return gzz;
}

// ---------------------------------------------------------------------------------------------------------------
// One step: g = grad_w CE(f(w, x), y); with lam: also h_w = H_ww lam (if want_hw) and h_x = H_xw lam.

struct StepResult {
  Tensor g, hw, hx;
  Tensor g_dot_lam;  // <g, lam> as a 0-dim tensor (with lam), from the tangent of the loss: no weight gradient needed
};

Tensor conv(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, int64_t pad) {
  return at::convolution(x, w, b, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1);
}

// The gradients of a convolution whose input has at most this many channels (the first block's image, 1 or 3
// channels; every block of a network at most this wide) run ATen's im2col + GEMM kernel (_slow_conv2d_backward)
// on CPU tensors instead of oneDNN's, which is slow when so few channels come out. For [100, 256, 32, 32] -> 3
// channels the input gradient took 17.5 ms against 95 ms and the weight gradient 19 ms against 55 ms with one
// thread (7.3 / 53 ms and 18 / 32 ms with two); at 16 input channels 0.61x / 0.91x (two threads 0.48x / 0.87x);
// at 32 the weight gradient is already slower (1.14x), at 64 and 128 both (1.1-1.9x). At Fashion-MNIST's first
// block (1 channel, 28 x 28 padded by 3) 0.60x / 0.63x with one thread, 0.78x / 1.09x with two
// (bench/conv_first_block.py; bench/results/conv_first_block.json, conv_first_block_2threads.json). Float64
// already ran that kernel (after the same contiguous copies), so its results are unchanged. Its weight gradient,
// like oneDNN's, varies with the thread count in the last bits; kept and recomputed steps run the same kernels, so
// they stay equal bit for bit.
constexpr int64_t kGemmConvMaxInChannels = 16;

std::tuple<Tensor, Tensor, Tensor> conv_bwd(const Tensor& gy, const Tensor& x, const Tensor& w, int64_t pad,
                                            std::array<bool, 3> mask) {
  if (x.device().is_cpu() && x.size(1) <= kGemmConvMaxInChannels)  // the kernel reads x and w as dense NCHW
    return at::_slow_conv2d_backward(gy, x.contiguous(), w.contiguous(), {w.size(2), w.size(3)}, {1, 1}, {pad, pad},
                                     mask);
  return at::convolution_backward(gy, x, w, at::OptionalIntArrayRef(at::IntArrayRef{w.size(0)}), {1, 1}, {pad, pad},
                                  {1, 1}, false, {0, 0}, 1, mask);
}

// Per block, the fused CPU path runs the convolutions of the primal and the tangent as few, wide calls:
//   forward:  conv(a, [W; Wd], [b; bd]) -> [z | zd'] (one call, 2C outputs), zd = zd' + conv(ad, W)
//   backward: convolution_backward([gz | gzd], a, [Wd; W]) -> input grad conv^T(gz, Wd) + conv^T(gzd, W) (the
//             tangent of the input gradient), weight grads [grad_W | part of its tangent], bias grads; and
//             convolution_backward(gz, ad, W) -> the primal input gradient and the rest of grad_W's tangent.
// Same arithmetic as six separate calls, but wider GEMMs and no copies: the fused loops read and write the two
// channel halves in place (BlockDims::io_bs).
// want_g = false (only with lam) skips the primal parameter gradient g: the backward sweep needs only <g, lam>,
// which is the loss's tangent <dCE/do, o_dot>, so the primal weight-gradient convolutions are not run.
//
// Kept steps (the memory budget): keep_out (primal only) collects, per block d, the forward sweep's tensors that the
// backward sweep would otherwise recompute, kKeptPerBlock of them: the conv output z_d, the block output (block
// d+1's input; the features for the last block) and the loss gradient w.r.t. block d's input (empty for d = 0:
// the input gradient of block 0 is never needed by the primal). kept_in (with lam) reuses them: the step then runs
// only the tangent's convolutions forward (conv(a, Wd) + conv(ad, W), not conv(a, W)) and, backward, skips the
// primal input gradient conv^T(gz, W) of every block but the first. The norm/activation/pooling loops and the
// small classifier layer are recomputed from z as before (cheap next to the convolutions).
StepResult step(const Spec& s, const Layout& L, const Tensor& w, const Tensor& x, const Tensor& y, const Tensor& lam,
                bool want_hw, bool want_g = true, const std::vector<Tensor>* kept_in = nullptr,
                std::vector<Tensor>* keep_out = nullptr) {
  const bool tan = lam.defined();
  TORCH_INTERNAL_ASSERT(want_g || tan, "step: want_g = false needs lam");
  TORCH_INTERNAL_ASSERT(!kept_in || (tan && !want_g), "step: kept tensors serve the backward sweep's step");
  TORCH_INTERNAL_ASSERT(!keep_out || !tan, "step: the forward sweep's step keeps its tensors");
  if (keep_out) keep_out->assign(kKeptPerBlock * s.depth, Tensor());
  const int64_t B = x.size(0);
  const BlockImpl impl = block_impl(s, x);
  const bool fused = impl != BlockImpl::kComposite;
  const int64_t Cw = s.width;
  std::vector<BlockCache> caches(s.depth);
  Tensor a = x.contiguous(), ad;  // one dense copy of a strided batch, not one per gradient call (conv_bwd)
  for (int64_t d = 0; d < s.depth; ++d) {
    const LayerLayout& l = L.layers[d];
    BlockCache& c = caches[d];
    Tensor Wc = view(w, l.conv_w), bc = view(w, l.conv_b);
    c.a = a;
    c.ad = ad;
    Tensor gam, bet, gamd, betd;
    if (s.norm != kNormNone) {
      gam = view(w, l.norm_w);
      bet = view(w, l.norm_b);
      if (tan) {
        gamd = view(lam, l.norm_w);
        betd = view(lam, l.norm_b);
      }
    }
    std::pair<Tensor, Tensor> outs;
    if (kept_in) {
      // The primal conv output from the forward sweep; only the tangent's convolutions run.
      const Tensor& z = (*kept_in)[kKeptPerBlock * d];
      Tensor zd = conv(a, view(lam, l.conv_w), view(lam, l.conv_b), l.pad);
      if (ad.defined()) zd.add_(conv(ad, Wc, c10::nullopt, l.pad));
      outs = fused ? block_forward_fused(s, impl, z, zd.contiguous(), gam, bet, gamd, betd, c)
                   : block_forward_composite(s, z, zd, gam, bet, gamd, betd, c);
      outs.first = (*kept_in)[kKeptPerBlock * d + 1];
    } else if (fused) {
      Tensor zz;
      if (tan) {
        zz = conv(a, at::cat({Wc, view(lam, l.conv_w)}, 0), at::cat({bc, view(lam, l.conv_b)}, 0), l.pad);
        if (ad.defined()) zz.narrow(1, Cw, Cw).add_(conv(ad, Wc, c10::nullopt, l.pad));
      } else {
        zz = conv(a, Wc, bc, l.pad);
      }
      zz = zz.contiguous();
      outs = tan ? block_forward_fused(s, impl, zz.narrow(1, 0, Cw), zz.narrow(1, Cw, Cw), gam, bet, gamd, betd, c)
                 : block_forward_fused(s, impl, zz, Tensor(), gam, bet, gamd, betd, c);
      if (keep_out) (*keep_out)[kKeptPerBlock * d] = zz;
    } else {
      Tensor z = conv(a, Wc, bc, l.pad);
      if (keep_out) (*keep_out)[kKeptPerBlock * d] = z;
      Tensor zd;
      if (tan) {
        zd = conv(a, view(lam, l.conv_w), view(lam, l.conv_b), l.pad);
        if (ad.defined()) zd = zd + conv(ad, Wc, c10::nullopt, l.pad);
      }
      outs = block_forward_composite(s, z, zd, gam, bet, gamd, betd, c);
    }
    a = outs.first;
    ad = outs.second;
    if (keep_out) (*keep_out)[kKeptPerBlock * d + 1] = a;
  }
  Tensor f = a.flatten(1), fd = tan ? ad.flatten(1) : Tensor();
  Tensor Wf = view(w, L.fc_w), bf = view(w, L.fc_b);
  Tensor o = at::addmm(bf, f, Wf.t());
  Tensor sm = at::softmax(o, 1);
  Tensor go = (sm - at::one_hot(y, s.classes).to(sm.scalar_type())) / static_cast<double>(B);
  std::vector<Tensor> grads, tans;  // in reverse parameter order, reversed at the end
  Tensor god, g_dot_lam;
  if (tan) {
    Tensor Wfd = view(lam, L.fc_w);
    Tensor od = at::addmm(view(lam, L.fc_b), f, Wfd.t()) + at::mm(fd, Wf.t());
    g_dot_lam = (go * od).sum();
    // Tangent of softmax - onehot: J_softmax od.
    god = sm * (od - (sm * od).sum({1}, true)) / static_cast<double>(B);
  }
  // Parameters are pushed back to front: fc_b, fc_w, then per block (reversed) norm_b, norm_w, conv_b, conv_w.
  if (want_g) {
    grads.push_back(go.sum(0));
    grads.push_back(at::mm(go.t(), f));
  }
  if (tan && want_hw) {
    tans.push_back(god.sum(0));
    tans.push_back(at::mm(god.t(), f) + at::mm(go.t(), fd));
  }
  Tensor ga = at::mm(go, Wf).view(a.sizes());
  Tensor gad = tan ? (at::mm(god, Wf) + at::mm(go, view(lam, L.fc_w))).view(a.sizes()) : Tensor();
  Tensor hx;
  for (int64_t d = s.depth - 1; d >= 0; --d) {
    const LayerLayout& l = L.layers[d];
    BlockCache& c = caches[d];
    Tensor gam, bet, gamd, betd;
    if (s.norm != kNormNone) {
      gam = view(w, l.norm_w);
      bet = view(w, l.norm_b);
      if (tan) {
        gamd = view(lam, l.norm_w);
        betd = view(lam, l.norm_b);
      }
    }
    Tensor ggam, gbet, ggamd, gbetd;
    Tensor* pgd = (tan && want_hw) ? &ggamd : nullptr;
    Tensor* pbd = (tan && want_hw) ? &gbetd : nullptr;
    Tensor Wc = view(w, l.conv_w);
    const bool need_ga = d > 0;
    const bool ga_kept = kept_in && need_ga;  // conv^T(gz, W) came from the forward sweep
    const bool run_ga = need_ga && !ga_kept;
    Tensor gW, gb, gWd, gbd, ga_next, gad_next;
    if (fused) {
      Tensor gzz = block_backward_fused(s, impl, ga, gad, gam, bet, gamd, betd, c, &ggam, &gbet, pgd, pbd);
      c.xh.reset();  // free the block's activations as soon as they are used
      c.xhd.reset();
      if (tan) {
        Tensor Wcd = view(lam, l.conv_w);
        if (want_g) {
          auto r1 = conv_bwd(gzz, c.a, at::cat({Wcd, Wc}, 0), l.pad, {true, true, true});
          gad_next = std::get<0>(r1);
          gW = std::get<1>(r1).narrow(0, 0, Cw);
          gb = std::get<2>(r1).narrow(0, 0, Cw);
          gWd = std::get<1>(r1).narrow(0, Cw, Cw);
          gbd = std::get<2>(r1).narrow(0, Cw, Cw);
        } else {
          // Input gradient of [gz | gzd] through [Wd; W] in one call; the weight gradient of gzd alone.
          gad_next = std::get<0>(conv_bwd(gzz, c.a, at::cat({Wcd, Wc}, 0), l.pad, {true, false, false}));
          if (want_hw) {
            auto rw = conv_bwd(gzz.narrow(1, Cw, Cw), c.a, Wc, l.pad, {false, true, true});
            gWd = std::get<1>(rw);
            gbd = std::get<2>(rw);
          }
        }
        if (run_ga || (want_hw && c.ad.defined())) {
          Tensor gz = gzz.narrow(1, 0, Cw);
          const bool wgrad = want_hw && c.ad.defined();
          auto r2 = conv_bwd(gz, c.ad.defined() ? c.ad : c.a, Wc, l.pad, {run_ga, wgrad, false});
          if (run_ga) ga_next = std::get<0>(r2);
          if (wgrad) gWd = gWd + std::get<1>(r2);
        }
      } else {
        auto cb = conv_bwd(gzz, c.a, Wc, l.pad, {need_ga, true, true});
        ga_next = std::get<0>(cb);
        gW = std::get<1>(cb);
        gb = std::get<2>(cb);
      }
    } else {
      auto gs = block_backward_composite(s, ga, gad, gam, gamd, c, &ggam, &gbet, pgd, pbd);
      c.xh.reset();
      const Tensor& gz = gs.first;
      const Tensor& gzd = gs.second;
      if (run_ga || want_g) {
        auto cb = conv_bwd(gz, c.a, Wc, l.pad, {run_ga, want_g, want_g});
        gW = std::get<1>(cb);
        gb = std::get<2>(cb);
        ga_next = std::get<0>(cb);
      }
      if (tan) {
        Tensor Wcd = view(lam, l.conv_w);
        // d/de of the input gradient: conv^T(gzd, W) + conv^T(gz, W_dot).
        auto t1 = conv_bwd(gzd, c.a, Wc, l.pad, {true, want_hw, want_hw});
        auto t2 = conv_bwd(gz, c.a, Wcd, l.pad, {true, false, false});
        gad_next = std::get<0>(t1) + std::get<0>(t2);
        if (want_hw) {
          gWd = std::get<1>(t1);
          gbd = std::get<2>(t1);
          if (c.ad.defined()) gWd = gWd + std::get<1>(conv_bwd(gz, c.ad, Wc, l.pad, {false, true, false}));
        }
      }
    }
    if (ga_kept) ga_next = (*kept_in)[kKeptPerBlock * d + 2];
    if (keep_out) (*keep_out)[kKeptPerBlock * d + 2] = need_ga ? ga_next : at::empty({0}, x.options());
    if (s.norm != kNormNone) {
      if (want_g) {
        grads.push_back(gbet.reshape(-1));
        grads.push_back(ggam.reshape(-1));
      }
      if (tan && want_hw) {
        tans.push_back(gbetd.reshape(-1));
        tans.push_back(ggamd.reshape(-1));
      }
    }
    if (want_g) {
      grads.push_back(gb);
      grads.push_back(gW.reshape(-1));
    }
    if (tan && want_hw) {
      tans.push_back(gbd);
      tans.push_back(gWd.reshape(-1));
    }
    if (d == 0) hx = gad_next;
    ga = ga_next;
    gad = gad_next;
  }
  StepResult r;
  if (want_g) {
    std::reverse(grads.begin(), grads.end());
    for (auto& t : grads) t = t.reshape(-1);
    r.g = at::cat(grads);
  }
  r.g_dot_lam = g_dot_lam;
  if (tan && want_hw) {
    std::reverse(tans.begin(), tans.end());
    for (auto& t : tans) t = t.reshape(-1);
    r.hw = at::cat(tans);
  }
  r.hx = hx;
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Validation: every problem becomes a RuntimeError with a message that says what is wrong (never a crash).

// The adjoint `lam` of a step op: w's shape, dtype and device, each named when it differs.
void check_lam_like_w(const char* op, const Tensor& lam, const Tensor& w) {
  HF_CHECK(lam.sizes() == w.sizes() && lam.scalar_type() == w.scalar_type() && lam.device() == w.device(), op,
           ": lam must be like w (", w.sizes(), " ", w.scalar_type(), " on ", w.device(), "), got ", lam.sizes(), " ",
           lam.scalar_type(), " on ", lam.device());
}

Layout check_inputs(const Spec& s, const Tensor& X, const Tensor& Y, const Tensor& w_start, const Tensor& w_target,
                    const Tensor& lr, bool check_values) {
  HF_CHECK(X.dim() == 5, "trajectory_match: X must be [N, B, C, H, W] (one batch per unrolled step), got ",
              X.dim(), "-d shape ", X.sizes());
  HF_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble,
              "trajectory_match: X must be float32 or float64, got ", X.scalar_type());
  HF_CHECK(X.size(0) >= 1 && X.size(1) >= 1, "trajectory_match: X needs at least one step and one sample, got ",
              X.sizes());
  HF_CHECK(X.size(2) == s.channel, "trajectory_match: X has ", X.size(2), " channels but the model spec has ",
              s.channel);
  HF_CHECK(Y.dim() == 2 && Y.size(0) == X.size(0) && Y.size(1) == X.size(1),
              "trajectory_match: Y must be [N, B] = [", X.size(0), ", ", X.size(1), "] to match X, got ", Y.sizes());
  HF_CHECK(Y.scalar_type() == at::kLong, "trajectory_match: Y must be int64 labels, got ", Y.scalar_type());
  for (auto* t : {&w_start, &w_target, &lr, &Y}) {
    HF_CHECK(t->device() == X.device(), "trajectory_match: all inputs must be on one device: X is on ", X.device(),
                " but another input is on ", t->device());
  }
  for (auto* t : {&w_start, &w_target, &lr}) {
    HF_CHECK(t->scalar_type() == X.scalar_type(), "trajectory_match: w_start, w_target and lr must have X's dtype (",
                X.scalar_type(), "), got ", t->scalar_type());
  }
  HF_CHECK(lr.dim() == 0, "trajectory_match: lr must be a 0-dim tensor, got shape ", lr.sizes());
  Layout L = make_layout(s, X.size(3), X.size(4));
  HF_CHECK(w_start.dim() == 1 && w_start.size(0) == L.P, "trajectory_match: w_start must be a flat vector of P = ",
              L.P, " parameters for this model spec and a ", X.size(3), "x", X.size(4), " input, got shape ",
              w_start.sizes());
  HF_CHECK(w_target.dim() == 1 && w_target.size(0) == L.P,
              "trajectory_match: w_target must be a flat vector of P = ", L.P, " parameters, got shape ",
              w_target.sizes());
  if (check_values) {
    // One host read for all the value checks (on CUDA each read is a device sync, and the per-step ops run these
    // checks every step); only when one fails are they read one by one, for the message.
    auto mm = at::aminmax(Y);
    Tensor ok = at::stack({std::get<0>(mm) >= 0, std::get<1>(mm) < s.classes, at::isfinite(X).all(),
                           at::isfinite(w_start).all(), at::isfinite(w_target).all(), at::isfinite(lr).all()})
                    .all();
    if (!ok.item<bool>()) {
      int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
      HF_CHECK(lo >= 0 && hi < s.classes, "trajectory_match: labels must be in [0, ", s.classes,
               "), got values in [", lo, ", ", hi, "]");
      HF_CHECK(at::isfinite(X).all().item<bool>(), "trajectory_match: X contains NaN or Inf");
      HF_CHECK(at::isfinite(w_start).all().item<bool>() && at::isfinite(w_target).all().item<bool>(),
               "trajectory_match: w_start or w_target contains NaN or Inf");
      HF_CHECK(at::isfinite(lr).item<bool>(), "trajectory_match: lr is NaN or Inf");
    }
  }
  return L;
}

std::tuple<Tensor, Tensor> trajectory_match_forward(const Tensor& X, const Tensor& Y, const Tensor& w_start,
                                                    const Tensor& w_target, const Tensor& lr, at::IntArrayRef spec,
                                                    bool first_order) {
  (void)first_order;
  Spec s = parse_spec(spec);
  Layout L = check_inputs(s, X, Y, w_start, w_target, lr, true);
  const int64_t N = X.size(0);
  Tensor denom = (w_start - w_target).pow(2).sum();
  HF_CHECK(denom.item<double>() > 0.0,
              "trajectory_match: w_start equals w_target (distance 0): the expert snapshots are identical; the buffer "
              "is broken (see haba_fast.trajectory.normalized_distance)");
  Tensor Wt = at::empty({N + 1, L.P}, w_start.options());
  Wt[0].copy_(w_start);
  at::NoGradGuard no_grad;
  std::optional<haba_fast::BufferCacheScope> reuse_buffers;  // every step allocates the same activations
  if (X.is_cpu()) reuse_buffers.emplace();
  for (int64_t t = 0; t < N; ++t) {
    Tensor w = Wt[t];
    StepResult r = step(s, L, w, X[t], Y[t], Tensor(), false);
    Tensor next = Wt[t + 1];
    at::sub_out(next, w, r.g * lr);
  }
  Tensor loss = (Wt[N] - w_target).pow(2).sum() / denom;
  return {loss, Wt};
}

std::tuple<Tensor, Tensor> trajectory_match_backward(const Tensor& grad, const Tensor& X, const Tensor& Y,
                                                     const Tensor& Wt, const Tensor& w_target, const Tensor& lr,
                                                     at::IntArrayRef spec, bool first_order) {
  Spec s = parse_spec(spec);
  HF_CHECK(Wt.dim() == 2 && Wt.size(0) == X.size(0) + 1,
              "trajectory_match_backward: W must be [N+1, P] (the stored trajectory), got ", Wt.sizes());
  Tensor w_start = Wt[0];
  Layout L = check_inputs(s, X, Y, w_start, w_target, lr, false);
  const int64_t N = X.size(0);
  at::NoGradGuard no_grad;
  std::optional<haba_fast::BufferCacheScope> reuse_buffers;  // every step allocates the same activations
  if (X.is_cpu()) reuse_buffers.emplace();
  Tensor denom = (w_start - w_target).pow(2).sum();
  Tensor lam = (Wt[N] - w_target) * (2.0 * grad.to(X.scalar_type()) / denom);
  Tensor dX = at::empty_like(X);
  Tensor dlr = at::zeros({}, lr.options());
  for (int64_t t = N - 1; t >= 0; --t) {
    StepResult r = step(s, L, Wt[t], X[t], Y[t], lam, !first_order, /*want_g=*/false);
    dX[t].copy_(r.hx * (-lr));
    dlr -= r.g_dot_lam;
    if (!first_order) lam = lam - lr * r.hw;
  }
  return {dX, dlr};
}

std::tuple<Tensor, Tensor, Tensor> trajectory_step_hvp(const Tensor& w, const Tensor& x, const Tensor& y,
                                                       const Tensor& lam, at::IntArrayRef spec) {
  Spec s = parse_spec(spec);
  HF_CHECK(x.dim() == 4, "trajectory_step_hvp: x must be [B, C, H, W], got ", x.sizes());
  Layout L = check_inputs(s, x.unsqueeze(0), y.unsqueeze(0), w, w, w.new_zeros({}), true);
  check_lam_like_w("trajectory_step_hvp", lam, w);
  at::NoGradGuard no_grad;
  StepResult r = step(s, L, w, x, y, lam, true);
  return {r.g, r.hw, r.hx};
}

// One step of the streamed engine (haba_fast/engines/adjoint.py builds each step's batch on demand, so X never
// exists as one [N, B, C, H, W] tensor): the forward sweep's g_t, and the backward sweep's adjoint step.
// check_values=false skips the value checks (labels in range, finite x and w), whose host read is a device sync on
// CUDA: for callers that checked them once per unroll (the step plan on the host); shapes are checked always.
Tensor trajectory_step_grad(const Tensor& w, const Tensor& x, const Tensor& y, at::IntArrayRef spec,
                            bool check_values) {
  Spec s = parse_spec(spec);
  HF_CHECK(x.dim() == 4, "trajectory_step_grad: x must be [B, C, H, W], got ", x.dim(), "-d shape ", x.sizes());
  HF_CHECK(y.dim() == 1, "trajectory_step_grad: y must be [B], got ", y.dim(), "-d shape ", y.sizes());
  Layout L = check_inputs(s, x.unsqueeze(0), y.unsqueeze(0), w, w, w.new_zeros({}), check_values);
  at::NoGradGuard no_grad;
  std::optional<haba_fast::BufferCacheScope> reuse_buffers;
  if (x.is_cpu()) reuse_buffers.emplace();
  return step(s, L, w, x, y, Tensor(), false).g;
}

// (<g_t, lam>, h_w, h_x) without the primal weight gradient (as trajectory_match_backward's steps); h_w is a
// zero-size tensor when want_hw is false (first-order).
std::tuple<Tensor, Tensor, Tensor> trajectory_step_adjoint(const Tensor& w, const Tensor& x, const Tensor& y,
                                                           const Tensor& lam, at::IntArrayRef spec, bool want_hw) {
  Spec s = parse_spec(spec);
  HF_CHECK(x.dim() == 4, "trajectory_step_adjoint: x must be [B, C, H, W], got ", x.dim(), "-d shape ", x.sizes());
  HF_CHECK(y.dim() == 1, "trajectory_step_adjoint: y must be [B], got ", y.dim(), "-d shape ", y.sizes());
  Layout L = check_inputs(s, x.unsqueeze(0), y.unsqueeze(0), w, w, w.new_zeros({}), false);
  check_lam_like_w("trajectory_step_adjoint", lam, w);
  at::NoGradGuard no_grad;
  std::optional<haba_fast::BufferCacheScope> reuse_buffers;
  if (x.is_cpu()) reuse_buffers.emplace();
  StepResult r = step(s, L, w, x, y, lam, want_hw, /*want_g=*/false);
  Tensor hw = want_hw ? r.hw : w.new_empty({0});
  return {r.g_dot_lam, hw, r.hx};
}

// The forward sweep's step of a kept step: g and the tensors its backward step reuses (see step(): per block, the
// conv output, the block output and the gradient w.r.t. the block input, empty for block 0), 3 * depth tensors.
std::tuple<Tensor, std::vector<Tensor>> trajectory_step_grad_keep(const Tensor& w, const Tensor& x, const Tensor& y,
                                                                  at::IntArrayRef spec, bool check_values) {
  Spec s = parse_spec(spec);
  HF_CHECK(x.dim() == 4, "trajectory_step_grad_keep: x must be [B, C, H, W], got ", x.dim(), "-d shape ", x.sizes());
  HF_CHECK(y.dim() == 1, "trajectory_step_grad_keep: y must be [B], got ", y.dim(), "-d shape ", y.sizes());
  Layout L = check_inputs(s, x.unsqueeze(0), y.unsqueeze(0), w, w, w.new_zeros({}), check_values);
  at::NoGradGuard no_grad;
  std::optional<haba_fast::BufferCacheScope> reuse_buffers;
  if (x.is_cpu()) reuse_buffers.emplace();
  std::vector<Tensor> kept;
  StepResult r = step(s, L, w, x, y, Tensor(), false, true, nullptr, &kept);
  return {r.g, kept};
}

// The kept list must be what trajectory_step_grad_keep returned for this spec and batch shape.
std::vector<Tensor> check_kept(const Spec& s, const Layout& L, const Tensor& x, const std::vector<Tensor>& kept) {
  HF_CHECK(static_cast<int64_t>(kept.size()) == kKeptPerBlock * s.depth, "trajectory_step_adjoint_kept: kept must be ",
           kKeptPerBlock * s.depth, " tensors (trajectory_step_grad_keep's list for depth ", s.depth, "), got ",
           kept.size());
  std::vector<Tensor> out;
  int64_t H = x.size(2), W = x.size(3);
  std::vector<int64_t> prev_out = x.sizes().vec();
  for (int64_t d = 0; d < s.depth; ++d) {
    const LayerLayout& l = L.layers[d];
    H = l.Hc;
    W = l.Wc;
    std::vector<int64_t> zshape{x.size(0), s.width, H, W};
    if (s.pool != kPoolNone) {
      H /= 2;
      W /= 2;
    }
    std::vector<int64_t> oshape{x.size(0), s.width, H, W};
    const Tensor* ts[3] = {&kept[kKeptPerBlock * d], &kept[kKeptPerBlock * d + 1], &kept[kKeptPerBlock * d + 2]};
    for (const Tensor* t : ts) {
      HF_CHECK(t->defined() && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
               "trajectory_step_adjoint_kept: kept tensors must have x's dtype and device");
    }
    HF_CHECK(ts[0]->sizes() == at::IntArrayRef(zshape) && ts[1]->sizes() == at::IntArrayRef(oshape) &&
                 (d == 0 ? ts[2]->numel() == 0 : ts[2]->sizes() == at::IntArrayRef(prev_out)),
             "trajectory_step_adjoint_kept: kept tensors of block ", d + 1, " do not match this spec and batch (",
             "conv output ", ts[0]->sizes(), ", block output ", ts[1]->sizes(), ", input gradient ", ts[2]->sizes(),
             "); pass the list trajectory_step_grad_keep returned for this step");
    out.push_back(ts[0]->contiguous());
    out.push_back(*ts[1]);
    out.push_back(*ts[2]);
    prev_out = oshape;
  }
  return out;
}

// trajectory_step_adjoint for a kept step: same results, fewer convolutions (see step()).
std::tuple<Tensor, Tensor, Tensor> trajectory_step_adjoint_kept(const Tensor& w, const Tensor& x, const Tensor& y,
                                                                const Tensor& lam, at::TensorList kept,
                                                                at::IntArrayRef spec, bool want_hw) {
  Spec s = parse_spec(spec);
  HF_CHECK(x.dim() == 4, "trajectory_step_adjoint_kept: x must be [B, C, H, W], got ", x.dim(), "-d shape ",
           x.sizes());
  HF_CHECK(y.dim() == 1, "trajectory_step_adjoint_kept: y must be [B], got ", y.dim(), "-d shape ", y.sizes());
  Layout L = check_inputs(s, x.unsqueeze(0), y.unsqueeze(0), w, w, w.new_zeros({}), false);
  check_lam_like_w("trajectory_step_adjoint_kept", lam, w);
  std::vector<Tensor> k = check_kept(s, L, x, kept.vec());
  at::NoGradGuard no_grad;
  std::optional<haba_fast::BufferCacheScope> reuse_buffers;
  if (x.is_cpu()) reuse_buffers.emplace();
  StepResult r = step(s, L, w, x, y, lam, want_hw, /*want_g=*/false, &k);
  Tensor hw = want_hw ? r.hw : w.new_empty({0});
  return {r.g_dot_lam, hw, r.hx};
}

Tensor trajectory_match_composite(const Tensor& X, const Tensor& Y, const Tensor& w_start, const Tensor& w_target,
                                  const Tensor& lr, at::IntArrayRef spec, bool first_order) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("haba_fast::trajectory_match_forward", "")
                       .typed<decltype(trajectory_match_forward)>();
  return std::get<0>(op.call(X, Y, w_start, w_target, lr, spec, first_order));
}

// ---------------------------------------------------------------------------------------------------------------
// Meta kernels (shapes only) for fake-tensor tracing / torch.compile / opcheck.

std::tuple<Tensor, Tensor> trajectory_match_forward_meta(const Tensor& X, const Tensor& Y, const Tensor& w_start,
                                                         const Tensor& w_target, const Tensor& lr,
                                                         at::IntArrayRef spec, bool first_order) {
  return {at::empty({}, X.options()), at::empty({X.size(0) + 1, w_start.size(0)}, w_start.options())};
}

std::tuple<Tensor, Tensor> trajectory_match_backward_meta(const Tensor& grad, const Tensor& X, const Tensor& Y,
                                                          const Tensor& Wt, const Tensor& w_target, const Tensor& lr,
                                                          at::IntArrayRef spec, bool first_order) {
  return {at::empty_like(X), at::empty({}, lr.options())};
}

// ---------------------------------------------------------------------------------------------------------------
// Autograd: saves the trajectory W (N+1 flat vectors), never an activation.

class TrajectoryMatchFunction : public torch::autograd::Function<TrajectoryMatchFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& X, const Tensor& Y, const Tensor& w_start,
                        const Tensor& w_target, const Tensor& lr, std::vector<int64_t> spec, bool first_order) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("haba_fast::trajectory_match_forward", "")
                         .typed<decltype(trajectory_match_forward)>();
    auto out = op.call(X, Y, w_start, w_target, lr, spec, first_order);
    ctx->save_for_backward({X, Y, std::get<1>(out), w_target, lr});
    ctx->saved_data["spec"] = spec;
    ctx->saved_data["first_order"] = first_order;
    return std::get<0>(out);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto spec = ctx->saved_data["spec"].toIntVector();
    bool first_order = ctx->saved_data["first_order"].toBool();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("haba_fast::trajectory_match_backward", "")
                         .typed<decltype(trajectory_match_backward)>();
    auto out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], spec, first_order);
    // w_start and w_target are constants of the objective (as in the naive engine): no gradient.
    return {std::get<0>(out), Tensor(), Tensor(), Tensor(), std::get<1>(out), Tensor(), Tensor()};
  }
};

Tensor trajectory_match_autograd(const Tensor& X, const Tensor& Y, const Tensor& w_start, const Tensor& w_target,
                                 const Tensor& lr, at::IntArrayRef spec, bool first_order) {
  return TrajectoryMatchFunction::apply(X, Y, w_start, w_target, lr, spec.vec(), first_order);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(haba_fast, m) {
  m.def("trajectory_match(Tensor X, Tensor Y, Tensor w_start, Tensor w_target, Tensor lr, int[] spec, "
        "bool first_order) -> Tensor");
  m.def("trajectory_match_forward(Tensor X, Tensor Y, Tensor w_start, Tensor w_target, Tensor lr, int[] spec, "
        "bool first_order) -> (Tensor, Tensor)");
  m.def("trajectory_match_backward(Tensor grad, Tensor X, Tensor Y, Tensor W, Tensor w_target, Tensor lr, "
        "int[] spec, bool first_order) -> (Tensor, Tensor)");
  m.def("trajectory_step_hvp(Tensor w, Tensor x, Tensor y, Tensor lam, int[] spec) -> (Tensor, Tensor, Tensor)");
  m.def("trajectory_step_grad(Tensor w, Tensor x, Tensor y, int[] spec, bool check_values=True) -> Tensor");
  m.def("trajectory_step_adjoint(Tensor w, Tensor x, Tensor y, Tensor lam, int[] spec, bool want_hw) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("trajectory_step_grad_keep(Tensor w, Tensor x, Tensor y, int[] spec, bool check_values=True) -> "
        "(Tensor, Tensor[])");
  m.def("trajectory_step_adjoint_kept(Tensor w, Tensor x, Tensor y, Tensor lam, Tensor[] kept, int[] spec, "
        "bool want_hw) -> (Tensor, Tensor, Tensor)");
  // One block's norm -> activation -> pooling with its tangent, forward and back (the fused CPU loops' contract):
  // schemas only; the implementations are the Triton kernels, registered from Python (see block_impl).
  m.def("trajectory_block_forward_kernel(Tensor z, Tensor? zd, Tensor? gam, Tensor? bet, Tensor? gamd, "
        "Tensor? betd, int act, bool pool, Tensor(a!) out, Tensor(b!)? outd, Tensor(c!) xh, Tensor(d!)? xhd, "
        "Tensor(e!) rstd, Tensor(f!) k) -> ()");
  m.def("trajectory_block_backward_kernel(Tensor ga, Tensor? gad, Tensor xh, Tensor? xhd, Tensor rstd, Tensor k, "
        "Tensor? gam, Tensor? bet, Tensor? gamd, Tensor? betd, int act, bool pool, Tensor(a!) gzz, "
        "Tensor(b!)? part) -> ()");
}

TORCH_LIBRARY_IMPL(haba_fast, CompositeExplicitAutograd, m) {
  m.impl("trajectory_match", &trajectory_match_composite);
  m.impl("trajectory_match_forward", &trajectory_match_forward);
  m.impl("trajectory_match_backward", &trajectory_match_backward);
  m.impl("trajectory_step_hvp", &trajectory_step_hvp);
  m.impl("trajectory_step_grad", &trajectory_step_grad);
  m.impl("trajectory_step_adjoint", &trajectory_step_adjoint);
  m.impl("trajectory_step_grad_keep", &trajectory_step_grad_keep);
  m.impl("trajectory_step_adjoint_kept", &trajectory_step_adjoint_kept);
}

TORCH_LIBRARY_IMPL(haba_fast, Meta, m) {
  m.impl("trajectory_match_forward", &trajectory_match_forward_meta);
  m.impl("trajectory_match_backward", &trajectory_match_backward_meta);
}

TORCH_LIBRARY_IMPL(haba_fast, Autograd, m) { m.impl("trajectory_match", &trajectory_match_autograd); }

}  // namespace haba_fast
