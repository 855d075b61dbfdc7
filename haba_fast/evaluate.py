"""Evaluation of a synthetic set: train fresh networks on it, test them on the real test split.

The protocol is the reference's (MTT ``evaluate_synset``; HaBa's ``StyleTranslatorSharedDataset``):
a freshly initialized network per repeat, SGD with momentum 0.9 and weight decay 5e-4, the learned
learning rate (0.01 when none is known), DSA on every training batch, batch 256, ``Epoch`` = 1000
(``--epoch_eval_train``) as the reference counts it: ``Epoch + 1`` epochs trained, lr ×0.1 (new SGD)
from epoch ``Epoch // 2 + 2`` on (``evaluate_synset`` decays after epoch ``Epoch // 2 + 1``), test
accuracy after the last epoch; ``num_eval`` repeats per architecture,
reported as mean ± std (``np.std``, as the reference prints it). For ``HaBa`` every epoch trains on
a fresh materialization (every basis through one random hallucinator), generated in one batched call
on the training device. ``batch_standardize`` is HaBa's per-batch standardization (train and test).

Several processes (``torchrun``, :mod:`haba_fast.dist`): the runs (models × repeats) are spread over the ranks, run j
on rank j mod K, each with the seed one process would give it, and every rank returns all the results.

Evaluation pools: :func:`eval_pool` is the reference's ``get_eval_pool`` (``--eval_mode``).

Baselines: :func:`coreset` picks real images per class: at random, by herding, or by k-center.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from haba_fast import dist
from haba_fast.data import check_test_images
from haba_fast.training import DEFAULT_DSA_STRATEGY, dsa_enabled, train_network

COMMON_MODELS = ("ConvNet", "AlexNet", "VGG11", "ResNet18")  # the reference's cross-architecture pool ("M")
CORESET_METHODS = ("random", "herding", "kcenter")
DEFAULT_EVAL_LR = 0.01


# The reference's get_eval_pool (HaBa utils.py). "S" and "C" depend on the training model; any other value falls back
# to the training model there, which hides typos: here it is an error. MTT's utils.py differs in "M" only
# (MTT_POOL_M), the pool of pixel MTT runs (``eval_pool(.., reference="mtt")``). The DC/DSA/DM code
# (VICO-UoE/DatasetCondensation utils.py, as of its DM commit 306245d) differs in "M" (with MLP and LeNet) and "A"
# (with swish), adds "B" (BatchNorm networks, for DM) and "SS" (the training model, BN kept), and has no "C"
# (DC_POOLS): the pools of pixel DC, DSA and DM runs (``reference="dc"``).
EVAL_MODES: dict[str, tuple[str, ...]] = {
    "S": (),  # the training model itself (a "...BN" name is evaluated without its BN suffix)
    "M": COMMON_MODELS,  # architectures
    "W": ("ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"),  # widths
    "D": ("ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"),  # depths
    "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL"),  # activations: sigmoid, relu, leaky relu
    "P": ("ConvNetNP", "ConvNetMP", "ConvNetAP"),  # poolings: none, max, average
    "N": ("ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"),  # norms: none/batch/layer/instance/group
    "C": (),  # the training model and ConvNet
}
MTT_POOL_M: tuple[str, ...] = ("ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18")
# The DC/DSA/DM code's modes that differ from EVAL_MODES (None: the training model itself, BN kept); "C" is not one.
DC_POOLS: dict[str, tuple[str, ...] | None] = {
    "M": ("MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"),
    "A": ("ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetASwish"),
    "B": ("ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"),
    "SS": None,
}
POOL_REFERENCES = ("haba", "mtt", "dc")


def pool_reference(parameterization: str, objective: str) -> str:
    """Whose ``--eval_mode`` pools a set takes: the code that distills it in the references. HaBa sets (any
    objective): HaBa's utils.py; pixel MTT: MTT's; pixel DC, DSA and DM: VICO-UoE/DatasetCondensation's."""
    if parameterization == "haba":
        return "haba"
    return "mtt" if objective == "mtt" else "dc"


def eval_modes(reference: str = "haba") -> tuple[str, ...]:
    """The ``--eval_mode`` values of a reference's code (:data:`EVAL_MODES`; the DC/DSA/DM code: no C, + B, SS)."""
    if reference == "dc":
        return tuple(m for m in EVAL_MODES if m != "C") + ("B", "SS")
    return tuple(EVAL_MODES)


