"""PNG grids of synthetic images (PIL; no matplotlib needed).

``save_grid`` writes a tiled PNG atomically; ``synthetic_grid`` pictures a distilled set (HaBa or pixels);
``haba_grid`` lays out a HaBa set as one row block of
bases followed by one block per hallucinator (each basis through that hallucinator, in the same
column as its basis). ``to_unit`` maps network-space images to [0, 1] for display: with a
``denormalize`` callable (e.g. ``Dataset.denormalize``, or ``denormalizer(mean, std)``) when the
normalization is known, else per-image min-max scaling (what the reference's
``make_grid(normalize=True, scale_each=True)`` shows).
"""

from __future__ import annotations

import io as _io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Union

import torch
from torch import Tensor

from haba_fast import io as hio

__all__ = [
    "MIN_DISPLAY_SIZE",
    "denormalizer",
    "haba_grid",
    "save_grid",
    "synthetic_grid",
    "to_unit",
]

PathLike = Union[str, os.PathLike]

# Tiles smaller than this (pixels, longer side) are upsampled by an integer factor (nearest) so that
# 8x8 digits are visible: 8 -> 64, 28 -> 56, 32 -> 64.
MIN_DISPLAY_SIZE = 64


def denormalizer(mean: Sequence[float], std: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """``x -> x * std + mean`` per channel (the inverse of torchvision's Normalize)."""
    m = torch.tensor([float(v) for v in mean])
    s = torch.tensor([float(v) for v in std])
    if m.shape != s.shape or m.dim() != 1:
        raise ValueError(f"mean and std must be sequences of equal length, got {list(mean)} and {list(std)}")

    def apply(x: Tensor) -> Tensor:
        if x.shape[1] != m.numel():
            raise ValueError(f"denormalize: images have {x.shape[1]} channels but mean/std have {m.numel()}")
        return x * s.to(x).view(1, -1, 1, 1) + m.to(x).view(1, -1, 1, 1)

    return apply


def to_unit(x: Tensor, denormalize: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Images ``[N, C, H, W]`` in network space -> ``[N, C, H, W]`` in [0, 1] for display."""
    x = x.detach().float().cpu()
    if denormalize is not None:
        return denormalize(x).clamp(0, 1)
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def _tile(images: Tensor, nrow: int, pad: int, fill: float) -> Tensor:
    n, c, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    canvas = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), fill)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i]
    return canvas


def save_grid(images: Tensor, path: PathLike, nrow: int = 10, *, pad: int = 2, fill: float = 1.0,
              min_size: int = MIN_DISPLAY_SIZE) -> None:
    """Write ``images`` ``[N, C, H, W]`` (values in [0, 1]; C = 1 or 3) as a PNG grid, ``nrow`` per row.

    NaNs show as black; values are clamped to [0, 1]. Tiny images are upsampled (nearest) to at
    least ``min_size`` pixels. The file is written atomically.
    """
    from PIL import Image

    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"save_grid: images must be a [N, C, H, W] tensor, got "
                         f"{list(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError("save_grid: no images to save")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid: images need 1 or 3 channels, got {images.shape[1]}")
    if int(nrow) != nrow or nrow <= 0:
        raise ValueError(f"save_grid: nrow must be a positive int, got {nrow!r}")
    x = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0, 1)
    factor = max(1, -(-min_size // max(x.shape[-2:])))  # ceil
    if factor > 1:
        x = x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    grid = _tile(x, int(nrow), pad, fill)
    arr = (grid * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    hio.atomic_write_bytes(buf.getvalue(), path)


@torch.no_grad()
def haba_grid(haba, path: PathLike, denormalize: Callable[[Tensor], Tensor] | None = None,
              ncol: int | None = None) -> None:
    """PNG of a HaBa set: a row block of the bases, then one block per hallucinator.

    Block ``h`` holds every basis through hallucinator ``h``, in the same position as its basis, so
    a column shows one basis and its hallucinations. Single-channel bases are shown in gray.

    Args:
        haba: a ``haba_fast.factorization.HaBa``.
        path: PNG file to write.
        denormalize: maps network-space images to [0, 1]; None = per-image min-max.
        ncol: images per row (default: all bases of a block on one row, at most 20).
    """
    M, Hn = haba.num_bases, haba.n_hallucinators
    ncol = min(M, 20) if ncol is None else int(ncol)
    if ncol <= 0:
        raise ValueError(f"haba_grid: ncol must be a positive int, got {ncol}")
    bases = haba.bases.detach()
    if bases.shape[1] == haba.channels:
        blocks = [to_unit(bases, denormalize)]
    else:
        # Single-channel bases are not in the data's per-channel space: show them min-max scaled, in gray.
        gray = to_unit(bases.mean(dim=1, keepdim=True), None)
        blocks = [gray.expand(-1, haba.channels, -1, -1)]
    base_idx = torch.arange(M, device=haba.bases.device)
    for h in range(Hn):
        blocks.append(to_unit(haba.generate(base_idx, h), denormalize))
    rows_per_block = math.ceil(M / ncol)
    c, hh, ww = blocks[0].shape[1:]
    tiles = torch.ones(len(blocks) * rows_per_block * ncol, c, hh, ww)  # white spacer tiles fill short rows
    for i, block in enumerate(blocks):
        start = i * rows_per_block * ncol
        tiles[start:start + M] = block
    save_grid(tiles, path, nrow=ncol)


def synthetic_grid(syn, path: PathLike) -> Path:
    """PNG of a synthetic set: HaBa's bases and every hallucination of them, or the pixel images (one row per class).

    Every image is min-max scaled on its own, as the reference's pictures (``make_grid(normalize=True,
    scale_each=True)``): distilled images leave the data's range, and clamping them to it saturates the picture.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    from haba_fast.objectives.mtt import is_haba

    if is_haba(syn):
        haba_grid(syn, path, denormalize=None)
    else:
        save_grid(to_unit(syn.images, None), path, nrow=max(1, int(syn.ipc)))
    return Path(path)
