"""Triton kernels of hallucinator generation, forward and backward.

Math (per sample s with basis b = base_idx[s], hallucinator h = hall_idx[s]; x = bases[b] [c_b, H, W]):

    z[o,i,j]  = eb[h,o] + Σ_{c,u,v} ew[h,o,c,u,v] · x[c, i+u, j+v]          (valid k×k conv, [C, Ho, Wo])
    a         = scale[h] · z + shift[h]
    y[p,I,J]  = db[h,p] + Σ_{o,u,v} dw[h,o,p,u,v] · a[o, I-u, J-v]          (transposed conv, [C, H, W])

Backward, from gy = dL/dy:

    ga[o,i,j] = Σ_{p,u,v} dw[h,o,p,u,v] · gy[p, i+u, j+v]      gscale = ga·z, gshift = ga, gz = ga·scale
    gdw[o,p,u,v] = Σ_{i,j} a[o,i,j] · gy[p,i+u,j+v]            gdb[p] = Σ_{I,J} gy[p,I,J]
    gew[o,c,u,v] = Σ_{i,j} gz[o,i,j] · x[c,i+u,j+v]            geb[o] = Σ_{i,j} gz[o,i,j]
    gx[c,I,J]    = Σ_{o,u,v} ew[h,o,c,u,v] · gz[o, I-u, J-v]

Kernels (grid: sample × pixel tile; channels and k are constexpr, so the tap loops unroll):

- ``_generate_enc_kernel``: a for a tile of the Ho×Wo grid (written to a scratch [n, C, Ho, Wo]).
- ``_generate_fwd_kernel``: y for a tile of the H×W grid (gathers a at the k×k taps).
- ``_generate_bwd_kernel``: recomputes z, then ga, gz (scratch) and the per-(sample, tile) partials of every
  hallucinator parameter (stage 1 of a two-stage reduction: no atomics).
- ``_generate_bwd_input_kernel``: gx per sample and the partials of gdb.
- ``_segment_sum_kernel``: stage 2, sums partial rows per segment (basis for gx) in a fixed order. Above
  ``ROWS_PER_CHUNK`` rows the sorted rows are first cut into fixed chunks (~sqrt(rows); ``_segment_runs_kernel``
  sums each segment's run within a chunk, ``_segment_heads_kernel`` each segment's runs), so that one basis
  shared by a whole batch does not serialize on one program and no grid depends on the data: no host sync. Few
  segments (the hallucinators, up to ``ONEHOT_MAX_SEGMENTS``) are summed as one [S, R] x [R, P] product with a
  0/1 matrix instead: one library GEMM, deterministic.

Loops with runtime bounds are ``while`` loops: Triton 3.6's interpreter (TRITON_INTERPRET=1) cannot run
``range`` with a runtime bound under numpy 2.x.
"""

from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl

ROWS_PER_CHUNK = 64
ONEHOT_MAX_SEGMENTS = 64


@triton.jit
def _correlate_taps(acc, w_ptr, xb, h, o, i, j, m, H, W, C: tl.constexpr, NIN: tl.constexpr, K: tl.constexpr):
    """acc + Σ_{c,u,v} w[h,o,c,u,v] · x[c, i+u, j+v], w [Hn, C, NIN, K, K], x = xb [NIN, H, W]: output channel o of
    a valid k×k correlation. With (ew, bases[b], NIN = c_b) the encoder; with (dw, gy[s], NIN = C) the decoder's
    input grad."""
    for c in tl.static_range(NIN):
        for u in tl.static_range(K):
            for v in tl.static_range(K):
                w = tl.load(w_ptr + (((h * C + o) * NIN + c) * K + u) * K + v)
                acc += w * tl.load(xb + (c * H + i + u) * W + j + v, mask=m, other=0.0)
    return acc


@triton.jit
def _correlate_weight_grad(out_ptr, g, xb, o, i, j, m, H, W, NIN: tl.constexpr, K: tl.constexpr):
    """out[(o·NIN + c)·K² + u·K + v] = Σ_tile g · x[c, i+u, j+v] (this tile's part of the weight grad above)."""
    for c in tl.static_range(NIN):
        for u in tl.static_range(K):
            for v in tl.static_range(K):
                xv = tl.load(xb + (c * H + i + u) * W + j + v, mask=m, other=0.0)
                tl.store(out_ptr + ((o * NIN + c) * K + u) * K + v, tl.sum(g * xv, axis=0))


