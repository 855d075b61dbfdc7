"""haba_fast.init: the one default-init-from-a-generator and the one int-or-pair helper, and their users."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haba_fast.init import default_init_, pair, uniform_fan_in_
from haba_fast.objectives.contrastive import Adversary


def test_pair():
    assert pair(7) == (7, 7) and pair((3, 5)) == (3, 5) and pair([4, 2]) == (4, 2)
    for bad in (0, (3,), (3, 0), (2.5, 3), True, "ab", None, (True, 2), (float("inf"), 3), (3, float("nan"))):
        with pytest.raises(ValueError, match="im_size must be an int or a pair"):
            pair(bad)
    with pytest.raises(ValueError, match="kernel must be"):
        pair(-1, "kernel")


def test_default_init_equals_pytorch_reset_parameters_on_the_same_stream():
    """Same bounds and the same draws as nn.Conv2d / nn.Linear's own init from an equally seeded global RNG."""
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Linear(5, 3))
    ours = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Linear(5, 3))
    state = torch.get_rng_state()
    default_init_(ours, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not read
    g = torch.Generator().manual_seed(0)
    for m in ref.modules():  # PyTorch's reset_parameters with the generator's stream: kaiming_uniform_(a=√5) bounds
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            b = 1 / m.weight[0].numel() ** 0.5
            m.weight.data.uniform_(-b, b, generator=g)
            m.bias.data.uniform_(-b, b, generator=g)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_uniform_fan_in_draw_dtype_keeps_values_across_dtypes():
    a = uniform_fan_in_(torch.empty(50), 9, torch.Generator().manual_seed(1), draw_dtype=torch.float64)
    b = uniform_fan_in_(torch.empty(50, dtype=torch.float64), 9, torch.Generator().manual_seed(1))
    assert torch.equal(a, b.float()) and a.abs().max() <= 1 / 3
    assert torch.equal(uniform_fan_in_(torch.ones(3), 0, None), torch.zeros(3))


def test_adversary_with_a_generator_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = Adversary(3, 10, (16, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in a.parameters())
    assert Adversary(1, 3, 8, generator=torch.Generator().manual_seed(1)).feature_dim == 128  # 8x8 -> 6, 3, 1
