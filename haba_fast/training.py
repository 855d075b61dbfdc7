"""The one SGD training loop, shared by expert training and evaluation.

Experts (``haba_fast.experts``) train on the real training set with the reference's expert settings;
evaluation (``haba_fast.evaluate``) trains fresh networks on a synthetic set. Both call
:func:`train_network`, so the two protocols differ only in their arguments:

* data: a fixed ``(images, labels)`` pair, or a callable ``epoch_data(epoch, generator) -> (x, y)``
  that materializes a fresh training set every epoch (HaBa: one random hallucinator per sample,
  generated in batches on the device);
* DSA augmentation of every training batch through ``haba_fast.augment.sample`` / ``apply`` with the
  caller's generator (never the global RNG);
* HaBa's "batch standardization": every batch, train and test, is standardized by its own scalar
  mean and std before augmentation (the HaBa reference's ``epoch`` does ``(img - img.mean()) / img.std()``).

The learning-rate schedule ``"half"`` is the reference's: its loops (``evaluate_synset`` and
``buffer.py``) multiply the lr by 0.1 *after* epoch ``E // 2 + 1`` (0-based) and build a new SGD there
(momentum buffer dropped), so the first epoch at the decayed lr is ``decay_epoch = E // 2 + 2``, with
``E`` the reference's nominal epoch count (``--train_epochs`` for experts; ``--epoch_eval_train`` for
evaluation, which trains ``E + 1`` epochs). ``train_network`` takes ``decay_epoch`` explicitly; its
default ``epochs // 2 + 2`` is the expert case (``epochs = E``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast._ext import BatchBuffers

DEFAULT_DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
LR_SCHEDULES = ("none", "half")

EpochData = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
TrainData = Union[Tensor, tuple[Tensor, Tensor], EpochData]


@dataclass
class EpochStats:
    """What one training epoch measured (accuracies are fractions in [0, 1])."""

    epoch: int
    loss: float
    accuracy: float
    lr: float
    test_loss: float | None = None
    test_accuracy: float | None = None


@dataclass
class TrainHistory:
    """Per-epoch statistics of one :func:`train_network` run."""

    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.epochs]

    @property
    def accuracies(self) -> list[float]:
        return [e.accuracy for e in self.epochs]

    @property
    def test_accuracies(self) -> list[float | None]:
        return [e.test_accuracy for e in self.epochs]

    @property
    def final_test_accuracy(self) -> float | None:
        """Test accuracy after the last epoch (None when no test data was given)."""
        return self.epochs[-1].test_accuracy if self.epochs else None


def standardize_batch(x: Tensor) -> Tensor:
    """HaBa's batch standardization: ``(x - x.mean()) / x.std()`` with one scalar mean/std per batch.

    Args:
        x: ``[B, C, H, W]`` float.
    Returns:
        ``[B, C, H, W]``; a constant batch (std 0) is only centred instead of producing NaN.
    """
    std = x.std() if x.numel() > 1 else x.new_ones(())
    return (x - x.mean()) / std.clamp_min(1e-12)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against class probabilities: ``mean_i( -sum_k targets[i, k] * log_softmax(logits)[i, k] )``.

    Args:
        logits: ``[B, K]`` float.
        targets: ``[B, K]`` float probabilities (rows summing to 1; soft labels), or ``[B]`` int64 classes (then
            this is plain cross-entropy).
    Returns:
        0-dim loss, differentiable in both arguments.
    """
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    if targets.shape != logits.shape:
        raise ValueError(
            f"soft targets must be [B, K] = {tuple(logits.shape)} like the logits, got {tuple(targets.shape)}"
        )
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _hard(labels: Tensor) -> Tensor:
    """Class indices ``[B]`` of hard labels ``[B]`` or soft targets ``[B, K]`` (their argmax)."""
    return labels if labels.dim() == 1 else labels.argmax(dim=1)


def dsa_enabled(dsa: bool, strategy: str | None) -> bool:
    """Whether DSA augments: ``dsa`` on and a strategy other than ``"none"``."""
    return bool(dsa) and bool(strategy) and strategy.lower() != "none"


def _augment(x: Tensor, strategy: str, generator: torch.Generator | None) -> Tensor:
    from haba_fast import augment

    params = augment.sample(strategy, x.shape[0], tuple(x.shape[-2:]), generator=generator, device=x.device)
    return augment.apply(x, params)


def _as_data(data: TrainData, labels: Tensor | None) -> EpochData | tuple[Tensor, Tensor]:
    if callable(data) and not isinstance(data, Tensor):
        if labels is not None:
            raise ValueError("train_network: labels must be None when data is an epoch_data(epoch, generator) callable")
        return data
    if isinstance(data, Tensor):
        if labels is None:
            raise ValueError("train_network: images given without labels; pass (images, labels) or labels=...")
        return _check_pair(data, labels, "training data", soft_ok=True)
    if isinstance(data, (tuple, list)) and len(data) == 2 and labels is None:
        return _check_pair(data[0], data[1], "training data", soft_ok=True)
    raise TypeError(
        "train_network: data must be an images tensor with labels, an (images, labels) pair, or a callable "
        f"epoch_data(epoch, generator) -> (images, labels); got {type(data).__name__}"
    )