def eval_pool(eval_mode: str, model: str = "ConvNet", reference: str = "haba") -> tuple[str, ...]:
    """The evaluation architectures of ``--eval_mode`` for a set distilled with ``model`` (the reference's pool).

    Args:
        eval_mode: one of :func:`eval_modes` (``S`` itself, ``M`` architectures, ``W`` widths, ``D`` depths,
            ``A`` activations, ``P`` poolings, ``N`` norms, ``C`` itself and ConvNet; DC/DSA/DM: no ``C``, ``B``
            BatchNorm networks, ``SS`` itself with BN).
        model: the training (distillation) model, a ``haba_fast.models.get_network`` name.
        reference: ``haba`` (HaBa's utils.py), ``mtt`` (MTT's, for pixel MTT: ``M`` adds ``ResNet18_AP``) or
            ``dc`` (VICO-UoE/DatasetCondensation's, for pixel DC/DSA/DM: :data:`DC_POOLS`);
            :func:`pool_reference` picks it.

    Returns:
        The ``get_network`` names to evaluate, in the reference's order.

    Raises:
        ValueError: an unknown mode (the reference would silently evaluate ``model``), or a pool naming a network
            haba_fast lacks (the message names it).
    """
    from haba_fast.models import NETWORK_NAMES

    if reference not in POOL_REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(POOL_REFERENCES)}, got {reference!r}")
    mode = str(eval_mode)
    if mode not in eval_modes(reference):
        code = "the DC/DSA/DM code's (pixel DC, DSA and DM sets)" if reference == "dc" else "the reference's"
        raise ValueError(
            f"unknown --eval_mode {eval_mode!r}: choose one of {code} {', '.join(eval_modes(reference))} (S: the "
            "training model, M: ConvNet/AlexNet/VGG11/ResNet18 (pixel MTT: + ResNet18_AP; pixel DC/DSA/DM: + MLP, "
            "LeNet), W: widths, D: depths, A: activations, P: poolings, N: norms, C: the training model and "
            "ConvNet; DC/DSA/DM: B: BatchNorm networks, SS: the training model with its BN)"
        )
    if mode == "S":
        pool: tuple[str, ...] = (model[: model.index("BN")] if "BN" in model else model,)
    elif mode == "C":
        pool = (model, "ConvNet")
    elif mode == "M" and reference == "mtt":
        pool = MTT_POOL_M
    elif reference == "dc" and mode in DC_POOLS:
        pool = DC_POOLS[mode] or (model,)
    else:
        pool = EVAL_MODES[mode]
    missing = [m for m in pool if m not in NETWORK_NAMES]
    if missing:
        raise ValueError(f"--eval_mode {mode} evaluates {', '.join(missing)}, which haba_fast does not build")
    return pool


def split_models(names: str) -> Tuple[str, ...]:
    """``--models`` / ``--eval-models`` given as one string: the names between commas, blanks dropped."""
    return tuple(m.strip() for m in names.split(",") if m.strip())


