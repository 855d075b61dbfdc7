"""Triton kernels of one ConvNet block's norm -> activation -> pooling for the C++ trajectory op, carrying a primal
and a tangent forward and back: the fused CPU loops' contract (csrc/trajectory_kernels.h) for CUDA tensors.

The C++ op runs the convolutions and calls these through the dispatcher
(``torch.ops.haba_fast.trajectory_block_forward_kernel`` / ``..._backward_kernel``, schemas in csrc/trajectory.cpp,
implementations registered by ``haba_fast.ops.register_trajectory_block_kernels``) when
``HABA_FAST_TRAJECTORY_FUSED=triton``. One program per (sample b, channel c): instance norm or no norm (a group is
one channel plane, M = H * W values), any activation, 2x2 average pooling (floor) or none.

Forward, per plane (mean/var biased, eps 1e-5), from the conv output z and its tangent zd:

    xh = (z - mu) rstd,  rstd = 1 / sqrt(var + eps),  k = rstd mean(zd xh),  xhd = (zd - mean(zd)) rstd - xh k
    n = gam xh + bet,  nd = gam xhd + gamd xh + betd;  r = act(n), rd = act'(n) nd;  out = avgpool2x2(r) or r
    saved: xh, xhd (no norm: n, nd), rstd, k (no norm: 1, 0)

Backward, from ga / gad (w.r.t. the block output):

    gr = avgpool^T(ga);  gn = gr act'(n);  gnd = grd act'(n) + gr act''(n) nd
    P = mean(gn xh), Q = mean(gn), R = mean(gnd xh + gn xhd), Qd = mean(gnd)   (part [4, B, C]: the sums)
    gz  = gam rstd (gn - Q - xh P)
    gzd = rstd (gam gnd + gamd gn - gam Qd - gamd Q - xhd gam P - xh (gam R + gamd P)) - k gz

Memory traffic per block and step: the forward reads z, zd and writes xh, xhd, out, outd; the backward reads ga,
gad, xh, xhd and writes gz, gzd (each plane's second pass reads what its first pass just read, from cache), against
~15 full-size ATen passes of the composite path for each.

Loops with runtime bounds are ``while`` loops (Triton 3.6's interpreter cannot run ``range`` with a runtime bound
under numpy 2.x). Constants that must be exact in float64 (eps, the leaky slope) are made in the data's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

EPS = tl.constexpr(1e-5)
LEAKY_SLOPE = tl.constexpr(0.01)
MAX_BLOCK = 1024
ACTIVATIONS = {0: "relu", 1: "sigmoid", 2: "leakyrelu"}


@triton.jit
def _act(n, ACT: tl.constexpr):
    """(act(n), act'(n), act''(n)) for relu (0), sigmoid (1), leaky relu (2, slope 0.01). One return: the branches
    are constexpr."""
    one = tl.full((), 1.0, n.dtype)
    if ACT == 1:
        r = one / (one + tl.exp(-n))
        d1 = r * (one - r)
        d2 = d1 * (one - 2.0 * r)
    else:
        low = tl.full((), 0.0, n.dtype)
        if ACT == 2:
            low = tl.full((), LEAKY_SLOPE, n.dtype)
        d1 = tl.where(n > 0, one, low)
        r = n * d1
        d2 = d1 * 0.0
    return r, d1, d2


@triton.jit
def _normalized(zb, zdb, p, m, mu, rstd, mzd, kk, g, bt, gd, btd, TAN: tl.constexpr, NORM: tl.constexpr):
    """(xh, xhd, n, nd) at plane offsets p: the normalized conv output, the norm's output and their tangents."""
    z = tl.load(zb + p, mask=m, other=0.0)
    xh = z
    xhd = z
    n = z
    nd = z
    if NORM:
        xh = (z - mu) * rstd
        n = g * xh + bt
    if TAN:
        zd = tl.load(zdb + p, mask=m, other=0.0)
        xhd = zd
        nd = zd
        if NORM:
            xhd = (zd - mzd) * rstd - xh * kk
            nd = g * xhd + gd * xh + btd
    return xh, xhd, n, nd


@triton.jit
def _norm_params(gam_ptr, bet_ptr, gamd_ptr, betd_ptr, c, DT: tl.constexpr, TAN: tl.constexpr,
                 NORM: tl.constexpr):  # fmt: skip
    """(gam, bet, gamd, betd) of channel c: the norm's parameters and their tangents (1, 0, 0, 0 without a norm or
    a tangent)."""
    g = tl.full((), 1.0, DT)
    bt = tl.full((), 0.0, DT)
    gd = tl.full((), 0.0, DT)
    btd = tl.full((), 0.0, DT)
    if NORM:
        g = tl.load(gam_ptr + c)
        bt = tl.load(bet_ptr + c)
        if TAN:
            gd = tl.load(gamd_ptr + c)
            btd = tl.load(betd_ptr + c)
    return g, bt, gd, btd


@triton.jit
def _trajectory_block_fwd_kernel(
    z_ptr, zd_ptr, gam_ptr, bet_ptr, gamd_ptr, betd_ptr,
    out_ptr, outd_ptr, xh_ptr, xhd_ptr, rstd_ptr, k_ptr,
    C, H, W, HO, WO, z_bs,
    TAN: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # b * C + c
    b = pid // C
    c = pid % C
    HW = H * W
    zb = z_ptr + b * z_bs + c * HW
    zdb = zd_ptr + b * z_bs + c * HW
    offs = tl.arange(0, BLOCK)
    DT = z_ptr.dtype.element_ty
    mu = tl.full((), 0.0, DT)
    rstd = tl.full((), 1.0, DT)
    mzd = tl.full((), 0.0, DT)
    kk = tl.full((), 0.0, DT)
    g, bt, gd, btd = _norm_params(gam_ptr, bet_ptr, gamd_ptr, betd_ptr, c, DT, TAN, NORM)
    if NORM:
        acc = tl.zeros([BLOCK], dtype=DT)
        start = 0
        while start < HW:
            p = start + offs
            acc += tl.load(zb + p, mask=p < HW, other=0.0)
            start += BLOCK
        mu = tl.sum(acc, axis=0) / HW
        acc2 = tl.zeros([BLOCK], dtype=DT)
        accd = tl.zeros([BLOCK], dtype=DT)
        accdz = tl.zeros([BLOCK], dtype=DT)
        start = 0
        while start < HW:
            p = start + offs
            m = p < HW
            dz = tl.where(m, tl.load(zb + p, mask=m, other=0.0) - mu, 0.0)
            acc2 += dz * dz
            if TAN:
                zd = tl.load(zdb + p, mask=m, other=0.0)
                accd += zd
                accdz += zd * dz
            start += BLOCK
        rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / HW + tl.full((), EPS, DT))
        mzd = tl.sum(accd, axis=0) / HW
        kk = rstd * rstd * (tl.sum(accdz, axis=0) / HW)
    tl.store(rstd_ptr + pid, rstd)  # without a norm: 1 and 0, as the CPU loops write them
    tl.store(k_ptr + pid, kk)
    # the saved tensors (and, unpooled, the block output), every element of the plane
    start = 0
    while start < HW:
        p = start + offs
        m = p < HW
        xh, xhd, n, nd = _normalized(zb, zdb, p, m, mu, rstd, mzd, kk, g, bt, gd, btd, TAN, NORM)
        tl.store(xh_ptr + pid * HW + p, xh, mask=m)
        if TAN:
            tl.store(xhd_ptr + pid * HW + p, xhd, mask=m)
        if not POOL:
            r, d1, d2 = _act(n, ACT)
            tl.store(out_ptr + pid * HW + p, r, mask=m)
            if TAN:
                tl.store(outd_ptr + pid * HW + p, d1 * nd, mask=m)
        start += BLOCK
    if POOL:  # 2x2 average pooling: each output position gathers its window's four taps
        HWO = HO * WO
        start = 0
        while start < HWO:
            q = start + offs
            m = q < HWO
            p0 = (q // WO) * 2 * W + (q % WO) * 2
            s = tl.zeros([BLOCK], dtype=DT)
            sd = tl.zeros([BLOCK], dtype=DT)
            for t in tl.static_range(4):
                p = p0 + (t // 2) * W + (t % 2)
                xh, xhd, n, nd = _normalized(zb, zdb, p, m, mu, rstd, mzd, kk, g, bt, gd, btd, TAN, NORM)
                r, d1, d2 = _act(n, ACT)
                s += r
                if TAN:
                    sd += d1 * nd
            tl.store(out_ptr + pid * HWO + q, s * 0.25, mask=m)
            if TAN:
                tl.store(outd_ptr + pid * HWO + q, sd * 0.25, mask=m)
            start += BLOCK


@triton.jit
def _block_grads(ga_ptr, gad_ptr, xh_ptr, xhd_ptr, pid, p, m, W, HO, WO, HW, g, bt, gd, btd,
                 TAN: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr):  # fmt: skip
    """(xh, xhd, gn, gnd) at plane offsets p: the saved tensors and the gradient (and tangent) w.r.t. the norm's
    output."""
    xh = tl.load(xh_ptr + pid * HW + p, mask=m, other=0.0)
    xhd = xh
    if TAN:
        xhd = tl.load(xhd_ptr + pid * HW + p, mask=m, other=0.0)
    if POOL:  # avgpool^T: a quarter of the window's output gradient; the odd edge row/column gets none
        i = p // W
        j = p % W
        mo = m & (i < 2 * HO) & (j < 2 * WO)
        o = pid * HO * WO + (i // 2) * WO + j // 2
        gr = tl.load(ga_ptr + o, mask=mo, other=0.0) * 0.25
        grd = gr
        if TAN:
            grd = tl.load(gad_ptr + o, mask=mo, other=0.0) * 0.25
    else:
        gr = tl.load(ga_ptr + pid * HW + p, mask=m, other=0.0)
        grd = gr
        if TAN:
            grd = tl.load(gad_ptr + pid * HW + p, mask=m, other=0.0)
    n = xh
    nd = xhd
    if NORM:
        n = g * xh + bt
        if TAN:
            nd = g * xhd + gd * xh + btd
    r, d1, d2 = _act(n, ACT)
    gn = gr * d1
    gnd = gn
    if TAN:
        gnd = grd * d1
        if ACT == 1:
            gnd += gr * d2 * nd
    return xh, xhd, gn, gnd


@triton.jit
def _trajectory_block_bwd_kernel(
    ga_ptr, gad_ptr, xh_ptr, xhd_ptr, rstd_ptr, k_ptr, gam_ptr, bet_ptr, gamd_ptr, betd_ptr,
    gzz_ptr, part_ptr,
    B, C, H, W, HO, WO, gzz_bs,
    TAN: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # b * C + c
    b = pid // C
    c = pid % C
    HW = H * W
    offs = tl.arange(0, BLOCK)
    DT = xh_ptr.dtype.element_ty
    g, bt, gd, btd = _norm_params(gam_ptr, bet_ptr, gamd_ptr, betd_ptr, c, DT, TAN, NORM)
    P = tl.full((), 0.0, DT)
    Q = tl.full((), 0.0, DT)
    R = tl.full((), 0.0, DT)
    Qd = tl.full((), 0.0, DT)
    rstd = tl.full((), 1.0, DT)
    kk = tl.full((), 0.0, DT)
    if NORM:
        rstd = tl.load(rstd_ptr + pid)
        if TAN:
            kk = tl.load(k_ptr + pid)
        s1 = tl.zeros([BLOCK], dtype=DT)
        s2 = tl.zeros([BLOCK], dtype=DT)
        s3 = tl.zeros([BLOCK], dtype=DT)
        s4 = tl.zeros([BLOCK], dtype=DT)
        start = 0
        while start < HW:
            p = start + offs
            m = p < HW
            xh, xhd, gn, gnd = _block_grads(
                ga_ptr, gad_ptr, xh_ptr, xhd_ptr, pid, p, m, W, HO, WO, HW, g, bt, gd, btd, TAN, NORM, ACT, POOL
            )
            s1 += gn * xh
            s2 += gn
            if TAN:
                s3 += gnd * xh + gn * xhd
                s4 += gnd
            start += BLOCK
        S1 = tl.sum(s1, axis=0)
        S2 = tl.sum(s2, axis=0)
        P = S1 / HW
        Q = S2 / HW
        tl.store(part_ptr + pid, S1)
        tl.store(part_ptr + B * C + pid, S2)
        if TAN:
            S3 = tl.sum(s3, axis=0)
            S4 = tl.sum(s4, axis=0)
            R = S3 / HW
            Qd = S4 / HW
            tl.store(part_ptr + 2 * B * C + pid, S3)
            tl.store(part_ptr + 3 * B * C + pid, S4)
        else:  # no tangent: the tangent sums are 0, as the CPU loops write them
            tl.store(part_ptr + 2 * B * C + pid, tl.full((), 0.0, DT))
            tl.store(part_ptr + 3 * B * C + pid, tl.full((), 0.0, DT))
    gzb = gzz_ptr + b * gzz_bs + c * HW
    start = 0
    while start < HW:
        p = start + offs
        m = p < HW
        xh, xhd, gn, gnd = _block_grads(
            ga_ptr, gad_ptr, xh_ptr, xhd_ptr, pid, p, m, W, HO, WO, HW, g, bt, gd, btd, TAN, NORM, ACT, POOL
        )
        gz = gn
        gzd = gnd
        if NORM:
            gr = g * rstd
            gz = gr * (gn - Q - xh * P)
            if TAN:
                gdr = gd * rstd
                gzd = gr * (gnd - Qd - xhd * P - xh * R) + gdr * (gn - Q - xh * P) - kk * gz
        tl.store(gzb + p, gz, mask=m)
        if TAN:
            tl.store(gzb + C * HW + p, gzd, mask=m)
        start += BLOCK


def _block_size(n: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(n)))


def _num_warps(block: int) -> int:
    """Warps of a program: 8 values a thread up to 4 warps (a 32 x 32 plane), one warp for planes of 16 x 16 and
    less (the deeper blocks), instead of idle threads."""
    return max(1, min(4, block // 256))


def _expect(name: str, t: Optional[Tensor], shape: tuple, like: Tensor, contiguous: bool = True) -> None:
    """ValueError unless ``t`` has ``shape`` and ``like``'s dtype and device (and is contiguous): a mis-sized
    argument would have the kernel write out of bounds."""
    if t is None:
        raise ValueError(f"trajectory block kernel: {name} is required here")
    if tuple(t.shape) != tuple(shape) or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"trajectory block kernel: {name} must be {list(shape)} {like.dtype} on {like.device}, got "
            f"{list(t.shape)} {t.dtype} on {t.device}"
        )
    if contiguous and not t.is_contiguous():
        raise ValueError(f"trajectory block kernel: {name} must be contiguous")


def _flags(act: int, primal: Tensor, tangent: Optional[Tensor], params: tuple) -> tuple[bool, bool]:
    """(tangent, norm) of a call, after checking the activation code, the dtype and the norm parameters (gam, bet,
    gamd, betd: all None for no norm; gamd/betd only with a tangent)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"trajectory block kernel: unknown activation code {act} (0 relu, 1 sigmoid, 2 leakyrelu)")
    if primal.dtype not in (torch.float32, torch.float64) or primal.dim() != 4:
        raise ValueError(f"trajectory block kernel: a 4-D float32/float64 input, got {primal.dtype} {primal.dim()}-D")
    tan, norm = tangent is not None, params[0] is not None
    C = primal.shape[1]
    for name, t, wanted in zip(("gam", "bet", "gamd", "betd"), params, (norm, norm, norm and tan, norm and tan)):
        if wanted:
            _expect(name, t, (C,), primal)
        elif t is not None:
            raise ValueError(f"trajectory block kernel: {name} given without {'a tangent' if norm else 'gam'}")
    return tan, norm


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def trajectory_block_forward(
    z: Tensor,
    zd: Optional[Tensor],
    gam: Optional[Tensor],
    bet: Optional[Tensor],
    gamd: Optional[Tensor],
    betd: Optional[Tensor],
    act: int,
    pool: bool,
    out: Tensor,
    outd: Optional[Tensor],
    xh: Tensor,
    xhd: Optional[Tensor],
    rstd: Tensor,
    k: Tensor,
) -> None:
    """Fill out/outd [B, C, Ho, Wo] (Ho, Wo = H // 2, W // 2 pooled, else H, W), xh/xhd [B, C, H, W] and rstd/k
    [B, C] (1 and 0 without a norm) from z/zd [B, C, H, W] (float32 or float64).

    z and zd: each plane contiguous, one batch stride shared by both (the channel halves of one [B, 2C, H, W]
    tensor, or two contiguous tensors); the outputs contiguous, of z's dtype and device. gam/bet [C] for instance
    norm (None: no norm), gamd/betd [C] with a tangent and a norm. act: 0 relu, 1 sigmoid, 2 leaky relu (0.01).
    """
    tan, norm = _flags(act, z, zd, (gam, bet, gamd, betd))
    B, C, H, W = z.shape
    HO, WO = (H // 2, W // 2) if pool else (H, W)
    if z.stride(1) != H * W or z.stride(2) != W or z.stride(3) != 1:
        raise ValueError("trajectory block kernel: z's planes must be contiguous")
    if tan:
        _expect("zd", zd, z.shape, z, contiguous=False)
        if zd.stride() != z.stride():
            raise ValueError("trajectory block kernel: zd must have z's strides")
    for name, t, shape, wanted in (
        ("out", out, (B, C, HO, WO), True),
        ("outd", outd, (B, C, HO, WO), tan),
        ("xh", xh, (B, C, H, W), True),
        ("xhd", xhd, (B, C, H, W), tan),
        ("rstd", rstd, (B, C), True),
        ("k", k, (B, C), True),
    ):
        if wanted:
            _expect(name, t, shape, z)
    block = _block_size(H * W)
    with _on_device(z):
        _trajectory_block_fwd_kernel[(B * C,)](
            z, zd if tan else z, gam if norm else z, bet if norm else z, gamd if (norm and tan) else z,
            betd if (norm and tan) else z,
            out, outd if tan else out, xh, xhd if tan else xh, rstd, k,
            C, H, W, HO, WO, z.stride(0),
            TAN=tan, NORM=norm, ACT=int(act), POOL=bool(pool), BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip


def trajectory_block_backward(
    ga: Tensor,
    gad: Optional[Tensor],
    xh: Tensor,
    xhd: Optional[Tensor],
    rstd: Tensor,
    k: Tensor,
    gam: Optional[Tensor],
    bet: Optional[Tensor],
    gamd: Optional[Tensor],
    betd: Optional[Tensor],
    act: int,
    pool: bool,
    gzz: Tensor,
    part: Optional[Tensor],
) -> None:
    """Fill gzz [B, C or 2C, H, W] (= gz, or [gz | gzd] with a tangent) and, with a norm, part [4, B, C] (per
    plane: sum gn xh, sum gn, sum (gnd xh + gn xhd), sum gnd; the last two 0 without a tangent) from ga/gad
    [B, C, Ho, Wo] (w.r.t. the block output) and the forward's saved xh/xhd [B, C, H, W], rstd/k [B, C]. Every
    tensor contiguous, of xh's dtype and device; gam..betd and act as in :func:`trajectory_block_forward`."""
    tan, norm = _flags(act, xh, gad, (gam, bet, gamd, betd))
    B, C, H, W = xh.shape
    HO, WO = (H // 2, W // 2) if pool else (H, W)
    for name, t, shape, wanted in (
        ("ga", ga, (B, C, HO, WO), True),
        ("gad", gad, (B, C, HO, WO), tan),
        ("xh", xh, (B, C, H, W), True),
        ("xhd", xhd, (B, C, H, W), tan),
        ("rstd", rstd, (B, C), True),
        ("k", k, (B, C), True),
        ("gzz", gzz, (B, 2 * C if tan else C, H, W), True),
        ("part", part, (4, B, C), norm),
    ):
        if wanted:
            _expect(name, t, shape, xh)
    block = _block_size(H * W)
    with _on_device(xh):
        _trajectory_block_bwd_kernel[(B * C,)](
            ga, gad if tan else ga, xh, xhd if tan else xh, rstd, k,
            gam if norm else xh, bet if norm else xh, gamd if (norm and tan) else xh, betd if (norm and tan) else xh,
            gzz, part if norm else gzz,
            B, C, H, W, HO, WO, gzz.stride(0),
            TAN=tan, NORM=norm, ACT=int(act), POOL=bool(pool), BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
