"""The objective interface, its registry, and the pieces the objectives share.

An *objective* turns the synthetic set (any parameterization with the ``Pixels`` / ``HaBa`` interface) into a
scalar loss for one synthetic update. The distiller (``haba_fast.distill.Distiller``) owns the optimizers and the
update; per iteration it calls ``objective.loss(syn, lr)``, adds HaBa's adversarial club term on top whatever
the objective, back-propagates to every synthetic parameter (bases and hallucinators, or images; soft label
logits; the learned lr only when ``objective.learns_lr``), steps, then calls ``objective.after_update(syn)``
(gradient matching trains its network there).

Registered objectives (``OBJECTIVES``): ``mtt`` (trajectory matching, :mod:`.mtt`), ``dc`` and ``dsa``
(gradient matching without / with Siamese augmentation, :mod:`.gradient`), ``dm`` (distribution matching,
:mod:`.distribution`).

How a class's synthetic batch is formed (gradient and distribution matching): every stored row of the class
(Pixels: its images; HaBa: every basis of the class through EVERY hallucinator, ``bpc * Hn`` samples in
``all_pairs`` order). Evaluation trains on one random hallucinator per basis per epoch, whose distribution over
epochs is the all-pairs set; matching all pairs matches that distribution exactly (DM's class mean is its
expectation, DC's synthetic gradient the expected one) without sampling noise, and gives every hallucinator a
gradient at every step. The cost is ``Hn`` times the synthetic batch of a pixel set with ``bpc`` images.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveOutput",
    "ObjectiveSetup",
    "RealSampler",
    "get_objective",
    "objective_defaults",
    "register_objective",
    "siamese_augment",
    "synthetic_classes",
    "fresh_network",
]

_REGISTRY: Dict[str, Type["Objective"]] = {}


@dataclass
class ObjectiveSetup:
    """What an objective is built from.

    Attributes:
        cfg: the run's ``DistillConfig``.
        dataset: the real data (``haba_fast.data.Dataset``: ``train_images [N, C, H, W]``, ``train_labels [N]``).
        device: where the synthetic set lives and the networks run.
        generator: the run's CPU generator (every random choice).
        stream: the run's ``IndexStream`` over the synthetic rows (MTT's per-step batches; adversarial draws).
        strategy: the DSA strategy used while distilling, or None (no augmentation).
        buffer: the expert buffer (MTT only; None otherwise).
    """

    cfg: Any
    dataset: Any
    device: torch.device
    generator: torch.Generator
    stream: Any
    strategy: Optional[str]
    buffer: Any = None


@dataclass
class ObjectiveOutput:
    """One synthetic update's loss.

    Attributes:
        loss: 0-dim, differentiable in the synthetic parameters (and in the lr for MTT).
        metrics: plain floats for the history (e.g. ``start_epoch``, ``trajectory`` for MTT).
        club, adversary: the adversarial term's draws (``haba_fast.plan.PairPlan``) when the objective drew
            them as part of its own plan (MTT: in the step plan); None: the distiller draws them.
    """

    loss: Tensor
    metrics: Dict[str, float] = field(default_factory=dict)
    club: Any = None
    adversary: Any = None


class Objective(abc.ABC):
    """A dataset-distillation objective (see the module docstring).

    Class attributes:
        name: the registry name (``--objective``).
        needs_buffer: needs an expert buffer (MTT).
        learns_lr: the lr passed to ``loss`` is a learned parameter (MTT); the others evaluate with ``lr_net``.
        momentum: SGD momentum of the synthetic parameters (the public code's: MTT/HaBa 0.95, DC/DSA/DM 0.5).
        normalized_loss: the loss starts near 1 (MTT's normalized distance), so ``max_loss`` can flag an explosion;
            the others' scale grows with classes and layers, and only a non-finite loss stops them.
        defaults: ``DistillConfig`` values of the objective's public code (``haba_fast.distill.apply_objective``).
        reference_schedule: the public script's ``(--Iteration default, evaluation interval)``, counted in its own
            iterations (:meth:`updates_per_iteration` synthetic updates each); None: ``DistillConfig``'s (MTT's).
    """

    name: ClassVar[str] = ""
    needs_buffer: ClassVar[bool] = False
    learns_lr: ClassVar[bool] = False
    momentum: ClassVar[float] = 0.5

    @classmethod
    def momenta(cls, cfg) -> Tuple[float, float]:
        """SGD momentum of the synthetic parameters and of the learned lr, as the objective's public code sets them."""
        return cls.momentum, 0.9
    normalized_loss: ClassVar[bool] = False
    defaults: ClassVar[Dict[str, Any]] = {}
    reference_schedule: ClassVar[Optional[Tuple[int, int]]] = None

    @classmethod
    def updates_per_iteration(cls, cfg) -> int:
        """Synthetic updates in one iteration of the objective's public script (one; DC/DSA: the outer loop)."""
        return 1

    def __init__(self, setup: ObjectiveSetup):
        self.setup = setup
        self.cfg = setup.cfg
        self.device = setup.device
        self.generator = setup.generator

    @abc.abstractmethod
    def loss(self, syn: nn.Module, lr: Tensor) -> ObjectiveOutput:
        """The loss of the current synthetic set ``syn`` (``lr``: 0-dim; used by MTT only)."""

    def after_update(self, syn: nn.Module) -> None:  # noqa: B027 - optional hook, nothing by default
        """Called after the synthetic set was updated (gradient matching trains its network here)."""

    def state_dict(self) -> Dict[str, Any]:
        """What ``resume`` needs to continue exactly (CPU tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"objective {self.name!r} keeps no state, got {sorted(state)}")

    def describe(self) -> str:
        """One line for the run log."""
        return f"objective {self.name}"


def register_objective(cls: Type[Objective]) -> Type[Objective]:
    """Class decorator: make ``cls`` selectable as ``--objective cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    # Importing the modules registers their objectives (late: they import this module).
    from haba_fast.objectives import distribution, gradient, mtt  # noqa: F401


OBJECTIVES = ("mtt", "dc", "dsa", "dm")


def get_objective(name: str) -> Type[Objective]:
    """The objective class registered as ``name`` (ValueError naming the choices otherwise)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def objective_defaults(name: str) -> Dict[str, Any]:
    """``DistillConfig`` values of the objective's public code (lr_img, ...), to apply before explicit flags."""
    return dict(get_objective(name).defaults)


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces


def fresh_network(cfg, dataset, generator: torch.Generator, device, *, what: str) -> nn.Module:
    """A randomly initialized ``cfg.model`` for the data (drawn from ``generator``), in train mode.

    Raises:
        ValueError: the model has BatchNorm layers (the public DC code freezes their statistics on real batches
            first, DM's puts every class through one train-mode forward; not supported here: use an instancenorm
            model such as the default ConvNet).
    """
    from haba_fast.models import get_network

    net = get_network(
        cfg.model, dataset.channels, dataset.num_classes, tuple(dataset.im_size), generator=generator, device=device
    )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ValueError(
            f"objective {what}: --model {cfg.model} has BatchNorm layers, which gradient/distribution matching does "
            "not support here; use a model without BatchNorm (e.g. ConvNet, instancenorm)"
        )
    return net.train()


class RealSampler:
    """Random real batches per class: ``sample(n) -> [K, n, C, H, W]`` on the device.

    Every class gives the same number of images (vectorized matching needs equal batches): ``min(n, smallest
    class)``. Within a class the draw is a random permutation's first ``n`` (the public code's ``get_images``).
    """

    def __init__(self, dataset, device: torch.device):
        self.images = dataset.train_images
        labels = dataset.train_labels.detach().cpu()
        self.num_classes = int(dataset.num_classes)
        self.by_class: List[Tensor] = [(labels == c).nonzero(as_tuple=True)[0] for c in range(self.num_classes)]
        empty = [c for c, idx in enumerate(self.by_class) if idx.numel() == 0]
        if empty:
            raise ValueError(f"class {empty[0]} has no real training images; every class needs some to match")
        self.smallest = min(int(idx.numel()) for idx in self.by_class)
        self.device = device

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        if n < 1:
            raise ValueError(f"--batch_real must be >= 1, got {n}")
        n = min(int(n), self.smallest)
        picks = [idx[torch.randperm(idx.numel(), generator=generator)[:n]] for idx in self.by_class]
        sel = torch.stack(picks).reshape(-1).to(self.images.device)
        x = self.images.index_select(0, sel).to(self.device, torch.float32)
        return x.reshape(self.num_classes, n, *x.shape[1:])


def synthetic_classes(syn: nn.Module) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The synthetic set grouped by class (the batch formation of the module docstring).

    Returns:
        x: ``[K, S, C, H, W]``, differentiable in the synthetic parameters (S = ipc, or bpc * Hn for HaBa: every
            basis through every hallucinator, row ``j * Hn + h`` of a class is its basis j under hallucinator h);
        y: ``[K, S]`` int64 hard labels (``y[c] = c``);
        soft: ``[K, S, K]`` soft targets (softmax of the label logits, differentiable), or None.
    """
    from haba_fast.objectives.mtt import is_haba

    K = int(syn.num_classes)
    soft = syn.label_targets() if callable(getattr(syn, "label_targets", None)) else None
    if is_haba(syn):
        x, y = syn.all_pairs()
        if soft is not None:
            soft = soft.repeat_interleave(syn.n_hallucinators, dim=0)
    else:
        x, y = syn.images, syn.labels
    S = x.shape[0] // K
    x = x.reshape(K, S, *x.shape[1:])
    y = y.reshape(K, S).to(x.device)
    if soft is not None:
        soft = soft.reshape(K, S, K).to(x.device)
    return x, y, soft


def siamese_augment(
    real: Tensor, syn: Tensor, strategy: Optional[str], generator: torch.Generator
) -> Tuple[Tensor, Tensor, Any]:
    """DSA's Siamese augmentation per class: ONE draw per class, the same for its real and synthetic samples.

    As the public DC/DSA/DM code (``DiffAugment`` with a seed: one family per call, one parameter value shared
    by the whole batch), per class c one ``haba_fast.augment.sample(..., same_on_batch=True)`` is applied to
    ``real[c]`` and ``syn[c]`` alike. All classes go through one batched augment call per family.

    Args:
        real: ``[K, R, C, H, W]``; syn: ``[K, S, C, H, W]`` (differentiable).
        strategy: DSA strategy, or None / "none" (then the inputs come back unchanged).
        generator: the source of the draws.

    Returns:
        ``(real_aug [K, R, ...], syn_aug [K, S, ...], params)``; ``params`` is the list of K AugParams (each for
        ``R + S`` samples, real first), or None without augmentation.
    """
    if not strategy or strategy.lower() == "none":
        return real, syn, None
    from haba_fast import augment
    from haba_fast.objectives.mtt import augment_groups

    K, R, S = real.shape[0], real.shape[1], syn.shape[1]
    size = tuple(real.shape[-2:])
    params = [
        augment.sample(strategy, R + S, size, generator=generator, same_on_batch=True, device=real.device)
        for _ in range(K)
    ]
    x = torch.cat([real.to(syn.dtype), syn], dim=1).reshape(K * (R + S), *real.shape[2:])
    out = augment_groups(x, params, R + S).reshape(K, R + S, *real.shape[2:])
    return out[:, :R], out[:, R:], params