def _check_pair(images, labels, what: str, soft_ok: bool = False) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"{what}: images and labels must be tensors, got {type(images).__name__}, {type(labels).__name__}"
        )
    if images.dim() != 4:
        raise ValueError(f"{what}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if soft_ok and labels.dim() == 2 and labels.is_floating_point():  # soft targets [N, K] (probabilities)
        if labels.shape[0] != images.shape[0] or images.shape[0] == 0:
            raise ValueError(
                f"{what}: soft targets must be [N, K] with N = {images.shape[0]}, got {tuple(labels.shape)}"
            )
        return images, labels
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{what}: labels must be [N] with N = {images.shape[0]} (the number of images), got {tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{what}: no images")
    if not images.is_floating_point():
        raise TypeError(f"{what}: images must be a float tensor, got {images.dtype}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what}: labels must be integer class indices, got {labels.dtype}")
    return images, labels.long()


def _resolve_device(net: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_loss_accuracy(
    net: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 256,
    batch_standardize: bool = False,
    device=None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` on a labelled set (no augmentation, eval mode).

    Args:
        images: ``[N, C, H, W]`` float (any device; moved batch by batch).
        labels: ``[N]`` int64.
        batch_standardize: standardize each test batch by its own mean/std (HaBa's protocol; results then
            depend on ``batch_size``: the reference tests in batches of 128).
    Returns:
        ``(loss, accuracy)`` with accuracy a fraction in [0, 1].
    """
    images, labels = _check_pair(images, labels, "test data")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _resolve_device(net, device)
    was_training = net.training
    net.eval()
    total_loss, correct = 0.0, 0
    buffers, full = BatchBuffers(), min(batch_size, images.shape[0])  # blocks reused across full batches
    try:
        for start in range(0, images.shape[0], batch_size):
            buffers.batch(min(batch_size, images.shape[0] - start), full)
            x = images[start : start + batch_size].to(device, torch.float32)
            y = labels[start : start + batch_size].to(device)
            if batch_standardize:
                x = standardize_batch(x)
            out = net(x)
            total_loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(dim=1) == y).sum().item()
    finally:
        buffers.close()
        net.train(was_training)
    n = images.shape[0]
    return total_loss / n, correct / n


def test_accuracy(
    net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256, batch_standardize: bool = False, device=None
) -> float:
    """Accuracy (fraction in [0, 1]) of ``net`` on ``images [N, C, H, W]`` / ``labels [N]``."""
    return evaluate_loss_accuracy(
        net, images, labels, batch_size=batch_size, batch_standardize=batch_standardize, device=device
    )[1]


# pytest would collect a module-level `test_*` function imported into a test file; tell it not to.
test_accuracy.__test__ = False


def train_network(
    net: nn.Module,
    data: TrainData,
    labels: Tensor | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dsa: bool = True,
    dsa_strategy: str = DEFAULT_DSA_STRATEGY,
    dc_aug: str | None = "none",
    lr_schedule: str | None = None,
    decay_epoch: int | None = None,
    batch_standardize: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    test_data: tuple[Tensor, Tensor] | None = None,
    test_every: int = 1,
    test_batch_size: int = 256,
    callback: Callable[[int, nn.Module, EpochStats], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> TrainHistory:
    """Train ``net`` in place with mini-batch SGD and cross-entropy.

    Args:
        net: the network (moved to ``device``; put in train mode).
        data: ``images [N, C, H, W]`` float with ``labels [N]`` int64 (or soft targets ``[N, K]`` float
            probabilities: the loss is then :func:`soft_cross_entropy`), an ``(images, labels)`` pair, or a
            callable ``epoch_data(epoch, generator) -> (images, labels)`` called once per epoch (the
            training set is re-materialized every epoch, e.g. HaBa's random hallucinator per sample).
        labels: the labels when ``data`` is an images tensor.
        epochs: number of passes over the data.
        lr: initial learning rate.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        momentum, weight_decay: SGD settings (experts: 0, 0; evaluation: 0.9, 5e-4).
        dsa: augment every training batch with DSA (``dsa_strategy``; "none" turns it off too).
        dc_aug: DC's evaluation augmentation of every training batch instead (``haba_fast.dc_augment``: a strategy
            such as ``"crop_scale_rotate"``; ``"none"`` or None: off); only with DSA off, as in DC's ``epoch()``.
        lr_schedule: None/"none" (constant) or "half" (×0.1 from epoch ``decay_epoch`` on, optimizer restarted).
        decay_epoch: first 0-based epoch trained at the decayed lr under ``"half"`` (default ``epochs // 2 + 2``,
            the reference ``buffer.py``'s; ``haba_fast.evaluate`` passes ``E // 2 + 2`` for ``E + 1`` epochs).
        batch_standardize: HaBa's per-batch standardization, applied to train and test batches.
        generator: CPU ``torch.Generator`` for shuffling, augmentation and ``epoch_data``; None: a fresh
            unseeded one (never the global RNG).
        device: where to train; default: where ``net``'s parameters are.
        test_data: optional ``(images, labels)``: evaluated every ``test_every`` epochs and after the last.
        test_every: test period in epochs (0: only after the last epoch).
        test_batch_size: test batch size.
        callback: ``callback(epoch, net, stats)`` after every epoch (snapshots, logging; may raise to stop).
        progress: show a tqdm bar with loss and test accuracy.
        desc: the bar's label.

    Returns:
        :class:`TrainHistory` with one :class:`EpochStats` per epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    schedule = (lr_schedule or "none").lower()
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES} or None, got {lr_schedule!r}")
    if test_every < 0:
        raise ValueError(f"test_every must be >= 0, got {test_every}")
    source = _as_data(data, labels)
    if test_data is not None:
        test_data = _check_pair(test_data[0], test_data[1], "test data")
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    device = _resolve_device(net, device)
    net.to(device)
    use_dsa = dsa_enabled(dsa, dsa_strategy)
    from haba_fast.dc_augment import check_dc_aug_strategy, dc_augment

    dc_aug = dc_aug or "none"
    use_dc_aug = bool(check_dc_aug_strategy(dc_aug))
    if use_dsa and use_dc_aug:
        raise ValueError(f"train_network: dc_aug={dc_aug!r} is DC's augmentation without DSA; DSA is on "
                         f"({dsa_strategy!r}): give dsa=False or dc_aug='none'")

    def make_optimizer(rate: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=rate, momentum=momentum, weight_decay=weight_decay)

    current_lr = float(lr)
    optimizer = make_optimizer(current_lr)
    if decay_epoch is not None and (isinstance(decay_epoch, bool) or int(decay_epoch) < 1):
        raise ValueError(f"decay_epoch must be an int >= 1, got {decay_epoch!r}")
    decay_at = (epochs // 2 + 2 if decay_epoch is None else int(decay_epoch)) if schedule == "half" else None
    history = TrainHistory()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, leave=False, dynamic_ncols=True)
    # The full batches' large CPU blocks come back from the buffer cache from one batch and epoch to the next
    # (BatchBuffers); handed back before a ragged batch under 1 / BatchBuffers.FIT of the full size, a test pass
    # and the callback.
    buffers = BatchBuffers()
    try:
        for ep in range(epochs):
            if decay_at is not None and ep == decay_at:
                current_lr *= 0.1
                optimizer = make_optimizer(current_lr)  # the reference builds a new SGD here (momentum reset)
            if callable(source):
                with torch.no_grad():
                    x_all, y_all = source(ep, generator)
                x_all, y_all = _check_pair(x_all.detach(), y_all, f"epoch_data(epoch={ep})", soft_ok=True)
            else:
                x_all, y_all = source
            net.train()
            n = x_all.shape[0]
            order = torch.randperm(n, generator=generator)
            # Sums stay on the device: one host sync per epoch, not per batch (matters on a GPU).
            total_loss = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            for start in range(0, n, batch_size):
                buffers.batch(min(batch_size, n - start), min(batch_size, n))
                idx = order[start : start + batch_size].to(x_all.device)
                x = x_all[idx].to(device, torch.float32)
                y = y_all[idx].to(device)
                if batch_standardize:
                    x = standardize_batch(x)
                if use_dsa:
                    x = _augment(x, dsa_strategy, generator)
                elif use_dc_aug:
                    x = dc_augment(x, dc_aug, generator)
                out = net(x)
                loss = soft_cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.detach() * y.shape[0]
                correct += (out.detach().argmax(dim=1) == _hard(y)).sum()
            stats = EpochStats(epoch=ep, loss=total_loss.item() / n, accuracy=correct.item() / n, lr=current_lr)
            last = ep == epochs - 1
            if test_data is not None and (last or (test_every and (ep + 1) % test_every == 0)):
                buffers.close()
                stats.test_loss, stats.test_accuracy = evaluate_loss_accuracy(
                    net,
                    test_data[0],
                    test_data[1],
                    batch_size=test_batch_size,
                    batch_standardize=batch_standardize,
                    device=device,
                )
            history.epochs.append(stats)
            if bar is not None:
                post = {"loss": f"{stats.loss:.4f}", "acc": f"{stats.accuracy:.3f}"}
                if stats.test_accuracy is not None:
                    post["test_acc"] = f"{stats.test_accuracy:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if callback is not None:
                buffers.close()  # the caller's code allocates what it likes
                callback(ep, net, stats)
    finally:
        buffers.close()
        if bar is not None:
            bar.close()
    return history
