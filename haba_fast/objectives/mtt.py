"""Trajectory matching (MTT) for the ``Pixels`` and ``HaBa`` parameterizations.

One iteration's synthetic inputs are built in ONE batched call for all N unrolled steps: generate
(bases × hallucinator of each step; for Pixels, a gather of images) then DSA with each step's own
parameters, reshaped to [N, B, C, H, W]. The engine then unrolls the student on them and autograd
carries dL/dX back through augment ∘ generate to the bases, hallucinators and the learned lr.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from haba_fast.engines.base import Engine
from haba_fast.plan import StepPlan

__all__ = ["is_haba", "synthetic_labels", "synthetic_samples", "augment_groups", "build_inputs", "trajectory_loss"]


def is_haba(syn: nn.Module) -> bool:
    """True for a factorized (HaBa) synthetic set, False for plain images (Pixels)."""
    return hasattr(syn, "hallucinator_parameters") and hasattr(syn, "bases")


def synthetic_labels(syn: nn.Module) -> Tensor:
    """Labels of the flat class-major rows: HaBa's bases or Pixels' images, [M] int64."""
    labels = syn.base_labels if is_haba(syn) else syn.labels
    return labels.long()


def synthetic_samples(syn: nn.Module, base_idx: Tensor, hall_idx: Optional[Tensor] = None) -> Tensor:
    """Samples [n, C, H, W] for rows ``base_idx`` [n] (and per-sample hallucinators ``hall_idx`` [n] for HaBa)."""
    if is_haba(syn):
        if hall_idx is None:
            raise ValueError("a HaBa synthetic set needs hall_idx (one hallucinator per sample)")
        device = syn.bases.device
        return syn.generate(base_idx.to(device), hall_idx.to(device))
    return syn.images[base_idx.to(syn.images.device)]


def _family_key(params: Any) -> Tuple[str, ...]:
    if isinstance(params, (list, tuple)):
        return tuple(p.family for p in params)
    return (params.family,)


def _to(params: Any, device: torch.device) -> Any:
    if isinstance(params, (list, tuple)):
        return [_to(p, device) for p in params]
    return params.to(device) if hasattr(params, "to") else params


def _cat(params_list: Sequence[Any]) -> Any:
    from haba_fast.augment import AugParams

    first = params_list[0]
    if isinstance(first, (list, tuple)):  # "M" mode: one chain per step; concatenate position by position
        return [AugParams.cat([p[i] for p in params_list]) for i in range(len(first))]
    return AugParams.cat(list(params_list))


def augment_groups(x: Tensor, params_per_group: Sequence[Any], group_size: int) -> Tensor:
    """Augment consecutive groups of ``group_size`` rows of ``x``, each with its own parameters.

    In "S" mode each group (an unrolled step) has one family; groups with the same family chain are
    concatenated and augmented in one call (at most one call per family), then put back in order.

    Args:
        x: [G * group_size, C, H, W].
        params_per_group: G AugParams (or G lists of AugParams for "M" mode), each for group_size samples.
        group_size: rows per group.

    Returns:
        [G * group_size, C, H, W], differentiable in x.
    """
    from haba_fast import augment

    G = len(params_per_group)
    if x.shape[0] != G * group_size:
        raise ValueError(f"augment_groups: x has {x.shape[0]} rows, expected {G} groups × {group_size}")
    params_per_group = [_to(p, x.device) for p in params_per_group]
    keys = [_family_key(p) for p in params_per_group]
    order: Dict[Tuple[str, ...], List[int]] = {}
    for g, k in enumerate(keys):
        order.setdefault(k, []).append(g)
    if len(order) == 1:
        return augment.apply(x, _cat(params_per_group))
    xs = x.reshape(G, group_size, *x.shape[1:])
    pieces, placed = [], []
    for groups in order.values():
        idx = torch.tensor(groups, device=x.device)
        sub = xs.index_select(0, idx).reshape(len(groups) * group_size, *x.shape[1:])
        pieces.append(augment.apply(sub, _cat([params_per_group[g] for g in groups])))
        placed.extend(groups)
    out = torch.cat(pieces).reshape(G, group_size, *x.shape[1:])
    inverse = torch.empty(G, dtype=torch.long)
    inverse[torch.tensor(placed)] = torch.arange(G)
    return out.index_select(0, inverse.to(x.device)).reshape_as(x)


def build_inputs(syn: nn.Module, plan: StepPlan) -> Tuple[Tensor, Tensor]:
    """All N steps' synthetic inputs in one batched generate + augment.

    Args:
        syn: a ``HaBa`` or ``Pixels`` synthetic set.
        plan: the iteration's StepPlan (base_idx [N, B], hall_idx [N], per-step aug).

    Returns:
        X [N, B, C, H, W] (differentiable in syn's parameters) and Y [N, B] int64.
    """
    N, B = plan.base_idx.shape
    flat_idx = plan.base_idx.reshape(-1)
    hall = plan.hall_idx.repeat_interleave(B) if is_haba(syn) else None
    x = synthetic_samples(syn, flat_idx, hall)
    if plan.aug is not None:
        x = augment_groups(x, plan.aug, B)
    labels = synthetic_labels(syn)
    Y = labels[flat_idx.to(labels.device)].reshape(N, B).to(x.device)
    return x.reshape(N, B, *x.shape[1:]), Y


def trajectory_loss(
    engine: Engine, model: nn.Module, syn: nn.Module, plan: StepPlan, w_start: Tensor, w_target: Tensor, lr: Tensor
) -> Tensor:
    """The MTT loss of one iteration: ``||w_N - w*||^2 / ||w_start - w*||^2`` (0-dim).

    Differentiable in the synthetic set's parameters (bases/hallucinators or images) and in ``lr``.
    """
    X, Y = build_inputs(syn, plan)
    device = X.device
    return engine(model, X, Y, w_start.to(device), w_target.to(device), lr)
