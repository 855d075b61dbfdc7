"""``embed`` on every network DM accepts, and DM (distribution matching) on them.

The oracles are written here, layer by layer, as DM's reference ``networks.py`` (VICO-UoE/DatasetCondensation,
306245d) writes ``embed``: ConvNet, AlexNet and VGG ``features(x).view(B, -1)``; ResNet ``relu(bn1(conv1(x)))``,
``layer1..layer4``, the final pooling, ``view(B, -1)``. haba_fast's AlexNet and VGG pool adaptively before the
classifier (HaBa's networks; identity at the reference sizes), so their oracle pools too. MLP and LeNet have no
``embed`` there, nor here, and DM refuses them, as it refuses BatchNorm models. Everything in float64, at each
model's smallest image size where its embedding depends on the input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haba_fast import data
from haba_fast.distill import DistillConfig, Distiller, apply_objective
from haba_fast.models import NETWORK_NAMES, VGG, AlexNet, ConvNet, ResNet, get_network
from haba_fast.objectives.base import ObjectiveSetup
from haba_fast.objectives.distribution import DistributionMatching, distribution_match_loss

D = torch.float64
K = 3  # classes
# Sizes tried when looking for a model's smallest image (every model's minimum, for 1 and 3 channels, is one).
_CANDIDATE_SIZES = (1, 2, 4, 8, 12, 16, 28, 32, 60, 64, 124, 128, 252, 256)
# The final Linear of each class, by its reference module name (independent of the models' own ``head``).
_HEAD = {ConvNet: "classifier", AlexNet: "fc", VGG: "classifier", ResNet: "classifier"}


def _has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# Where the smallest image that builds gives an embedding that does not depend on the input, the smallest that
# does: an instance norm over a 1x1 map outputs its bias whatever comes in (ResNet18's last stage is 1x1 up to 8x8
# images, ResNet18_AP's up to 15x15; ConvNetNP's only conv with 3 channels keeps a 1x1 image 1x1).
_NOT_CONSTANT = {
    ("ResNet18", 1): 9,
    ("ResNet18", 3): 9,
    ("ResNet18_AP", 1): 16,
    ("ResNet18_AP", 3): 16,
    ("ConvNetNP", 3): 2,
}


def _min_size(name: str, channel: int) -> int:
    """The smallest image side (of ``_CANDIDATE_SIZES``) at which ``name``'s embedding depends on its input."""
    if (name, channel) in _NOT_CONSTANT:
        return _NOT_CONSTANT[name, channel]
    for s in _CANDIDATE_SIZES:
        try:
            get_network(name, channel, K, s, device="meta")
            return s
        except ValueError:
            continue
    raise AssertionError(f"no candidate size fits {name}")


@functools.lru_cache(maxsize=None)
def _meta(name: str) -> nn.Module:
    return get_network(name, 3, K, 256, device="meta")  # 3x256x256 fits every network


ACCEPTED = [n for n in NETWORK_NAMES if hasattr(_meta(n), "embed") and not _has_batchnorm(_meta(n))]
# The deep ConvNets need 60-252 pixel images (one 2x2 pool per block): too slow in float64 for the default suite.
# They run the same code (ConvNet's features, then flatten) as ConvNetD1..D5, which are tested.
_TOO_BIG = {"ConvNetD6", "ConvNetD7", "ConvNetD8"}
# Every accepted network with one channel; each class with three too (the first conv's padding depends on the
# channel count in ConvNet, AlexNet and VGG).
CASES = [(n, 1) for n in ACCEPTED if n not in _TOO_BIG]
CASES += [(n, 3) for n in ("ConvNet", "ConvNetNP", "AlexNet", "VGG11", "ResNet18", "ResNet18_AP")]


def test_models_with_embed_are_the_reference_ones():
    """DM's reference has ``embed`` on ConvNet, AlexNet, VGG and ResNet(_AP), not on MLP and LeNet."""
    with_embed = {type(_meta(n)) for n in NETWORK_NAMES if hasattr(_meta(n), "embed")}
    assert with_embed == set(_HEAD)
    without = {n for n in NETWORK_NAMES if not hasattr(_meta(n), "embed")}
    assert without == {"MLP", "LeNet"}
    refused_bn = {n for n in NETWORK_NAMES if _has_batchnorm(_meta(n))}
    assert refused_bn == {"ConvNetBN", "VGG11BN", "ResNet18BN", "ResNet18BN_AP"}
    assert set(ACCEPTED) == set(NETWORK_NAMES) - without - refused_bn
    assert {"AlexNet", "VGG11", "ResNet18", "ResNet18_AP", "ConvNet"} <= set(ACCEPTED)