@dataclass
class EvalConfig:
    """The evaluation protocol (defaults: the reference's).

    Attributes:
        models: architectures to evaluate (``haba_fast.models.get_network`` names).
        num_eval: repeats (fresh networks) per architecture.
        epochs: the reference's ``Epoch`` (``--epoch_eval_train``): every network trains ``epochs + 1`` epochs,
            as ``evaluate_synset`` does, at ``lr`` then at ``lr × 0.1`` from epoch ``epochs // 2 + 2`` on.
        lr: training lr; None: the synthetic set's learned lr (``syn.meta["lr"]``) if recorded, else 0.01.
        momentum, weight_decay: SGD settings.
        batch_size: training batch.
        test_batch_size: test batch (128 as the reference's test loader; matters with ``batch_standardize``).
        dsa, dsa_strategy: DSA augmentation of training batches.
        dc_aug_dataset: with DSA off, DC's evaluation augmentation (``haba_fast.dc_augment``) of the dataset so
            named, per evaluated model as DC's ``get_daparam`` chooses it (MNIST: crop/scale/rotate; ConvNetBN:
            crop/noise). None: off (DSA's, MTT's and HaBa's evaluations).
        dc_aug_epochs: the ``Epoch`` of a model that DC's augmentation augments (DC's ``main.py``: 1000, whatever
            ``--epoch_eval_train`` says); None: ``epochs``.
        lr_schedule: ``"half"`` (the reference's decay, above) or ``"none"``.
        batch_standardize: HaBa's per-batch standardization, train and test.
        device: training device (None: CUDA when available, else CPU).
    """

    models: tuple[str, ...] = ("ConvNet",)
    num_eval: int = 5
    epochs: int = 1000
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    test_batch_size: int = 128
    dsa: bool = True
    dsa_strategy: str = DEFAULT_DSA_STRATEGY
    dc_aug_dataset: str | None = None
    dc_aug_epochs: int | None = None
    lr_schedule: str = "half"
    batch_standardize: bool = False
    device: str | None = None

    def dc_aug_for(self, model: str) -> str:
        """The DC evaluation augmentation strategy of ``model`` (``"none"`` unless ``dc_aug_dataset`` is set)."""
        from haba_fast.dc_augment import dc_aug_strategy

        return "none" if self.dc_aug_dataset is None else dc_aug_strategy(self.dc_aug_dataset, model)

    def epochs_for(self, model: str) -> int:
        """The ``Epoch`` of ``model``: ``dc_aug_epochs`` (when set) where DC's evaluation augments it, else
        ``epochs``."""
        if self.dc_aug_epochs is not None and self.dc_aug_for(model) != "none":
            return int(self.dc_aug_epochs)
        return self.epochs

    def validate(self) -> None:
        if isinstance(self.models, str):
            self.models = split_models(self.models)
        if not self.models:
            raise ValueError("EvalConfig.models is empty; give at least one architecture (e.g. ConvNet)")
        if self.num_eval < 1:
            raise ValueError(f"num_eval must be >= 1, got {self.num_eval}")
        if self.epochs < 0:  # 0 trains one epoch, as the reference's range(Epoch + 1)
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.dc_aug_epochs is not None and self.dc_aug_epochs < 0:
            raise ValueError(f"dc_aug_epochs must be >= 0 or None, got {self.dc_aug_epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr (--lr) must be a positive number, got {self.lr}")
        # SGD's own check names no flag and lets NaN through (NaN networks, chance accuracy).
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum (--momentum) must be a number in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay (--weight-decay) must be a number >= 0, got {self.weight_decay}")
        if self.batch_size < 1 or self.test_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size}, {self.test_batch_size}")
        if self.dc_aug_dataset is not None:
            from haba_fast.data import canonical_name

            canonical_name(self.dc_aug_dataset)  # a clear error for an unknown name
            if dsa_enabled(self.dsa, self.dsa_strategy):
                raise ValueError("dc_aug_dataset is DC's evaluation augmentation, which runs without DSA: give "
                                 "dsa=False (--no-dsa) with it")


@dataclass
class EvalResult:
    """Accuracies (fractions in [0, 1]) of every evaluated network, per architecture."""

    accuracies: dict[str, list[float]]
    lr: float
    num_samples: int
    epochs: int
    config: dict[str, Any] = field(default_factory=dict)
    label: str = "synthetic"

    def mean(self, model: str | None = None) -> float:
        """Mean accuracy of one architecture (default: the first one evaluated)."""
        return float(np.mean(self.accuracies[model or next(iter(self.accuracies))]))

    def std(self, model: str | None = None) -> float:
        """Standard deviation (``np.std``, ddof 0, as the reference reports)."""
        return float(np.std(self.accuracies[model or next(iter(self.accuracies))]))

    @property
    def summary(self) -> dict[str, dict[str, float]]:
        return {m: {"mean": self.mean(m), "std": self.std(m), "n": len(a)} for m, a in self.accuracies.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "lr": self.lr,
            "num_samples": self.num_samples,
            "epochs": self.epochs,
            "summary": self.summary,
            "accuracies": self.accuracies,
            "config": self.config,
        }

    def table(self) -> str:
        """A plain-text table: one row per architecture, accuracy in %."""
        return format_table([self])


