// Fused generation (basis -> hallucinated sample) and DSA augmentation on the CPU, forward and backward.
//
// Ops (torch.ops.haba_fast.*; autograd, fake tensors and input validation are wired in haba_fast/ops.py):
//   generate(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx) -> out
//   generate_backward(grad, <generate inputs minus dec_bias>, need_bases, need_hall) -> 7 grads
//   augment(x, family, fparams, iparams) -> out            augment_backward(grad, family, fparams, iparams)
//   generate_augment(<generate inputs>, family, fparams, iparams) -> out   (+ generate_augment_backward)
// Shapes: see haba_fast/_reference.py; kernel codes and fparams/iparams meaning: csrc/genaug_types.h
// (each family's `encode` in haba_fast/aug_families.py writes them).
//
// Parallelism: at::parallel_for over samples; each sample's work is independent (genaug_kernels.h). Gradients of
// shared tensors (bases rows, hallucinator parameters) are written as per-sample partial rows first, then summed
// per segment (basis or hallucinator) in a second pass parallel over elements: no atomics, no hot spot, and the
// result does not depend on the thread count (deterministic). A gradient that is not needed is returned as an
// empty tensor of shape [0].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "check.h"
#include "cpu_isa.h"
#include "genaug_types.h"

// Two copies of the per-sample kernels: the baseline ISA of the build, and AVX2+FMA chosen at run time.
#define GENAUG_NS genaug
#include "genaug_kernels.h"
#undef GENAUG_NS
#ifdef HABA_FAST_HAVE_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GENAUG_NS genaug_avx2
#include "genaug_kernels.h"
#undef GENAUG_NS
#pragma GCC pop_options
#endif