@triton.jit
def _transposed_taps(acc, w_ptr, src_ptr, h, s, q, I, J, m, HO, WO, C: tl.constexpr, NOUT: tl.constexpr,
                     K: tl.constexpr):
    """acc + Σ_{o,u,v} w[h,o,q,u,v] · src[s, o, I-u, J-v] (zero outside Ho×Wo): the gather form of a stride-1
    transposed conv. With w = dw (NOUT = C) it is the decoder; with w = ew (NOUT = c_b) the encoder's input grad."""
    P = HO * WO
    for o in tl.static_range(C):
        for u in tl.static_range(K):
            for v in tl.static_range(K):
                ii = I - u
                jj = J - v
                ok = m & (ii >= 0) & (ii < HO) & (jj >= 0) & (jj < WO)
                w = tl.load(w_ptr + (((h * C + o) * NOUT + q) * K + u) * K + v)
                acc += w * tl.load(src_ptr + (s * C + o) * P + ii * WO + jj, mask=ok, other=0.0)
    return acc


@triton.jit
def _generate_enc_kernel(x_ptr, ew_ptr, eb_ptr, sc_ptr, sh_ptr, bidx_ptr, hidx_ptr, a_ptr, H, W, HO, WO,
                         CB: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    """a[s, :, tile] = scale_h · enc_h(bases[b]) + shift_h."""
    s = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    P = HO * WO
    m = offs < P
    i = offs // WO
    j = offs % WO
    b = tl.load(bidx_ptr + s)
    h = tl.load(hidx_ptr + s)
    xb = x_ptr + b * (CB * H * W)
    DT = a_ptr.dtype.element_ty
    for o in tl.static_range(C):
        acc = _correlate_taps(tl.zeros([BLOCK], dtype=DT) + tl.load(eb_ptr + h * C + o), ew_ptr, xb, h, o, i, j, m,
                              H, W, C, CB, K)
        scv = tl.load(sc_ptr + (h * C + o) * P + offs, mask=m, other=0.0)
        shv = tl.load(sh_ptr + (h * C + o) * P + offs, mask=m, other=0.0)
        tl.store(a_ptr + (s * C + o) * P + offs, scv * acc + shv, mask=m)


@triton.jit
def _generate_fwd_kernel(a_ptr, dw_ptr, db_ptr, hidx_ptr, y_ptr, H, W, HO, WO, C: tl.constexpr, K: tl.constexpr,
                         BLOCK: tl.constexpr):
    """y[s, :, tile] = dec_h(a[s]) (gather form of the stride-1 transposed convolution)."""
    s = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    m = offs < HW
    I = offs // W
    J = offs % W
    h = tl.load(hidx_ptr + s)
    DT = y_ptr.dtype.element_ty
    for p in tl.static_range(C):
        acc = _transposed_taps(tl.zeros([BLOCK], dtype=DT) + tl.load(db_ptr + h * C + p), dw_ptr, a_ptr, h, s, p, I,
                               J, m, HO, WO, C, C, K)
        tl.store(y_ptr + (s * C + p) * HW + offs, acc, mask=m)


@triton.jit
def _generate_bwd_kernel(x_ptr, ew_ptr, eb_ptr, sc_ptr, sh_ptr, dw_ptr, gy_ptr, bidx_ptr, hidx_ptr, gz_ptr, ss_ptr,
                         wpart_ptr, H, W, HO, WO, T, CB: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                         BLOCK: tl.constexpr, NEED_HALL: tl.constexpr):
    """gz for a tile of the Ho×Wo grid, plus (NEED_HALL) gscale/gshift rows and per-tile partials of gew, geb, gdw.

    Partial row layout (wpart [n*T, PW]): gew (C·CB·K·K) | geb (C) | gdw (C·C·K·K).
    """
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    P = HO * WO
    HW = H * W
    m = offs < P
    i = offs // WO
    j = offs % WO
    b = tl.load(bidx_ptr + s)
    h = tl.load(hidx_ptr + s)
    xb = x_ptr + b * (CB * HW)
    gyb = gy_ptr + s * (C * HW)
    DT = gz_ptr.dtype.element_ty
    OFF_EB: tl.constexpr = C * CB * K * K
    OFF_DW: tl.constexpr = OFF_EB + C
    PW: tl.constexpr = OFF_DW + C * C * K * K
    wrow = wpart_ptr + (s * T + t) * PW
    for o in tl.static_range(C):
        z = _correlate_taps(tl.zeros([BLOCK], dtype=DT) + tl.load(eb_ptr + h * C + o), ew_ptr, xb, h, o, i, j, m,
                            H, W, C, CB, K)
        ga = _correlate_taps(tl.zeros([BLOCK], dtype=DT), dw_ptr, gyb, h, o, i, j, m, H, W, C, C, K)
        scv = tl.load(sc_ptr + (h * C + o) * P + offs, mask=m, other=0.0)
        gz = ga * scv
        tl.store(gz_ptr + (s * C + o) * P + offs, gz, mask=m)
        if NEED_HALL:
            shv = tl.load(sh_ptr + (h * C + o) * P + offs, mask=m, other=0.0)
            a = scv * z + shv
            tl.store(ss_ptr + (s * 2 * C + o) * P + offs, ga * z, mask=m)
            tl.store(ss_ptr + (s * 2 * C + C + o) * P + offs, ga, mask=m)
            tl.store(wrow + OFF_EB + o, tl.sum(gz, axis=0))
            _correlate_weight_grad(wrow, gz, xb, o, i, j, m, H, W, CB, K)
            _correlate_weight_grad(wrow + OFF_DW, a, gyb, o, i, j, m, H, W, C, K)


@triton.jit
def _generate_bwd_input_kernel(ew_ptr, gz_ptr, gy_ptr, hidx_ptr, gx_ptr, dbpart_ptr, H, W, HO, WO, T,
                               CB: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                               NEED_BASES: tl.constexpr, NEED_HALL: tl.constexpr):
    """gx[s, :, tile] = enc_hᵀ(gz[s]) (NEED_BASES) and per-tile partial sums of gy per channel (gdb, NEED_HALL)."""
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    HW = H * W
    m = offs < HW
    h = tl.load(hidx_ptr + s)
    DT = gx_ptr.dtype.element_ty
    if NEED_BASES:
        I = offs // W
        J = offs % W
        for c in tl.static_range(CB):
            acc = _transposed_taps(tl.zeros([BLOCK], dtype=DT), ew_ptr, gz_ptr, h, s, c, I, J, m, HO, WO, C, CB, K)
            tl.store(gx_ptr + (s * CB + c) * HW + offs, acc, mask=m)
    if NEED_HALL:
        for p in tl.static_range(C):
            g = tl.load(gy_ptr + (s * C + p) * HW + offs, mask=m, other=0.0)
            tl.store(dbpart_ptr + (s * T + t) * C + p, tl.sum(g, axis=0))


@triton.jit
def _segment_program(starts_ptr, P, BLOCK: tl.constexpr):
    """(g, offs, m, start, end) of a (segment g, column tile) program: its columns, their mask and the segment's
    sorted positions [start, end)."""
    g = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return g, offs, offs < P, tl.load(starts_ptr + g), tl.load(starts_ptr + g + 1)


@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, starts_ptr, out_ptr, P, BLOCK: tl.constexpr):
    """out[g, tile] = Σ_{k in [starts[g], starts[g+1])} src[order[k], tile] (fixed order: deterministic)."""
    g, offs, m, k, end = _segment_program(starts_ptr, P, BLOCK)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    while k < end:
        r = tl.load(order_ptr + k)
        acc += tl.load(src_ptr + r * P + offs, mask=m, other=0.0)
        k += 1
    tl.store(out_ptr + g * P + offs, acc, mask=m)


