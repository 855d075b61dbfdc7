"""Pure-PyTorch reference of every op: the oracle for tests and the fallback backend.

Written for clarity, not speed: plain torch ops, autograd for gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from haba_fast.aug_families import family


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


# ---- augmentation --------------------------------------------------------------------------------------
# Each family's reference transform is its ``apply`` in haba_fast.aug_families (the one home of a family);
# this function chains them. Formulas: docs/DESIGN.md, "Augmentation (DSA)".


def augment_reference(x: Tensor, params) -> Tensor:
    """Augment a batch under explicit parameters (the oracle of ``ops.augment``).

    Args:
        x: [n, C, H, W] floating images.
        params: an ``AugParams`` (one family, per-sample values [n]) or a list/tuple of them, applied in order.

    Returns:
        [n, C, H, W], same dtype and device as ``x``; differentiable in ``x`` (plain torch ops).
    """
    chain = params if isinstance(params, (list, tuple)) else (params,)
    out = x
    for p in chain:
        if p.n != x.shape[0]:
            raise ValueError(f"augment: params ({p.family}) are for a batch of {p.n}, the images have {x.shape[0]}")
        out = family(p.family).apply(out, p)
    # A fresh tensor even for identity chains: callers (custom ops) may not return an alias of their input.
    return out.clone() if out is x else out