def oracle_embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference's ``embed``, layer by layer from the modules (not through the model's own methods)."""
    if isinstance(net, ConvNet):
        out = net.features(x)
    elif isinstance(net, (AlexNet, VGG)):
        out = net.pool(net.features(x))
    elif isinstance(net, ResNet):
        out = F.relu(net.bn1(net.conv1(x)))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            out = layer(out)
        if not net.ap:
            out = F.adaptive_avg_pool2d(out, 1)
    else:
        raise AssertionError(f"no oracle for {type(net).__name__}")
    return out.reshape(out.shape[0], -1)


def _net(name: str, channel: int, size: int, seed: int = 0) -> nn.Module:
    return get_network(name, channel, K, size, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("name,channel", CASES)
def test_embed_is_the_classifier_input(name, channel):
    size = _min_size(name, channel)
    net = _net(name, channel, size)
    head = getattr(net, _HEAD[type(net)])
    assert isinstance(head, nn.Linear) and net.head is head
    x = torch.randn(4, channel, size, size, generator=torch.Generator().manual_seed(1), dtype=D)
    e = net.embed(x)
    assert e.shape == (4, head.in_features) and e.dtype == D
    torch.testing.assert_close(e, oracle_embed(net, x), rtol=1e-12, atol=1e-12)
    logits = net(x)
    torch.testing.assert_close(head(e), logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.linear(oracle_embed(net, x), head.weight, head.bias), logits, rtol=1e-12, atol=1e-12)
    assert (e - e[:1]).abs().max() > 1e-6  # the features depend on the input (not a degenerate size)
    with pytest.raises(ValueError, match=f"{type(net).__name__} was built for inputs"):
        net.embed(torch.randn(1, channel + 1, size, size, dtype=D))


def oracle_dm_loss(net: nn.Module, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """``sum_c || mean embed(real_c).detach() - mean embed(syn_c) ||^2``, one class at a time."""
    total = syn.new_zeros(())
    for c in range(real.shape[0]):
        mu_real = oracle_embed(net, real[c]).detach().mean(0)
        mu_syn = oracle_embed(net, syn[c]).mean(0)
        total = total + ((mu_real - mu_syn) ** 2).sum()
    return total


@pytest.mark.parametrize("name,channel", CASES)
def test_dm_loss_matches_oracle(name, channel):
    size = _min_size(name, channel)
    net = _net(name, channel, size, seed=2)
    for p in net.parameters():  # as the objective does: the network is fixed
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    R, S = 3, 2
    real = torch.randn(K, R, channel, size, size, generator=g, dtype=D).requires_grad_(True)
    syn = torch.randn(K, S, channel, size, size, generator=g, dtype=D).requires_grad_(True)
    loss = distribution_match_loss(net.embed, real, syn)
    ref = oracle_dm_loss(net, real, syn)
    assert loss.dim() == 0 and loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, [syn], retain_graph=True)
    (grad_ref,) = torch.autograd.grad(ref, [syn])
    assert grad_ref.abs().max() > 1e-8
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10 * grad_ref.abs().max().item())
    # The real side is detached: the loss does not reach the real images.
    assert torch.autograd.grad(loss, [real], allow_unused=True) == (None,)


def _setup(model: str, channel: int, size: int) -> ObjectiveSetup:
    g = torch.Generator().manual_seed(0)
    n = 4 * K
    dataset = SimpleNamespace(
        train_images=torch.randn(n, channel, size, size, generator=g),
        train_labels=torch.arange(K).repeat(n // K),
        channels=channel,
        num_classes=K,
        im_size=(size, size),
    )
    cfg = dataclasses.replace(apply_objective(DistillConfig(), "dm"), model=model, device="cpu")
    return ObjectiveSetup(cfg, dataset, torch.device("cpu"), g, None, None)


@pytest.mark.parametrize("model", ["MLP", "LeNet"])
def test_dm_refuses_a_model_without_embed(model):
    with pytest.raises(ValueError, match=rf"objective dm: --model {model} \({model}\) has no embed\(\)"):
        DistributionMatching(_setup(model, 1, 28))


@pytest.mark.parametrize("model", ["ConvNetBN", "VGG11BN", "ResNet18BN", "ResNet18BN_AP"])
def test_dm_refuses_batchnorm_models(model):
    with pytest.raises(ValueError, match=rf"objective dm: --model {model} has BatchNorm layers"):
        DistributionMatching(_setup(model, 1, 28))


@pytest.mark.parametrize("model,size", [("AlexNet", 4), ("VGG11", 28), ("ResNet18", 1), ("ResNet18_AP", 8)])
def test_dm_objective_accepts_non_convnet_models(model, size):
    obj = DistributionMatching(_setup(model, 1, size))
    assert obj.describe().startswith("objective dm")


def test_distiller_dm_step_with_alexnet():
    """One DM update with AlexNet (the smallest non-ConvNet model that takes digits' 1x8x8 images)."""
    digits = data.load("digits", subset_per_class=10, generator=torch.Generator().manual_seed(0))
    cfg = dataclasses.replace(
        apply_objective(DistillConfig(), "dm"),
        dataset="digits",
        model="AlexNet",
        ipc=1,
        n_hallucinators=2,
        device="cpu",
        num_eval=0,
        iterations=1,
        batch_real=4,
        parameterization="haba",
        seed=0,
    )
    d = Distiller(cfg, digits)
    before = [p.detach().clone() for p in d.synthetic.parameters()]
    metrics = d.step()
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, d.synthetic.parameters()))
