"""HaBa's adversarial contrastive term.

An *adversary* network (3 conv blocks of width 128: conv 3×3, GroupNorm(128, 128) = "instancenorm",
ReLU, AvgPool 2×2; then a linear head on the flattened features f) learns to tell that two
hallucinations of the same bases are the same content; the hallucinators are trained against it.
Per iteration (the reference's order):

* club term, added to the distillation loss of bases / hallucinators / lr:
  ``λ_club · mean((cos(f(x_a), f(x_b)) + 1) / 2)``, where x_a, x_b are the same bases under two
  different hallucinators, augmented together in one DSA call;
* adversary update on a fresh batch drawn the same way, with
  ``λ_cls · CE(logits, labels) + λ_likeli · mean((1 − cos(f(x_a), f(x_b))) / 2) + λ_contrast · SupCon_τ=0.07``
  where SupCon takes the L2-normalized features of both views.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast.init import default_init_, pair

__all__ = ["Adversary", "AdversaryWeights", "club_loss", "supcon_loss", "adversary_loss"]


class Adversary(nn.Module):
    """The adversary ("content extractor") of HaBa.

    Args:
        channel: input channels C.
        num_classes: K, the head's outputs.
        im_size: (H, W) of the inputs.
        width: conv width (128 in the reference).
        depth: number of conv blocks (3 in the reference).
        generator: initializes the weights reproducibly; when given, the global RNG is neither read nor advanced
            (None: the modules' own init from the global RNG, as PyTorch does).

    Forward: x [B, C, H, W] -> (logits [B, K], features [B, width · H' · W']).
    """

    def __init__(
        self,
        channel: int,
        num_classes: int,
        im_size: Sequence[int] = (32, 32),
        *,
        width: int = 128,
        depth: int = 3,
        generator: torch.Generator = None,
    ):
        super().__init__()
        # With a generator, build on the meta device so the modules' own reset_parameters() draw nothing from the
        # global RNG, then materialize on the generator's device and draw every weight from the generator.
        with torch.device("meta") if generator is not None else contextlib.nullcontext():
            self._build(channel, num_classes, pair(im_size), width, depth)
        if generator is not None:
            self.to_empty(device=generator.device)
            default_init_(self, generator)

    def _build(self, channel: int, num_classes: int, im_size: tuple[int, int], width: int, depth: int) -> None:
        layers = []
        h, w = im_size
        in_ch = channel
        for d in range(depth):
            # As the reference ConvNet: padding 3 on a single-channel first layer (28×28 becomes 32×32).
            pad = 3 if (d == 0 and channel == 1) else 1
            layers += [
                nn.Conv2d(in_ch, width, kernel_size=3, padding=pad),
                nn.GroupNorm(width, width, eps=1e-5, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            h, w = (h + 2 * pad - 2) // 2, (w + 2 * pad - 2) // 2
            if h < 1 or w < 1:
                raise ValueError(f"images of size {tuple(im_size)} are too small for an adversary of depth {depth}")
            in_ch = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        feat = self.features(x)
        return self.classifier(feat), feat


@dataclass(frozen=True)
class AdversaryWeights:
    """λ weights of the adversarial term (the reference's --lambda_*_content flags)."""

    club: float = 0.1
    cls: float = 1.0
    likeli: float = 1.0
    contrast: float = 1.0
    temperature: float = 0.07


def club_loss(feat_a: Tensor, feat_b: Tensor) -> Tensor:
    """``mean((cos(f_a, f_b) + 1) / 2)`` over the batch (0-dim); f_a, f_b: [B, D]. Unweighted."""
    return ((F.cosine_similarity(feat_a, feat_b, dim=1) + 1.0) / 2.0).mean()


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), "all" anchors.

    Args:
        features: [B, V, D] L2-normalized features, V views per sample.
        labels: [B] int64; samples with equal labels are positives.
        temperature: τ of the logits.
        base_temperature: the loss is scaled by τ / base_temperature.

    Returns:
        0-dim loss: −(τ/τ_b) · mean over anchors of the mean log-probability of their positives among
        all other samples (the anchor itself excluded).
    """
    if features.dim() != 3:
        raise ValueError(f"supcon_loss: features must be [B, V, D], got shape {tuple(features.shape)}")
    B, V = features.shape[:2]
    if labels.shape != (B,):
        raise ValueError(f"supcon_loss: labels must be [{B}], got shape {tuple(labels.shape)}")
    z = features.transpose(0, 1).reshape(V * B, -1)  # view-major, as torch.cat(unbind(features, 1))
    y = labels.repeat(V)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(V * B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    mean_log_prob_pos = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1).clamp_min(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def adversary_loss(
    adversary: nn.Module, x_pair: Tensor, labels: Tensor, weights: AdversaryWeights
) -> Dict[str, Tensor]:
    """The adversary's own loss on ``x_pair = cat([x_a, x_b])`` [2B, C, H, W] with labels [B].

    Returns:
        dict of 0-dim tensors: ``total``, ``cls``, ``likeli``, ``contrast`` (the last three weighted).
    """
    B = labels.shape[0]
    if x_pair.shape[0] != 2 * B:
        raise ValueError(f"adversary_loss: x_pair must hold 2 × {B} samples, got {x_pair.shape[0]}")
    logits, feat = adversary(x_pair)
    cls = F.cross_entropy(logits, torch.cat([labels, labels])) * weights.cls
    f_a, f_b = feat[:B], feat[B:]
    likeli = ((1.0 - F.cosine_similarity(f_a, f_b, dim=1)) / 2.0).mean() * weights.likeli
    z = torch.stack([F.normalize(f_a, dim=1), F.normalize(f_b, dim=1)], dim=1)
    contrast = supcon_loss(z, labels, weights.temperature) * weights.contrast
    return {"total": cls + likeli + contrast, "cls": cls, "likeli": likeli, "contrast": contrast}