def format_table(results: Sequence[EvalResult]) -> str:
    """Rows ``label | model | mean ± std (%) | n`` for several results (e.g. HaBa vs baselines)."""
    rows = [("set", "model", "accuracy (%)", "runs", "samples")]
    for r in results:
        for m, s in r.summary.items():
            rows.append((r.label, m, f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}", str(s["n"]), str(r.num_samples)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _device(cfg_device) -> torch.device:
    from haba_fast.devices import resolve_device

    return resolve_device(cfg_device or None)


def _training_source(syn, device: torch.device) -> tuple[tuple[Tensor, Tensor] | Callable, int, tuple[int, ...]]:
    """(data for train_network, samples per epoch, sample shape [C, H, W])."""
    if isinstance(syn, (tuple, list)):
        if len(syn) != 2:
            raise ValueError(f"a raw synthetic set must be an (images, labels) pair, got {len(syn)} items")
        images, labels = syn
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise TypeError("a raw synthetic set must be an (images [N, C, H, W], labels [N]) pair of tensors")
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                "synthetic images must be [N, C, H, W] with labels [N]; "
                f"got {tuple(images.shape)}, {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"synthetic labels must be integer class indices, got {labels.dtype}")
        if not images.is_floating_point():
            raise TypeError(f"synthetic images must be a float tensor, got {images.dtype}")
        images = images.detach().to(device, torch.float32)
        return (images, labels.detach().to(device).long()), images.shape[0], tuple(images.shape[1:])
    materialize = getattr(syn, "materialize", None)
    if not callable(materialize):
        raise TypeError(
            f"evaluate_synthetic: syn must be a Pixels/HaBa synthetic set or an (images, labels) pair, "
            f"got {type(syn).__name__}"
        )
    if isinstance(syn, nn.Module):
        params = list(syn.parameters())
        if params and params[0].device != device:
            syn = copy.deepcopy(syn).to(device)  # generate on the training device; the caller's module stays put
    with torch.no_grad():
        x0, _ = syn.materialize(torch.Generator().manual_seed(0))
    _check_finite(x0)
    shape = tuple(x0.shape[1:])
    n = x0.shape[0]
    # Soft labels: train on the learned class probabilities [N, K] (one row per image / basis) with a soft CE.
    soft = syn.label_targets() if callable(getattr(syn, "label_targets", None)) else None
    soft = None if soft is None else soft.detach().to(device, torch.float32)
    if type(syn).__name__ == "Pixels" or not getattr(syn, "n_hallucinators", 0):
        x, y = syn.materialize(None)
        return (x.detach().to(device, torch.float32), y.to(device).long() if soft is None else soft), n, shape

    def epoch_data(epoch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        # One random hallucinator per basis, generated in one batched call on the device.
        x, y = syn.materialize(generator)
        return x.detach().float(), y if soft is None else soft

    return epoch_data, n, shape


def _check_against(syn, source, dataset) -> None:
    """The set's classes within the dataset's, and fixed samples (a pair, a pixel set) finite; a HaBa set's draws
    are checked by ``_training_source``."""
    K, name = int(dataset.num_classes), getattr(dataset, "name", "?")
    classes = getattr(syn, "num_classes", None)
    if classes is not None and int(classes) > K:
        raise ValueError(
            f"the synthetic set has {int(classes)} classes but dataset {name} has {K}: evaluate on the dataset it "
            "was distilled from"
        )
    if isinstance(source, tuple):
        images, labels = source
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise ValueError(
                f"synthetic labels must lie in [0, {K}) (dataset {name} has {K} classes), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        _check_finite(images)


def _check_finite(images: Tensor) -> None:
    if not torch.isfinite(images).all():
        raise ValueError("the synthetic images contain NaN or Inf: the set is corrupt (or diverged while distilling)")


def resolve_lr(syn, cfg_lr: float | None, lr: float | None) -> float:
    """The evaluation lr: explicit ``lr`` > ``cfg_lr`` > the set's learned ``meta["lr"]`` > 0.01.

    Raises:
        ValueError: the lr it would use is not a finite number > 0 (a learned lr too: not silently replaced).
    """
    meta = getattr(syn, "meta", None) or {}
    learned = meta.get("lr") if isinstance(meta, dict) else None
    for value, what in ((lr, "lr"), (cfg_lr, "the evaluation config's lr"), (learned, "the set's learned lr")):
        if value is None:
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
        return float(value)
    return DEFAULT_EVAL_LR


def evaluate_synthetic(
    syn,
    dataset,
    cfg: EvalConfig | None = None,
    *,
    lr: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    label: str = "synthetic",
    callback: Callable[[str, int, float], None] | None = None,
) -> EvalResult:
    """Train ``cfg.num_eval`` fresh networks per architecture on ``syn`` and test them on ``dataset``.

    Args:
        syn: a ``Pixels`` / ``HaBa`` (``haba_fast.factorization``) or an ``(images [N, C, H, W], labels [N])``
            pair. Samples must have the dataset's ``[C, H, W]``.
        dataset: a ``haba_fast.data.Dataset`` (its test split is the test set).
        cfg: :class:`EvalConfig` (default: the reference protocol).
        lr: training lr overriding ``cfg.lr`` and the set's learned lr.
        generator: CPU generator for network init, shuffling, augmentation and hallucinator draws
            (None: seeded from OS entropy).
        progress: tqdm bars.
        label: the name of this set in tables.
        callback: ``callback(model, repeat, accuracy)`` after every network.

    Returns:
        :class:`EvalResult`.
    """
    from haba_fast.models import get_network

    cfg = copy.deepcopy(cfg) if cfg is not None else EvalConfig()
    cfg.validate()
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    device = _device(cfg.device)
    rate = resolve_lr(syn, cfg.lr, lr)
    source, n, shape = _training_source(syn, device)
    _check_against(syn, source, dataset)
    expected = (dataset.channels, *dataset.im_size)
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"synthetic samples are {list(shape)} but dataset {getattr(dataset, 'name', '?')} images are "
            f"{list(expected)}: evaluate on the dataset the set was distilled from (--dataset, --zca)"
        )
    check_test_images(dataset)
    test = (dataset.test_images, dataset.test_labels)
    # Every run's seed is drawn up front, in the order one process uses them, so the runs are independent and can
    # be spread over ranks (run j on rank j mod K; haba_fast.dist: one process runs them all).
    runs = [
        (model, rep, int(torch.randint(2**62, (1,), generator=generator).item()))
        for model in cfg.models
        for rep in range(cfg.num_eval)
    ]
    mine = []
    for j, (model, rep, seed) in enumerate(runs):
        if j % dist.world_size() != dist.rank():
            continue
        g = torch.Generator().manual_seed(seed)
        net = get_network(model, dataset.channels, dataset.num_classes, dataset.im_size, generator=g, device=device)
        epochs = cfg.epochs_for(model)
        history = train_network(
            net,
            source,
            epochs=epochs + 1,  # the reference's range(Epoch + 1)
            decay_epoch=epochs // 2 + 2,  # it decays after epoch Epoch // 2 + 1
            lr=rate,
            batch_size=cfg.batch_size,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            dsa=cfg.dsa,
            dsa_strategy=cfg.dsa_strategy,
            dc_aug=cfg.dc_aug_for(model),
            lr_schedule=cfg.lr_schedule,
            batch_standardize=cfg.batch_standardize,
            generator=g,
            device=device,
            test_data=test,
            test_every=0,
            test_batch_size=cfg.test_batch_size,
            progress=progress,
            desc=f"eval {model} {rep + 1}/{cfg.num_eval}",
        )
        acc = float(history.final_test_accuracy)
        mine.append((j, acc))
        if callback is not None:
            callback(model, rep, acc)
        del net
    # Every rank gets every result (the same EvalResult everywhere), in run order.
    done = dict(item for part in dist.all_gather_objects(mine) for item in part)
    accuracies: dict[str, list[float]] = {model: [] for model in cfg.models}
    for j, (model, _rep, _seed) in enumerate(runs):
        accuracies[model].append(done[j])
    return EvalResult(accuracies=accuracies, lr=rate, num_samples=n, epochs=cfg.epochs, config=asdict(cfg), label=label)


# ----------------------------------------------------------------------------------------------------------------
# Coreset baselines


@torch.no_grad()
def _embed(images: Tensor, features: str, dataset, generator: torch.Generator, device, batch: int = 512) -> Tensor:
    if features == "pixels":
        return images.reshape(images.shape[0], -1).double()
    from haba_fast.models import get_network

    net = get_network(
        "ConvNet", dataset.channels, dataset.num_classes, dataset.im_size, generator=generator, device=device
    )
    net.eval()
    embed = getattr(net, "embed", None)
    if embed is None:  # pragma: no cover - ConvNet always has embed
        raise ValueError("herding needs a network with an embed() method (ConvNet)")
    out = [embed(images[i : i + batch].to(device)).double().cpu() for i in range(0, images.shape[0], batch)]
    return torch.cat(out)


def _herding(feats: Tensor, k: int) -> list[int]:
    """Greedy mean matching (Welling 2009): pick ``k`` rows whose running mean stays closest to the mean of all."""
    mu = feats.mean(dim=0)
    total = torch.zeros_like(mu)
    chosen: list[int] = []
    taken = torch.zeros(feats.shape[0], dtype=torch.bool)
    for step in range(1, k + 1):
        dist = ((total.unsqueeze(0) + feats) / step - mu).norm(dim=1)
        dist[taken] = math.inf
        i = int(torch.argmin(dist).item())
        chosen.append(i)
        taken[i] = True
        total += feats[i]
    return chosen


def _kcenter(feats: Tensor, k: int) -> list[int]:
    """Greedy k-center (farthest-point; Sener & Savarese 2018): ``feats`` ``[n, d]`` -> ``k`` distinct row indices.

    The first center is the row nearest the mean of all rows; each next one is the row farthest (Euclidean) from
    its nearest chosen center. Ties go to the lowest index.
    """
    first = int(torch.argmin((feats - feats.mean(dim=0)).norm(dim=1)).item())
    chosen = [first]
    nearest = (feats - feats[first]).norm(dim=1)  # distance of every row to its nearest chosen center
    for _ in range(1, k):
        i = int(torch.argmax(nearest).item())
        chosen.append(i)
        nearest = torch.minimum(nearest, (feats - feats[i]).norm(dim=1))
    return chosen


def coreset(
    dataset,
    ipc: int,
    method: str = "random",
    generator: torch.Generator | None = None,
    *,
    features: str = "embedding",
    device=None,
) -> tuple[Tensor, Tensor]:
    """Pick ``ipc`` real training images per class: the random / herding / k-center coreset baselines.

    ``random``: a uniform draw without replacement per class. ``herding``: greedy mean matching per class in a
    feature space. ``kcenter``: greedy farthest-point selection per class in the same feature space.
    ``features="embedding"`` (default) uses the embedding (the classifier's input) of a *randomly
    initialized* ConvNet drawn from ``generator``; ``features="pixels"`` uses the raw (normalized) pixels. The
    DC/DSA papers herd in the embedding of a network; a random ConvNet needs no training and its features still
    cluster images far better than pixels.

    Args:
        dataset: a ``haba_fast.data.Dataset``.
        ipc: images per class (>= 1; every class needs at least that many).
        method: ``"random"``, ``"herding"`` or ``"kcenter"``.
        generator: CPU generator (random choice / the embedding network); None: OS entropy.
        features: ``"embedding"`` or ``"pixels"`` (herding and k-center).
        device: where the embedding network runs (default CPU).

    Returns:
        ``(images [K*ipc, C, H, W] float32, labels [K*ipc] int64)``, class-major (class c owns rows c*ipc ...).
    """
    if method not in CORESET_METHODS:
        raise ValueError(f"coreset method must be one of {CORESET_METHODS}, got {method!r}")
    if features not in ("embedding", "pixels"):
        raise ValueError(f"herding/k-center features must be 'embedding' or 'pixels', got {features!r}")
    if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    images, labels = dataset.train_images, dataset.train_labels
    per_class = [torch.nonzero(labels == c).flatten() for c in range(dataset.num_classes)]
    short = [(c, len(idx)) for c, idx in enumerate(per_class) if len(idx) < ipc]
    if short:
        c, n = short[0]
        raise ValueError(f"coreset ipc={ipc}, but class {c} has only {n} training images")
    feats = None
    if method != "random":
        feats = _embed(images, features, dataset, generator, torch.device(device) if device else torch.device("cpu"))
    picked = []
    for idx in per_class:
        if method == "random":
            picked.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
        else:
            select = _herding if method == "herding" else _kcenter
            picked.append(idx[torch.tensor(select(feats[idx], ipc), dtype=torch.long)])
    keep = torch.cat(picked)
    out_labels = torch.arange(dataset.num_classes).repeat_interleave(ipc)
    return images[keep].clone().float(), out_labels


__all__ = [
    "COMMON_MODELS",
    "CORESET_METHODS",
    "EVAL_MODES",
    "EvalConfig",
    "EvalResult",
    "coreset",
    "eval_pool",
    "evaluate_synthetic",
    "format_table",
    "resolve_lr",
]