@triton.jit
def _segment_runs_kernel(src_ptr, order_ptr, seg_sorted_ptr, partial_ptr, R, P, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):  # fmt: skip
    """Stage 1 of the chunked sum: chunk c = sorted positions [c CHUNK, (c + 1) CHUNK); each run of one segment id
    inside it summed in order into partial[head, tile], head = the run's first sorted position."""
    c = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < P
    k = c * CHUNK
    end = tl.minimum(k + CHUNK, R)
    head = k
    cur = tl.load(seg_sorted_ptr + k)
    acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    while k < end:
        s = tl.load(seg_sorted_ptr + k)
        if s != cur:
            tl.store(partial_ptr + head * P + offs, acc, mask=m)
            acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
            head = k
            cur = s
        r = tl.load(order_ptr + k)
        acc += tl.load(src_ptr + r * P + offs, mask=m, other=0.0)
        k += 1
    tl.store(partial_ptr + head * P + offs, acc, mask=m)


@triton.jit
def _segment_heads_kernel(partial_ptr, starts_ptr, out_ptr, P, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2: out[g, tile] = the sum of segment g's run heads in order: its first sorted position, then every
    chunk boundary inside the segment (where stage 1 started a new run)."""
    g, offs, m, k, end = _segment_program(starts_ptr, P, BLOCK)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    while k < end:
        acc += tl.load(partial_ptr + k * P + offs, mask=m, other=0.0)
        k = (k // CHUNK + 1) * CHUNK
    tl.store(out_ptr + g * P + offs, acc, mask=m)


def _block(size: int, cap: int = 1024) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def segment_sum(src: torch.Tensor, seg: torch.Tensor, num_segments: int, method: str = "auto") -> torch.Tensor:
    """out [S, P]: rows of ``src`` [R, P] summed per segment id ``seg`` [R] (int64 in [0, S)).

    ``method``: ``onehot`` (a 0/1 [S, R] matrix times ``src``), ``sorted`` (the Triton reduction over the rows
    sorted by segment: one stage up to ROWS_PER_CHUNK rows, two above, in chunks of ``_chunk_rows(R)``) or
    ``auto`` (onehot for S <= ONEHOT_MAX_SEGMENTS, else sorted). Nothing is read back to the host: every grid is
    sized by R, S and P.
    """
    R, P = src.shape
    if method == "auto":
        method = "onehot" if num_segments <= ONEHOT_MAX_SEGMENTS else "sorted"
    if method not in ("onehot", "sorted"):
        raise ValueError(f"segment_sum: unknown method {method!r}: choose auto, onehot or sorted")
    seg = seg.to(torch.int64)
    if method == "onehot":
        segments = torch.arange(num_segments, device=src.device, dtype=torch.int64)
        return (segments[:, None] == seg[None, :]).to(src.dtype) @ src
    out = torch.empty((num_segments, P), dtype=src.dtype, device=src.device)
    if num_segments == 0 or P == 0:
        return out
    # Segment starts in sorted order from per-segment row counts. Not torch.bincount: on CUDA it reads the ids'
    # range back to size its output (two device syncs per call, every backward step of a streamed unroll); ``seg``
    # lies in [0, num_segments) (the callers check).
    counts = torch.zeros(num_segments, dtype=torch.int64, device=seg.device).scatter_add_(0, seg, torch.ones_like(seg))
    starts = torch.zeros(num_segments + 1, dtype=torch.int64, device=src.device)
    starts[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(seg, stable=True)
    BLOCK = _block(P)
    tiles = triton.cdiv(P, BLOCK)
    src = src.contiguous()
    if R <= ROWS_PER_CHUNK:
        _segment_sum_kernel[(num_segments, tiles)](src, order, starts, out, P, BLOCK=BLOCK)
        return out
    # Two stages, so that one segment shared by a whole batch does not serialize on one program: runs within fixed
    # chunks of the sorted rows, then each segment's run heads (partial's other rows are never written or read).
    chunk = _chunk_rows(R)
    partial = torch.empty((R, P), dtype=src.dtype, device=src.device)
    runs_grid = (triton.cdiv(R, chunk), tiles)
    _segment_runs_kernel[runs_grid](src, order, seg[order], partial, R, P, CHUNK=chunk, BLOCK=BLOCK)
    _segment_heads_kernel[(num_segments, tiles)](partial, starts, out, P, CHUNK=chunk, BLOCK=BLOCK)
    return out


def _chunk_rows(R: int) -> int:
    """Rows per chunk of the two-stage sum over R rows: about sqrt(R) (a power of two in [8, ROWS_PER_CHUNK]), so
    that neither stage adds much more than sqrt(R) rows in sequence (stage 1: a chunk; stage 2: one run head per
    chunk a segment spans) and stage 1 has ~sqrt(R) programs per column tile. Chosen from R alone: no host read."""
    return max(8, min(ROWS_PER_CHUNK, triton.next_power_of_2(math.isqrt(R))))


def _dims(bases: torch.Tensor, enc_weight: torch.Tensor):
    M, CB, H, W = bases.shape
    Hn, C, _, K, _ = enc_weight.shape
    return M, CB, H, W, Hn, C, K, H - K + 1, W - K + 1


def generate_forward(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx,
                     hall_idx) -> torch.Tensor:
    """out [n, C, H, W] = dec_h(scale_h · enc_h(bases[b]) + shift_h); shapes as ``haba_fast.ops.generate``."""
    _, CB, H, W, _, C, K, HO, WO = _dims(bases, enc_weight)
    n = base_idx.shape[0]
    out = torch.empty((n, C, H, W), dtype=bases.dtype, device=bases.device)
    if n == 0:
        return out
    a = torch.empty((n, C, HO, WO), dtype=bases.dtype, device=bases.device)
    bidx, hidx = base_idx.contiguous(), hall_idx.contiguous()
    B1 = _block(HO * WO)
    _generate_enc_kernel[(n, triton.cdiv(HO * WO, B1))](
        bases.contiguous(), enc_weight.contiguous(), enc_bias.contiguous(), scale.contiguous(), shift.contiguous(),
        bidx, hidx, a, H, W, HO, WO, CB=CB, C=C, K=K, BLOCK=B1)
    B2 = _block(H * W)
    _generate_fwd_kernel[(n, triton.cdiv(H * W, B2))](
        a, dec_weight.contiguous(), dec_bias.contiguous(), hidx, out, H, W, HO, WO, C=C, K=K, BLOCK=B2)
    return out


def generate_backward(grad, bases, enc_weight, enc_bias, scale, shift, dec_weight, base_idx, hall_idx,
                      need_bases: bool, need_hall: bool) -> List[torch.Tensor]:
    """Gradients (bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias) from dL/dout [n, C, H, W].

    A gradient that is not wanted comes back as an empty tensor of shape [0].
    """
    M, CB, H, W, Hn, C, K, HO, WO = _dims(bases, enc_weight)
    n = base_idx.shape[0]
    dev, dt = bases.device, bases.dtype
    empty = torch.empty((0,), dtype=dt, device=dev)
    bases = bases.contiguous()
    enc_weight = enc_weight.contiguous()
    grad = grad.contiguous()
    bidx, hidx = base_idx.contiguous(), hall_idx.contiguous()
    P = HO * WO
    PW = C * CB * K * K + C + C * C * K * K
    B1 = _block(P)
    T1 = triton.cdiv(P, B1)
    B2 = _block(H * W)
    T2 = triton.cdiv(H * W, B2)
    gz = torch.empty((n, C, HO, WO), dtype=dt, device=dev)
    ss = torch.empty((n, 2, C, HO, WO), dtype=dt, device=dev) if need_hall else gz
    wpart = torch.empty((n * T1, PW), dtype=dt, device=dev) if need_hall else gz
    gxpart = torch.empty((n, CB, H, W), dtype=dt, device=dev) if need_bases else gz
    dbpart = torch.empty((n * T2, C), dtype=dt, device=dev) if need_hall else gz
    if n > 0 and (need_bases or need_hall):
        _generate_bwd_kernel[(n, T1)](
            bases, enc_weight, enc_bias.contiguous(), scale.contiguous(), shift.contiguous(), dec_weight.contiguous(),
            grad, bidx, hidx, gz, ss, wpart, H, W, HO, WO, T1, CB=CB, C=C, K=K, BLOCK=B1, NEED_HALL=bool(need_hall))
        _generate_bwd_input_kernel[(n, T2)](
            enc_weight, gz, grad, hidx, gxpart, dbpart, H, W, HO, WO, T2, CB=CB, C=C, K=K, BLOCK=B2,
            NEED_BASES=bool(need_bases), NEED_HALL=bool(need_hall))
    gbases = segment_sum(gxpart.view(n, -1), bidx, M).view(M, CB, H, W) if need_bases else empty
    if not need_hall:
        return [gbases] + [torch.empty((0,), dtype=dt, device=dev) for _ in range(6)]
    ssum = segment_sum(ss.view(n, -1), hidx, Hn).view(Hn, 2, C, HO, WO)
    wsum = segment_sum(wpart, hidx.repeat_interleave(T1), Hn)
    gdb = segment_sum(dbpart, hidx.repeat_interleave(T2), Hn)
    e0, e1 = C * CB * K * K, C * CB * K * K + C
    # clone(): with Hn == 1 the slices are contiguous views of one buffer, and op outputs may not alias
    gew = wsum[:, :e0].reshape(Hn, C, CB, K, K).clone()
    geb = wsum[:, e0:e1].clone()
    gdw = wsum[:, e1:].reshape(Hn, C, C, K, K).clone()
    return [gbases, gew, geb, ssum[:, 0].clone(), ssum[:, 1].clone(), gdw, gdb]