namespace haba_fast {
namespace {

using genaug_types::AugDims;
using genaug_types::GenDims;
using genaug_types::HallLayout;

#ifdef HABA_FAST_HAVE_ISA_COPIES
#define GENAUG_CALL(avx2, fn, ...) ((avx2) ? ::haba_fast::genaug_avx2::fn(__VA_ARGS__) : ::haba_fast::genaug::fn(__VA_ARGS__))
#else
#define GENAUG_CALL(avx2, fn, ...) ::haba_fast::genaug::fn(__VA_ARGS__)
#endif

struct GenArgs {
  at::Tensor bases, ew, eb, sc, sh, dw, db, bidx, hidx;
};

GenDims gen_dims(const GenArgs& g) {
  GenDims d;
  d.cb = g.bases.size(1);
  d.H = g.bases.size(2);
  d.W = g.bases.size(3);
  d.C = g.ew.size(1);
  d.K = g.ew.size(3);
  d.Ho = d.H - d.K + 1;
  d.Wo = d.W - d.K + 1;
  return d;
}

void check_index(const at::Tensor& idx, int64_t limit, const char* what) {
  HF_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, what, " must be a 1-d int64 tensor");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    HF_CHECK(p[i] >= 0 && p[i] < limit, what, "[", i, "] = ", p[i], " is out of range [0, ", limit, ")");
}

// Contiguous copies (no-ops when already contiguous) + the checks that protect memory safety. Friendly errors
// are raised earlier in Python; these only guard direct calls of torch.ops.haba_fast.*.
GenArgs prepare(const at::Tensor& bases, const at::Tensor& ew, const at::Tensor& eb, const at::Tensor& sc,
                const at::Tensor& sh, const at::Tensor& dw, const at::Tensor& db, const at::Tensor& bidx,
                const at::Tensor& hidx) {
  HF_CHECK(bases.device().is_cpu(), "haba_fast::generate (cpu) needs CPU tensors");
  HF_CHECK(bases.dim() == 4 && ew.dim() == 5 && eb.dim() == 2 && sc.dim() == 4 && sh.dim() == 4 && dw.dim() == 5 &&
                  db.dim() == 2,
              "haba_fast::generate: bad ranks (bases 4-d, enc_weight 5-d, enc_bias 2-d, scale/shift 4-d, "
              "dec_weight 5-d, dec_bias 2-d)");
  const int64_t Hn = ew.size(0), C = ew.size(1), cb = bases.size(1), K = ew.size(3);
  const int64_t Ho = bases.size(2) - K + 1, Wo = bases.size(3) - K + 1;
  HF_CHECK(Ho >= 1 && Wo >= 1, "haba_fast::generate: kernel larger than the image");
  HF_CHECK(ew.sizes() == at::IntArrayRef({Hn, C, cb, K, K}), "enc_weight shape mismatch");
  HF_CHECK(eb.sizes() == at::IntArrayRef({Hn, C}), "enc_bias shape mismatch");
  HF_CHECK(sc.sizes() == at::IntArrayRef({Hn, C, Ho, Wo}), "scale shape mismatch");
  HF_CHECK(sh.sizes() == at::IntArrayRef({Hn, C, Ho, Wo}), "shift shape mismatch");
  HF_CHECK(dw.sizes() == at::IntArrayRef({Hn, C, C, K, K}), "dec_weight shape mismatch");
  HF_CHECK(db.sizes() == at::IntArrayRef({Hn, C}), "dec_bias shape mismatch");
  const auto dt = bases.scalar_type();
  for (const at::Tensor* t : {&ew, &eb, &sc, &sh, &dw, &db})
    HF_CHECK(t->scalar_type() == dt && t->device().is_cpu(), "haba_fast::generate: all tensors must share dtype/device");
  HF_CHECK(bidx.numel() == hidx.numel(), "base_idx and hall_idx must have the same length");
  GenArgs g{bases.contiguous(), ew.contiguous(), eb.contiguous(), sc.contiguous(), sh.contiguous(),
            dw.contiguous(), db.contiguous(), bidx.contiguous(), hidx.contiguous()};
  check_index(g.bidx, bases.size(0), "base_idx");
  check_index(g.hidx, Hn, "hall_idx");
  return g;
}

struct AugArgs {
  int64_t family;
  at::Tensor fp, ip;  // [n, 4] dtype of x, [n, 4] int64
};

AugArgs prepare_aug(int64_t family, const at::Tensor& fp, const at::Tensor& ip, int64_t n, at::ScalarType dt) {
  HF_CHECK(family >= genaug_types::kIdentity && family <= genaug_types::kAffine, "unknown augmentation family code ", family);
  HF_CHECK(fp.dim() == 2 && fp.size(0) == n && fp.size(1) == 4 && fp.scalar_type() == dt,
              "fparams must be [n, 4] with the dtype of x");
  HF_CHECK(ip.dim() == 2 && ip.size(0) == n && ip.size(1) == 4 && ip.scalar_type() == at::kLong,
              "iparams must be [n, 4] int64");
  HF_CHECK(fp.device().is_cpu() && ip.device().is_cpu(), "fparams and iparams must be CPU tensors");
  AugArgs a{family, fp.contiguous(), ip.contiguous()};
  // The kernels turn these into indices: NaN/Inf coefficients (affine) or shifts near the int64 limits (crop)
  // would overflow that arithmetic. haba_fast.ops never sends them (it clamps shifts to the image size and refuses
  // non-finite parameters); these checks guard direct calls.
  if (family == genaug_types::kAffine && n > 0)
    HF_CHECK(at::isfinite(a.fp).all().item<bool>(), "fparams of the affine family must be finite (NaN or Inf found)");
  if (family == genaug_types::kCrop && n > 0) {
    const int64_t* p = a.ip.data_ptr<int64_t>();
    constexpr int64_t kMaxShift = int64_t(1) << 40;
    for (int64_t s = 0; s < n; ++s)
      HF_CHECK(p[4 * s] > -kMaxShift && p[4 * s] < kMaxShift && p[4 * s + 1] > -kMaxShift && p[4 * s + 1] < kMaxShift,
               "crop shifts must lie in (-2^40, 2^40), got (", p[4 * s], ", ", p[4 * s + 1], ") for sample ", s);
  }
  return a;
}

// out[g, :] = sum over samples s with seg[s] == g of part[s, :]  (out pre-zeroed). Two-stage reduction, stage 2.
template <typename T>
void segment_sum(const T* part, int64_t n, int64_t P, const int64_t* seg, int64_t S, T* out) {
  std::vector<int64_t> start(S + 1, 0), order(n);
  for (int64_t s = 0; s < n; ++s) ++start[seg[s] + 1];
  for (int64_t g = 0; g < S; ++g) start[g + 1] += start[g];
  {
    std::vector<int64_t> cur(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < n; ++s) order[cur[seg[s]]++] = s;  // stable: ascending sample order per segment
  }
  at::parallel_for(0, P, 4096, [&](int64_t b, int64_t e) {
    for (int64_t g = 0; g < S; ++g) {
      T* o = out + g * P;
      for (int64_t k = start[g]; k < start[g + 1]; ++k) {
        const T* r = part + order[k] * P;
#pragma omp simd
        for (int64_t p = b; p < e; ++p) o[p] += r[p];
      }
    }
  });
}

// Forward of generate (family < 0) or generate followed by one augmentation family, fused per sample.
template <typename T>
void genaug_forward(const GenArgs& g, const AugArgs* aug, at::Tensor& out) {
  const GenDims d = gen_dims(g);
  const int64_t n = g.bidx.numel(), CHW = d.C * d.H * d.W, HW = d.H * d.W, nz = d.C * d.Ho * d.Wo;
  const int64_t cbHW = d.cb * HW, nzw = d.C * d.Ho * d.W;
  const T *x = g.bases.data_ptr<T>(), *ew = g.ew.data_ptr<T>(), *eb = g.eb.data_ptr<T>(), *sc = g.sc.data_ptr<T>(),
          *sh = g.sh.data_ptr<T>(), *dw = g.dw.data_ptr<T>(), *db = g.db.data_ptr<T>();
  const int64_t *bi = g.bidx.data_ptr<int64_t>(), *hi = g.hidx.data_ptr<int64_t>();
  const bool fused = aug != nullptr && aug->family != genaug_types::kIdentity;
  const bool avx2 = use_avx2_kernels();
  const T* fp = aug ? aug->fp.data_ptr<T>() : nullptr;
  const int64_t* ip = aug ? aug->ip.data_ptr<int64_t>() : nullptr;
  T* y = out.data_ptr<T>();
  const int64_t nwC = d.C * d.cb * d.K * d.K, ndC = d.C * d.C * d.K * d.K;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::vector<T> zbuf(nzw), abuf(nzw), gen(fused ? CHW : 0), wt(fused ? 4 * HW : 0);
    std::vector<int64_t> idx(fused ? 4 * HW : 0);
    for (int64_t s = b; s < e; ++s) {
      const int64_t h = hi[s];
      T* dst = fused ? gen.data() : y + s * CHW;
      GENAUG_CALL(avx2, generate_sample, d, x + bi[s] * cbHW, ew + h * nwC, eb + h * d.C, sc + h * nz, sh + h * nz,
                              dw + h * ndC, db + h * d.C, zbuf.data(), abuf.data(), dst);
      if (fused)
        GENAUG_CALL(avx2, augment_sample, AugDims{d.C, d.H, d.W}, aug->family, fp + s * 4, ip + s * 4, gen.data(),
                    y + s * CHW, false, idx.data(), wt.data());
    }
  });
}

