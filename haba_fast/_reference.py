"""Pure-PyTorch reference of every op: the oracle for tests and the fallback backend.

Written for clarity, not speed: plain torch ops, autograd for gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def generate_reference(
    bases: Tensor,
    enc_weight: Tensor,
    enc_bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    dec_weight: Tensor,
    dec_bias: Tensor,
    base_idx: Tensor,
    hall_idx: Tensor,
) -> Tensor:
    """Hallucinate one sample per (basis, hallucinator) pair.

    out[i] = dec_h(scale_h ⊙ enc_h(bases[b]) + shift_h) with b = base_idx[i], h = hall_idx[i];
    enc is a valid k×k convolution (c_b → C), dec a k×k transposed convolution (C → C).

    Args:
        bases: [M, c_b, H, W].
        enc_weight: [Hn, C, c_b, k, k]; enc_bias: [Hn, C].
        scale, shift: [Hn, C, H-k+1, W-k+1].
        dec_weight: [Hn, C, C, k, k] (ConvTranspose2d layout [in, out, k, k]); dec_bias: [Hn, C].
        base_idx, hall_idx: [n] int64.

    Returns:
        [n, C, H, W], same dtype as ``bases``.
    """
    n = base_idx.shape[0]
    C = enc_weight.shape[1]
    H, W = bases.shape[-2:]
    out = bases.new_zeros((n, C, H, W))
    for h in torch.unique(hall_idx).tolist():
        sel = (hall_idx == h).nonzero(as_tuple=True)[0]
        z = F.conv2d(bases[base_idx[sel]], enc_weight[h], enc_bias[h])
        z = z * scale[h] + shift[h]
        y = F.conv_transpose2d(z, dec_weight[h], dec_bias[h])
        out = out.index_put((sel,), y)
    return out


# ---- DSA augmentation --------------------------------------------------------------------------------
# Duck-typed on ``params.family`` / ``params.values`` / ``params.cutout_ratio`` (haba_fast.augment.AugParams)
# so that this module imports nothing from the package. Formulas: ../shared/DESIGN.md, "DSA defaults".


def augment_reference(x: Tensor, params) -> Tensor:
    """DSA-augment a batch under explicit parameters (the oracle of ``ops.augment``).

    Args:
        x: [n, C, H, W] floating images.
        params: an ``AugParams`` (one family, per-sample values [n]) or a list/tuple of them, applied in order.

    Returns:
        [n, C, H, W], same dtype and device as ``x``; differentiable in ``x`` (plain torch ops).
    """
    chain = params if isinstance(params, (list, tuple)) else (params,)
    out = x
    for p in chain:
        out = _augment_one(out, p)
    # A fresh tensor even for identity chains: callers (custom ops) may not return an alias of their input.
    return out.clone() if out is x else out


def _augment_one(x: Tensor, p) -> Tensor:
    if p.n != x.shape[0]:
        raise ValueError(f"augment: params ({p.family}) are for a batch of {p.n}, the images have {x.shape[0]}")
    fn = _AUGMENT_FNS.get(p.family)
    if fn is None:
        raise ValueError(f"augment: unknown family {p.family!r}: choose one of {tuple(_AUGMENT_FNS)}")
    return fn(x, p)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A float value [n] as [n, 1, 1, 1] in x's dtype and device, to broadcast over C, H, W."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(x: Tensor, p) -> Tensor:
    b, s, c = (_per_sample(p.values[k], x) for k in ("brightness", "saturation", "contrast"))
    x = x + (b - 0.5)  # brightness: shift by (r − 0.5)·1.0
    m = x.mean(dim=1, keepdim=True)  # saturation: around the per-pixel channel mean, factor 2r
    x = (x - m) * (s * 2.0) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)  # contrast: around the image mean, factor r + 0.5
    return (x - m) * (c + 0.5) + m


def _shift_axis(x: Tensor, t: Tensor, dim: int) -> Tensor:
    """out[..., i, ...] = x[..., i + t, ...] along ``dim`` (2 or 3), zero where i + t falls outside."""
    n, C, H, W = x.shape
    L = x.shape[dim]
    src = torch.arange(L, device=x.device).view(1, L) + t.to(x.device).view(-1, 1)  # [n, L]
    valid = (src >= 0) & (src < L)
    shape = (n, 1, L, 1) if dim == 2 else (n, 1, 1, L)
    src = src.clamp(0, L - 1).view(shape).expand(n, C, H, W)
    return torch.where(valid.view(shape), x.gather(dim, src), x.new_zeros(()))


def _crop(x: Tensor, p) -> Tensor:
    return _shift_axis(_shift_axis(x, p.values["tx"], 2), p.values["ty"], 3)


def _hole_axis(o: Tensor, c: int, L: int, device) -> Tensor:
    """[n, L] bool: positions clamp(o − c//2 + k, 0, L−1), k in [0, c), i.e. the clamped interval's ends."""
    lo = (o.to(device) - c // 2).clamp(0, L - 1).view(-1, 1)
    hi = (o.to(device) - c // 2 + c - 1).clamp(0, L - 1).view(-1, 1)
    i = torch.arange(L, device=device).view(1, L)
    return (i >= lo) & (i <= hi)


def _cutout(x: Tensor, p) -> Tensor:
    H, W = x.shape[-2:]
    ratio = getattr(p, "cutout_ratio", 0.5)
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    if ch == 0 or cw == 0:  # an empty hole
        return x.clone()
    rows = _hole_axis(p.values["ox"], ch, H, x.device)  # [n, H]
    cols = _hole_axis(p.values["oy"], cw, W, x.device)  # [n, W]
    keep = ~(rows[:, :, None] & cols[:, None, :])  # [n, H, W]
    return x * keep.to(x.dtype).unsqueeze(1)


def _flip(x: Tensor, p) -> Tensor:
    r = p.values["r"].to(x.device).view(-1, 1, 1, 1)
    return torch.where(r < 0.5, x.flip(3), x)


def _affine(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Bilinear resampling (zero padding, align_corners=True) under the per-sample matrices [[a, b, 0], [c, d, 0]]."""
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b, zero], dim=-1), torch.stack([c, d, zero], dim=-1)], dim=-2)  # [n, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: Tensor, p) -> Tensor:
    sx, sy = (p.values[k].to(device=x.device, dtype=x.dtype) for k in ("sx", "sy"))
    zero = torch.zeros_like(sx)
    return _affine(x, sx, zero, zero, sy)


def _rotate(x: Tensor, p) -> Tensor:
    t = p.values["theta"].to(device=x.device, dtype=x.dtype)
    cos, sin = torch.cos(t), torch.sin(t)
    return _affine(x, cos, -sin, sin, cos)


def _identity(x: Tensor, p) -> Tensor:
    return x


_AUGMENT_FNS = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
    "identity": _identity,
}
