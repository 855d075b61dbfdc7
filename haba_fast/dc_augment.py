"""DC's evaluation augmentation: DatasetCondensation's non-differentiable ``augment`` with ``get_daparam``'s settings.

DC's ``main.py`` (``--method DC``, no DSA) trains each evaluation network on training batches that pass through
``augment(images, dc_aug_param)``, whose strategy ``get_daparam(dataset, model, model_eval, ipc)`` chooses:
``crop_scale_rotate`` on MNIST, ``crop_noise`` for a ConvNetBN evaluation network (it wins over MNIST's), else
``none``; and where the strategy is not ``none`` it trains ``1000`` epochs instead of ``300`` (:data:`DC_AUG_EPOCHS`).
Only the evaluation's training batches are augmented (not the distillation, not the test set). DSA's evaluation
(``--method DSA``, DM) uses DSA instead and never this.

Per batch, the channel means of the batch as it came are computed first; then every image gets ONE transform,
drawn uniformly among the strategy's:

- ``crop``: the image padded by ``crop`` = 4 pixels of its channel's batch mean, and an ``H×W`` window taken at row
  and column offsets drawn uniformly from ``[0, 2·crop)`` (offset ``crop`` is the image itself);
- ``scale``: resized (nearest, ``F.interpolate``'s default) to ``h = int(u·H)``, ``w = int(v·H)`` (``H`` for both,
  as the reference), ``u, v ~ U(1 - 0.2, 1 + 0.2)``, centred on a zero canvas of side ``max(h, w, H, W)``, whose
  centre ``H×W`` is kept;
- ``rotate``: ``scipy.ndimage.rotate`` by an integer angle drawn from ``[-45, 45)`` degrees over the image plane
  (cubic spline, the canvas enlarged to hold the whole rotated image, outside filled with the mean of the channel
  means), centre ``H×W`` kept;
- ``noise``: ``+ 0.001 · N(0, 1)`` per pixel.

Differences from the public code: the draws come from the given ``torch.Generator`` (the reference uses NumPy's
global generator), so the distribution is the reference's but not its random stream; and ``scale`` keeps at least
one pixel of height and width on images of under 2 pixels (where the reference fails).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DC_AUG_EPOCHS", "DC_AUG_TRANSFORMS", "dc_aug_strategy", "dc_augment", "check_dc_aug_strategy"]

CROP = 4  # get_daparam's dc_aug_param
SCALE = 0.2
ROTATE = 45
NOISE = 0.001
DC_AUG_EPOCHS = 1000  # main.py's evaluation epochs whenever dc_aug_param's strategy is not 'none'
DC_AUG_TRANSFORMS = ("crop", "scale", "rotate", "noise")


def dc_aug_strategy(dataset: str, model: str) -> str:
    """``get_daparam``'s strategy for evaluating ``model`` on ``dataset`` (any spelling ``data.canonical_name``
    takes): ``crop_noise`` for ConvNetBN, ``crop_scale_rotate`` on MNIST, else ``none``."""
    from haba_fast.data import canonical_name

    if model == "ConvNetBN":
        return "crop_noise"
    return "crop_scale_rotate" if canonical_name(dataset) == "mnist" else "none"


def check_dc_aug_strategy(strategy: str) -> list[str]:
    """The transforms of ``strategy`` (``"none"``: none); ValueError naming an unknown one."""
    if not isinstance(strategy, str) or not strategy:
        raise ValueError(f"a DC augmentation strategy is a non-empty str such as 'crop_scale_rotate', got {strategy!r}")
    if strategy.lower() == "none":
        return []
    parts = strategy.split("_")
    unknown = [p for p in parts if p not in DC_AUG_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown DC augmentation {unknown[0]!r} in strategy {strategy!r}: use transforms of "
                         f"{', '.join(DC_AUG_TRANSFORMS)} joined by '_', or 'none'")
    return parts


def dc_augment(images: Tensor, strategy: str, generator: torch.Generator) -> Tensor:
    """A new batch ``[n, C, H, W]`` (``images``' dtype): every image through one transform of ``strategy`` (module
    docstring).

    Args:
        images: ``[n, C, H, W]`` floating batch (any device; ``rotate`` runs on the CPU, as in the reference).
        strategy: ``"none"`` or transforms of :data:`DC_AUG_TRANSFORMS` joined by ``"_"``.
        generator: CPU ``torch.Generator`` for every draw.
    """
    transforms = check_dc_aug_strategy(strategy)
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"dc_augment takes a floating [n, C, H, W] batch, got {images.dtype} "
                         f"{list(images.shape)}")
    out = images.detach().clone()
    if not transforms or out.shape[0] == 0:
        return out
    n, C, H, W = out.shape
    means = out.mean(dim=(0, 2, 3))  # [C], of the batch as it came (before any image is changed)
    choice = torch.randint(len(transforms), (n,), generator=generator)
    for i in range(n):
        name = transforms[int(choice[i])]
        if name == "crop":
            r, c = (int(v) for v in torch.randint(2 * CROP, (2,), generator=generator))
            padded = means.view(C, 1, 1).expand(C, H + 2 * CROP, W + 2 * CROP).clone()
            padded[:, CROP:CROP + H, CROP:CROP + W] = out[i]
            out[i] = padded[:, r:r + H, c:c + W]
        elif name == "scale":
            u, v = (float(t) for t in torch.rand(2, generator=generator, dtype=torch.float64))
            h = max(1, int((1 - SCALE + 2 * SCALE * u) * H))
            w = max(1, int((1 - SCALE + 2 * SCALE * v) * H))
            resized = F.interpolate(out[i:i + 1], [h, w])[0]
            side = max(h, w, H, W)
            canvas = out.new_zeros(C, side, side)
            r, c = (side - h) // 2, (side - w) // 2
            canvas[:, r:r + h, c:c + w] = resized
            r, c = (side - H) // 2, (side - W) // 2
            out[i] = canvas[:, r:r + H, c:c + W]
        elif name == "rotate":
            from scipy.ndimage import rotate

            angle = int(torch.randint(-ROTATE, ROTATE, (1,), generator=generator))
            turned = rotate(out[i].cpu().numpy(), angle=angle, axes=(-2, -1), cval=float(np.mean(means.tolist())))
            r, c = (turned.shape[-2] - H) // 2, (turned.shape[-1] - W) // 2
            out[i] = torch.from_numpy(np.ascontiguousarray(turned[:, r:r + H, c:c + W])).to(out)
        else:  # noise
            out[i] = out[i] + NOISE * torch.randn(C, H, W, generator=generator).to(out)
    return out