template <typename T>
std::vector<at::Tensor> genaug_backward(const at::Tensor& grad_in, const GenArgs& g, const AugArgs* aug,
                                        bool need_bases, bool need_hall) {
  const GenDims d = gen_dims(g);
  const HallLayout L(d);
  const int64_t n = g.bidx.numel(), M = g.bases.size(0), Hn = g.ew.size(0);
  const int64_t CHW = d.C * d.H * d.W, HW = d.H * d.W, nz = d.C * d.Ho * d.Wo, cbHW = d.cb * HW;
  const int64_t nzw = d.C * d.Ho * d.W;
  const int64_t nwC = d.C * d.cb * d.K * d.K, ndC = d.C * d.C * d.K * d.K;
  at::Tensor grad = grad_in.contiguous();
  const T *gyp = grad.data_ptr<T>(), *x = g.bases.data_ptr<T>(), *ew = g.ew.data_ptr<T>(), *eb = g.eb.data_ptr<T>(),
          *sc = g.sc.data_ptr<T>(), *sh = g.sh.data_ptr<T>(), *dw = g.dw.data_ptr<T>();
  const int64_t *bi = g.bidx.data_ptr<int64_t>(), *hi = g.hidx.data_ptr<int64_t>();
  const bool fused = aug != nullptr && aug->family != genaug_types::kIdentity;
  const bool avx2 = use_avx2_kernels();
  const T* fp = aug ? aug->fp.data_ptr<T>() : nullptr;
  const int64_t* ip = aug ? aug->ip.data_ptr<int64_t>() : nullptr;
  auto opts = g.bases.options();
  // Stage 1: per-sample partial gradients (rows), in parallel over samples.
  at::Tensor hpart = need_hall ? at::empty({n, L.total}, opts) : at::Tensor();
  at::Tensor bpart = need_bases ? at::empty({n, cbHW}, opts) : at::Tensor();
  T* hp = need_hall ? hpart.data_ptr<T>() : nullptr;
  T* bp = need_bases ? bpart.data_ptr<T>() : nullptr;
  if (need_hall || need_bases) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      std::vector<T> z(nzw), a(nzw), ga(nzw), gz(nzw), gy(fused ? CHW : 0), wt(fused ? 4 * HW : 0);
      std::vector<int64_t> idx(fused ? 4 * HW : 0);
      for (int64_t s = b; s < e; ++s) {
        const int64_t h = hi[s];
        const T* gys = gyp + s * CHW;
        if (fused) {
          GENAUG_CALL(avx2, augment_sample, AugDims{d.C, d.H, d.W}, aug->family, fp + s * 4, ip + s * 4, gys,
                      gy.data(), true, idx.data(), wt.data());
          gys = gy.data();
        }
        GENAUG_CALL(avx2, generate_sample_backward, d, x + bi[s] * cbHW, ew + h * nwC, eb + h * d.C, sc + h * nz,
                    sh + h * nz, dw + h * ndC, gys, z.data(), a.data(), ga.data(), gz.data(),
                    hp ? hp + s * L.total : nullptr, bp ? bp + s * cbHW : nullptr);
      }
    });
  }
  // Stage 2: segmented sums (by basis row, by hallucinator).
  at::Tensor empty = at::empty({0}, opts);
  at::Tensor gbases = empty;
  if (need_bases) {
    gbases = at::zeros({M, d.cb, d.H, d.W}, opts);
    segment_sum<T>(bp, n, cbHW, bi, M, gbases.data_ptr<T>());
  }
  std::vector<at::Tensor> res{gbases};
  if (need_hall) {
    at::Tensor hall = at::zeros({Hn, L.total}, opts);
    segment_sum<T>(hp, n, L.total, hi, Hn, hall.data_ptr<T>());
    auto piece = [&](int64_t off, int64_t len, at::IntArrayRef shape) {
      // clone: with Hn == 1 a narrowed slice is already contiguous, and outputs of an op may not alias
      return hall.narrow(1, off, len).clone(at::MemoryFormat::Contiguous).view(shape);
    };
    res.push_back(piece(L.ew, L.eb - L.ew, {Hn, d.C, d.cb, d.K, d.K}));
    res.push_back(piece(L.eb, d.C, {Hn, d.C}));
    res.push_back(piece(L.scale, nz, {Hn, d.C, d.Ho, d.Wo}));
    res.push_back(piece(L.shift, nz, {Hn, d.C, d.Ho, d.Wo}));
    res.push_back(piece(L.dw, L.db - L.dw, {Hn, d.C, d.C, d.K, d.K}));
    res.push_back(piece(L.db, d.C, {Hn, d.C}));
  } else {
    for (int i = 0; i < 6; ++i) res.push_back(at::empty({0}, opts));
  }
  return res;
}

