"""Distribution matching: DM (Zhao & Bilen, WACV 2023), for any parameterization.

One synthetic update (one ``Distiller.step``):

1. a fresh randomly initialized network (``cfg.model``; never trained), its ``embed`` = the features before the
   final Linear (every network of :mod:`haba_fast.models` but MLP and LeNet has one, as in DM's reference
   ``networks.py``; those two, and BatchNorm models, are refused);
2. per class c, a real batch of that class (``batch_real``) and the class's synthetic batch (every stored row;
   HaBa: every basis through every hallucinator, see :mod:`haba_fast.objectives.base`), augmented with the same
   DSA draw (one per class: :func:`~haba_fast.objectives.base.siamese_augment`) unless augmentation is off;
3. loss = ``sum_c || mean embed(real_c) - mean embed(syn_c) ||^2``.

All classes are embedded in one forward per side: every network DM accepts is per sample (no norm, or instance,
group or layer norm; BatchNorm models are refused), so batching classes together changes nothing. Soft labels:
the synthetic mean of class c weights every synthetic sample by its probability of c, ``m_c = sum_i p_ic f_i /
sum_i p_ic`` over all synthetic samples (with one-hot labels this is the plain class mean), so the loss trains the
label logits too.

Defaults of the public code (main_DM.py): ``lr_img`` 1.0, momentum 0.5, DSA on, evaluation with the fixed
``lr_net`` 0.01.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from haba_fast.objectives.base import (
    Objective,
    ObjectiveOutput,
    ObjectiveSetup,
    RealSampler,
    fresh_network,
    register_objective,
    siamese_augment,
    synthetic_classes,
)

__all__ = ["distribution_match_loss", "DistributionMatching"]


def distribution_match_loss(embed, real: Tensor, syn: Tensor, soft: Optional[Tensor] = None) -> Tensor:
    """DM's loss (0-dim).

    Args:
        embed: features ``[B, D]`` of images ``[B, C, H, W]`` (a network's ``embed``).
        real: ``[K, R, C, H, W]`` real batches (no gradient).
        syn: ``[K, S, C, H, W]`` synthetic batches (differentiable).
        soft: None, or ``[K, S, K]`` soft targets: class means weighted by the samples' class probabilities.

    Returns:
        ``sum_c ||mean_r f(real_c,r) - m_c||^2`` with ``m_c`` the (weighted) synthetic mean of class c.
    """
    K, R = real.shape[:2]
    S = syn.shape[1]
    with torch.no_grad():
        f_real = embed(real.reshape(K * R, *real.shape[2:])).reshape(K, R, -1).mean(dim=1)
    f_syn = embed(syn.reshape(K * S, *syn.shape[2:]))
    if soft is None:
        m_syn = f_syn.reshape(K, S, -1).mean(dim=1)
    else:
        w = soft.reshape(K * S, -1)  # [KS, K]: weight of every sample in every class
        m_syn = (w.t() @ f_syn) / w.sum(dim=0).unsqueeze(1)
    return (f_real - m_syn).pow(2).sum()


@register_objective
class DistributionMatching(Objective):
    """DM (see the module docstring)."""

    name = "dm"
    momentum = 0.5
    # main_DM.py: lr_img 1.0 (momentum 0.5), DSA on, IPC 50, 20 evaluation networks, real init; hallucinators get
    # the bases' rate. It runs 20000 updates and evaluates every 2000 from iteration 0.
    defaults = {"lr_img": 1.0, "lr_style": 1.0, "dsa": True, "epoch_eval_train": 1000, "ipc": 50, "num_eval": 20,
                "pix_init": "real"}
    reference_schedule = (20000, 2000)

    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        self.strategy = setup.strategy
        self.real = RealSampler(setup.dataset, self.device)
        self.dataset = setup.dataset
        # Fail now, not at the first step, on a model DM cannot use.
        net = fresh_network(self.cfg, self.dataset, torch.Generator().manual_seed(0), "meta", what=self.name)
        if not callable(getattr(net, "embed", None)):
            raise ValueError(
                f"objective dm: --model {self.cfg.model} ({type(net).__name__}) has no embed() (the features before "
                "its final Linear, which DM matches), as in DM's reference; use a model with one: the ConvNet "
                "family, AlexNet, VGG11, ResNet18 or ResNet18_AP"
            )

    def describe(self) -> str:
        aug = f", Siamese DSA {self.strategy}" if self.strategy else ", no augmentation"
        return f"objective dm: distribution matching{aug}"

    def loss(self, syn: nn.Module, lr: Tensor) -> ObjectiveOutput:
        net = fresh_network(self.cfg, self.dataset, self.generator, self.device, what=self.name)
        for p in net.parameters():
            p.requires_grad_(False)
        x_syn, _, soft = synthetic_classes(syn)
        real = self.real.sample(int(self.cfg.batch_real), self.generator)
        real, x_syn, _ = siamese_augment(real, x_syn, self.strategy, self.generator)
        return ObjectiveOutput(distribution_match_loss(net.embed, real, x_syn, soft))
