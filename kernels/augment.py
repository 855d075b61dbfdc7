"""Triton kernels of the DSA augmentation families with per-sample parameters, forward and backward.

One program per sample (grid ``(n,)``) walks the image in tiles of ``BLOCK`` pixels; the family is a
``constexpr`` so each family compiles to its own straight-line kernel. The codes are
``haba_fast.aug_families.KernelCode`` (the C++ kernels' ``enum Family`` in csrc/genaug_types.h); each family's
``encode`` writes the rows: ``fparams`` [n, 4] (dtype of x), ``iparams`` [n, 4] int64:

- color (1):  fp = (add, sat, con).  fwd: y = con·sat·(x − m_C) + con·(m_C + add) + (1 − con)·(m + add), with
  m_C the per-pixel channel mean and m the image mean (brightness, saturation, contrast composed; saturation keeps
  the image mean). bwd: gx = con·sat·g + con·(1 − sat)·m_C(g) + (1 − con)·mean(g).
- crop (2):   ip = (tx, ty). fwd: y[i, j] = x[i + tx, j + ty], 0 outside. bwd: the same with (−tx, −ty).
- cutout (3): ip = (r0, r1, c0, c1): y = 0 on rows r0..r1 × cols c0..c1 (inclusive). bwd: the same mask.
- flip (4):   ip[0] ≠ 0 flips the width axis (an involution: bwd = fwd).
- affine (5): fp = (t00, t01, t10, t11): bilinear sampling at θ·(x_n, y_n) with zero padding and
  ``align_corners=True`` (``affine_grid`` + ``grid_sample``). bwd scatters g·w into the four taps with
  ``atomic_add`` (spread over the image, no hot spot).
- identity (0): copy.

Triton is imported at module import; this module is imported only when the triton backend runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from haba_fast.aug_families import KernelCode

# Module-level constexprs: a @triton.jit function may read a global only when it is a tl.constexpr.
_COLOR = tl.constexpr(int(KernelCode.COLOR))
_CROP = tl.constexpr(int(KernelCode.CROP))
_CUTOUT = tl.constexpr(int(KernelCode.CUTOUT))
_FLIP = tl.constexpr(int(KernelCode.FLIP))
_AFFINE = tl.constexpr(int(KernelCode.AFFINE))


@triton.jit
def _param_row(ptr, s):
    """The four entries of row ``s`` of an [n, 4] parameter tensor (fparams or iparams)."""
    row = ptr + s * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _augment_sample(x_ptr, y_ptr, fp_ptr, ip_ptr, C: tl.constexpr, H, W, FAMILY: tl.constexpr, ADJOINT: tl.constexpr,
                    BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    HW = H * W
    base = s * C * HW
    DT = y_ptr.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    if FAMILY == _COLOR:
        add, sat, con, _unused = _param_row(fp_ptr, s)
        tot = tl.zeros([BLOCK], dtype=DT)
        t0 = 0
        while t0 < HW:
            offs = t0 + lanes
            m = offs < HW
            for c in tl.static_range(C):
                tot += tl.load(x_ptr + base + c * HW + offs, mask=m, other=0.0)
            t0 += BLOCK
        mean = tl.sum(tot, axis=0) / (C * HW)
        t0 = 0
        while t0 < HW:
            offs = t0 + lanes
            m = offs < HW
            mc = tl.zeros([BLOCK], dtype=DT)
            for c in tl.static_range(C):
                mc += tl.load(x_ptr + base + c * HW + offs, mask=m, other=0.0)
            mc = mc / C
            for c in tl.static_range(C):
                xv = tl.load(x_ptr + base + c * HW + offs, mask=m, other=0.0)
                if ADJOINT:
                    yv = con * sat * xv + con * (1.0 - sat) * mc + (1.0 - con) * mean
                else:
                    yv = con * sat * (xv - mc) + con * (mc + add) + (1.0 - con) * (mean + add)
                tl.store(y_ptr + base + c * HW + offs, yv, mask=m)
            t0 += BLOCK
    elif FAMILY == _AFFINE:  # bilinear, zeros padding, align_corners=True
        t00, t01, t10, t11 = _param_row(fp_ptr, s)
        t0 = 0
        while t0 < HW:
            offs = t0 + lanes
            m = offs < HW
            i = offs // W
            j = offs % W
            # affine_grid's base grid: -1 .. 1, and 0 on a size-1 axis (W - 1 = 0 must not divide).
            xn = tl.where(W > 1, -1.0 + (2.0 * j.to(DT)) / tl.maximum(W - 1, 1), 0.0)
            yn = tl.where(H > 1, -1.0 + (2.0 * i.to(DT)) / tl.maximum(H - 1, 1), 0.0)
            ix = (t00 * xn + t01 * yn + 1.0) / 2.0 * (W - 1)
            iy = (t10 * xn + t11 * yn + 1.0) / 2.0 * (H - 1)
            fx = tl.floor(ix)
            fy = tl.floor(iy)
            x0 = fx.to(tl.int32)
            y0 = fy.to(tl.int32)
            wx1 = ix - fx
            wy1 = iy - fy
            wx0 = 1.0 - wx1
            wy0 = 1.0 - wy1
            okx0 = (x0 >= 0) & (x0 < W)
            okx1 = (x0 + 1 >= 0) & (x0 + 1 < W)
            oky0 = (y0 >= 0) & (y0 < H)
            oky1 = (y0 + 1 >= 0) & (y0 + 1 < H)
            m00 = m & oky0 & okx0
            m01 = m & oky0 & okx1
            m10 = m & oky1 & okx0
            m11 = m & oky1 & okx1
            q00 = y0 * W + x0
            for c in tl.static_range(C):
                cb = base + c * HW
                if ADJOINT:
                    g = tl.load(x_ptr + cb + offs, mask=m, other=0.0)
                    tl.atomic_add(y_ptr + cb + q00, g * (wx0 * wy0), mask=m00)
                    tl.atomic_add(y_ptr + cb + q00 + 1, g * (wx1 * wy0), mask=m01)
                    tl.atomic_add(y_ptr + cb + q00 + W, g * (wx0 * wy1), mask=m10)
                    tl.atomic_add(y_ptr + cb + q00 + W + 1, g * (wx1 * wy1), mask=m11)
                else:
                    v = tl.load(x_ptr + cb + q00, mask=m00, other=0.0) * (wx0 * wy0)
                    v += tl.load(x_ptr + cb + q00 + 1, mask=m01, other=0.0) * (wx1 * wy0)
                    v += tl.load(x_ptr + cb + q00 + W, mask=m10, other=0.0) * (wx0 * wy1)
                    v += tl.load(x_ptr + cb + q00 + W + 1, mask=m11, other=0.0) * (wx1 * wy1)
                    tl.store(y_ptr + cb + offs, v, mask=m)
            t0 += BLOCK
    else:  # identity, crop, cutout, flip: one gather per output pixel
        p0, p1, p2, p3 = _param_row(ip_ptr, s)
        t0 = 0
        while t0 < HW:
            offs = t0 + lanes
            m = offs < HW
            i = offs // W
            j = offs % W
            src = offs
            ok = m
            if FAMILY == _CROP:
                if ADJOINT:
                    si = i - p0
                    sj = j - p1
                else:
                    si = i + p0
                    sj = j + p1
                ok = m & (si >= 0) & (si < H) & (sj >= 0) & (sj < W)
                src = si * W + sj
            elif FAMILY == _CUTOUT:
                ok = m & ~((i >= p0) & (i <= p1) & (j >= p2) & (j <= p3))
            elif FAMILY == _FLIP:
                src = tl.where(p0 != 0, i * W + (W - 1 - j), offs)
            for c in tl.static_range(C):
                v = tl.load(x_ptr + base + c * HW + src, mask=ok, other=0.0)
                tl.store(y_ptr + base + c * HW + offs, v, mask=m)
            t0 += BLOCK


@triton.jit
def _augment_fwd_kernel(x_ptr, y_ptr, fp_ptr, ip_ptr, C: tl.constexpr, H, W, FAMILY: tl.constexpr,
                        BLOCK: tl.constexpr):
    """y = aug(x) for one sample per program (see the module docstring for the math per family)."""
    _augment_sample(x_ptr, y_ptr, fp_ptr, ip_ptr, C, H, W, FAMILY, False, BLOCK)


@triton.jit
def _augment_bwd_kernel(g_ptr, gx_ptr, fp_ptr, ip_ptr, C: tl.constexpr, H, W, FAMILY: tl.constexpr,
                        BLOCK: tl.constexpr):
    """gx = aug^T(g): the adjoint of the (linear) forward map, one sample per program."""
    _augment_sample(g_ptr, gx_ptr, fp_ptr, ip_ptr, C, H, W, FAMILY, True, BLOCK)


def _block(hw: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(hw)))


def _launch(kernel, x: torch.Tensor, out: torch.Tensor, family: int, fparams: torch.Tensor, iparams: torch.Tensor):
    n, C, H, W = x.shape
    if n == 0:
        return out
    kernel[(n,)](x, out, fparams.contiguous(), iparams.contiguous(), C, H, W, FAMILY=int(family),
                 BLOCK=_block(H * W))
    return out


def augment_forward(x: torch.Tensor, family: int, fparams: torch.Tensor, iparams: torch.Tensor) -> torch.Tensor:
    """Augment x [n, C, H, W] (float32/float64) under per-sample params; returns a new tensor."""
    x = x.contiguous()
    return _launch(_augment_fwd_kernel, x, torch.empty_like(x), family, fparams, iparams)


def augment_backward(grad: torch.Tensor, family: int, fparams: torch.Tensor, iparams: torch.Tensor) -> torch.Tensor:
    """dL/dx [n, C, H, W] from dL/dy under the same params (affine scatters, so it starts from zeros)."""
    grad = grad.contiguous()
    out = torch.zeros_like(grad) if int(family) == KernelCode.AFFINE else torch.empty_like(grad)
    return _launch(_augment_bwd_kernel, grad, out, family, fparams, iparams)