at::Tensor generate_cpu(const at::Tensor& bases, const at::Tensor& ew, const at::Tensor& eb, const at::Tensor& sc,
                        const at::Tensor& sh, const at::Tensor& dw, const at::Tensor& db, const at::Tensor& bidx,
                        const at::Tensor& hidx) {
  GenArgs g = prepare(bases, ew, eb, sc, sh, dw, db, bidx, hidx);
  at::Tensor out = at::empty({bidx.numel(), ew.size(1), bases.size(2), bases.size(3)}, bases.options());
  AT_DISPATCH_FLOATING_TYPES(bases.scalar_type(), "haba_fast::generate", [&] { genaug_forward<scalar_t>(g, nullptr, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> to_tuple7(
    const std::vector<at::Tensor>& r) {
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> generate_backward_cpu(
    const at::Tensor& grad, const at::Tensor& bases, const at::Tensor& ew, const at::Tensor& eb, const at::Tensor& sc,
    const at::Tensor& sh, const at::Tensor& dw, const at::Tensor& bidx, const at::Tensor& hidx, bool need_bases,
    bool need_hall) {
  at::Tensor db = at::empty({ew.size(0), ew.size(1)}, bases.options());  // unused by the backward
  GenArgs g = prepare(bases, ew, eb, sc, sh, dw, db, bidx, hidx);
  HF_CHECK(grad.sizes() == at::IntArrayRef({bidx.numel(), ew.size(1), bases.size(2), bases.size(3)}) &&
                  grad.scalar_type() == bases.scalar_type(),
              "generate_backward: grad must be [n, C, H, W] with the dtype of bases");
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(bases.scalar_type(), "haba_fast::generate_backward",
                             [&] { r = genaug_backward<scalar_t>(grad, g, nullptr, need_bases, need_hall); });
  return to_tuple7(r);
}

at::Tensor generate_augment_cpu(const at::Tensor& bases, const at::Tensor& ew, const at::Tensor& eb,
                                const at::Tensor& sc, const at::Tensor& sh, const at::Tensor& dw, const at::Tensor& db,
                                const at::Tensor& bidx, const at::Tensor& hidx, int64_t family, const at::Tensor& fp,
                                const at::Tensor& ip) {
  GenArgs g = prepare(bases, ew, eb, sc, sh, dw, db, bidx, hidx);
  AugArgs a = prepare_aug(family, fp, ip, bidx.numel(), bases.scalar_type());
  at::Tensor out = at::empty({bidx.numel(), ew.size(1), bases.size(2), bases.size(3)}, bases.options());
  AT_DISPATCH_FLOATING_TYPES(bases.scalar_type(), "haba_fast::generate_augment",
                             [&] { genaug_forward<scalar_t>(g, &a, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
generate_augment_backward_cpu(const at::Tensor& grad, const at::Tensor& bases, const at::Tensor& ew,
                              const at::Tensor& eb, const at::Tensor& sc, const at::Tensor& sh, const at::Tensor& dw,
                              const at::Tensor& bidx, const at::Tensor& hidx, int64_t family, const at::Tensor& fp,
                              const at::Tensor& ip, bool need_bases, bool need_hall) {
  at::Tensor db = at::empty({ew.size(0), ew.size(1)}, bases.options());
  GenArgs g = prepare(bases, ew, eb, sc, sh, dw, db, bidx, hidx);
  AugArgs a = prepare_aug(family, fp, ip, bidx.numel(), bases.scalar_type());
  HF_CHECK(grad.sizes() == at::IntArrayRef({bidx.numel(), ew.size(1), bases.size(2), bases.size(3)}) &&
                  grad.scalar_type() == bases.scalar_type(),
              "generate_augment_backward: grad must be [n, C, H, W] with the dtype of bases");
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(bases.scalar_type(), "haba_fast::generate_augment_backward",
                             [&] { r = genaug_backward<scalar_t>(grad, g, &a, need_bases, need_hall); });
  return to_tuple7(r);
}

template <typename T>
void augment_run(const at::Tensor& x, const AugArgs& a, at::Tensor& out, bool adjoint) {
  const int64_t n = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CHW = C * H * W, HW = H * W;
  const T* xp = x.data_ptr<T>();
  T* yp = out.data_ptr<T>();
  const T* fp = a.fp.data_ptr<T>();
  const int64_t* ip = a.ip.data_ptr<int64_t>();
  const bool avx2 = use_avx2_kernels();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    std::vector<T> wt(4 * HW);
    std::vector<int64_t> idx(4 * HW);
    for (int64_t s = b; s < e; ++s)
      GENAUG_CALL(avx2, augment_sample, AugDims{C, H, W}, a.family, fp + s * 4, ip + s * 4, xp + s * CHW,
                  yp + s * CHW, adjoint, idx.data(), wt.data());
  });
}

at::Tensor augment_impl(const at::Tensor& x_in, int64_t family, const at::Tensor& fp, const at::Tensor& ip,
                        bool adjoint) {
  HF_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "haba_fast::augment (cpu) needs a CPU tensor [n, C, H, W]");
  at::Tensor x = x_in.contiguous();
  AugArgs a = prepare_aug(family, fp, ip, x.size(0), x.scalar_type());
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "haba_fast::augment", [&] { augment_run<scalar_t>(x, a, out, adjoint); });
  return out;
}

at::Tensor augment_cpu(const at::Tensor& x, int64_t family, const at::Tensor& fp, const at::Tensor& ip) {
  return augment_impl(x, family, fp, ip, false);
}

at::Tensor augment_backward_cpu(const at::Tensor& g, int64_t family, const at::Tensor& fp, const at::Tensor& ip) {
  return augment_impl(g, family, fp, ip, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(haba_fast, m) {
  m.def(
      "generate(Tensor bases, Tensor enc_weight, Tensor enc_bias, Tensor scale, Tensor shift, Tensor dec_weight, "
      "Tensor dec_bias, Tensor base_idx, Tensor hall_idx) -> Tensor");
  m.def(
      "generate_backward(Tensor grad, Tensor bases, Tensor enc_weight, Tensor enc_bias, Tensor scale, Tensor shift, "
      "Tensor dec_weight, Tensor base_idx, Tensor hall_idx, bool need_bases, bool need_hall) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("augment(Tensor x, int family, Tensor fparams, Tensor iparams) -> Tensor");
  m.def("augment_backward(Tensor grad, int family, Tensor fparams, Tensor iparams) -> Tensor");
  m.def(
      "generate_augment(Tensor bases, Tensor enc_weight, Tensor enc_bias, Tensor scale, Tensor shift, "
      "Tensor dec_weight, Tensor dec_bias, Tensor base_idx, Tensor hall_idx, int family, Tensor fparams, "
      "Tensor iparams) -> Tensor");
  m.def(
      "generate_augment_backward(Tensor grad, Tensor bases, Tensor enc_weight, Tensor enc_bias, Tensor scale, "
      "Tensor shift, Tensor dec_weight, Tensor base_idx, Tensor hall_idx, int family, Tensor fparams, "
      "Tensor iparams, bool need_bases, bool need_hall) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(haba_fast, CPU, m) {
  m.impl("generate", &generate_cpu);
  m.impl("generate_backward", &generate_backward_cpu);
  m.impl("augment", &augment_cpu);
  m.impl("augment_backward", &augment_backward_cpu);
  m.impl("generate_augment", &generate_augment_cpu);
  m.impl("generate_augment_backward", &generate_augment_backward_cpu);
}

}  // namespace haba_fast
