"""Small helpers shared by the modules that build parameters: PyTorch's default init from a generator, and sizes.

``default_init_`` / ``uniform_fan_in_`` reproduce ``nn.Conv2d`` / ``nn.Linear`` ``reset_parameters`` (weights and biases
U(±1/√fan_in), i.e. ``kaiming_uniform_(a=√5)``; norm layers weight 1, bias 0) but draw from an explicit
``torch.Generator`` (None: the global RNG, as PyTorch does), so a seed fixes every initial weight without touching
the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["default_init_", "pair", "uniform_fan_in_"]


def pair(value: Union[int, Sequence[int]], name: str = "im_size") -> tuple[int, int]:
    """An int or a pair of positive ints as ``(H, W)``; ValueError naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be an int or a pair (H, W) of positive ints, got {value!r}") from None
    if h < 1 or w < 1 or any(isinstance(v, bool) for v in value) or (h, w) != tuple(value):
        raise ValueError(f"{name} must be an int or a pair (H, W) of positive ints, got {tuple(value)!r}")
    return (h, w)


@torch.no_grad()
def uniform_fan_in_(
    t: Tensor, fan_in: int, generator: Optional[torch.Generator], *, draw_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """Fill ``t`` with U(±1/√fan_in) (0 when fan_in is 0) drawn from ``generator``; returns ``t``.

    The values are drawn on the generator's device in ``draw_dtype`` (default: t's dtype) and copied into ``t``,
    so they do not depend on t's device. A float64 draw gives the same float32 values whatever t's dtype.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    gdev = generator.device if generator is not None else torch.device("cpu")
    dtype = draw_dtype or t.dtype
    if t.device == gdev and t.dtype == dtype:
        return t.uniform_(-bound, bound, generator=generator)
    r = torch.empty(t.shape, dtype=dtype, device=gdev).uniform_(-bound, bound, generator=generator)
    return t.copy_(r)


@torch.no_grad()
def default_init_(net: nn.Module, generator: Optional[torch.Generator]) -> nn.Module:
    """PyTorch's default initialization of every Conv2d / Linear / norm layer, drawn in ``net.modules()`` order."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            # kaiming_uniform_(a=sqrt(5)) gives bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in); the bias uses
            # the same bound (nn.Conv2d / nn.Linear reset_parameters).
            fan_in = m.weight[0].numel()
            uniform_fan_in_(m.weight, fan_in, generator)
            if m.bias is not None:
                uniform_fan_in_(m.bias, fan_in, generator)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.fill_(0.0)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return net
