"""The engine contract: the ``Engine`` protocol, the normalizing distance, and the shared input checks.

An *engine* runs N plain SGD steps of a student network on synthetic batches, starting at an expert
snapshot, and returns how far the student lands from a later expert snapshot::

    w_0 = w_start;  w_{t+1} = w_t - lr * grad_w CE(model_w(X_t), Y_t)      (mean CE over the batch)
    loss = ||w_N - w*||^2 / ||w_start - w*||^2

differentiable in ``X`` (so gradients reach the bases/hallucinators through generate ∘ augment)
and in ``lr`` (the learned learning rate). ``w_start`` and ``w_target`` are constants of the objective.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "Engine",
    "as_lr_tensor",
    "check_engine_batch",
    "check_engine_inputs",
    "check_engine_values",
    "model_num_classes",
    "normalized_distance",
]


class Engine(Protocol):
    """An unrolled trajectory-matching engine (see the module docstring)."""

    name: str
    approximate: bool

    def __call__(
        self, model: nn.Module, X: Tensor, Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor, *, reducer=None
    ) -> Tensor:
        """Matching loss after N SGD steps.

        Args:
            model: the student architecture; only its structure is used (its own weights are ignored).
            X: [N, B, C, H, W] synthetic inputs, one batch per step (float).
            Y: [N, B] int64 labels.
            w_start: [P] flat expert snapshot at the start epoch.
            w_target: [P] flat expert snapshot ``expert_epochs`` later.
            lr: 0-dim learned learning rate.
            reducer: ``haba_fast.dist.BatchReducer`` or None (one process). When active, X and Y are this rank's
                shard of every step's batch; the engine weights its shard's mean CE by ``reducer.weight`` and sums
                every per-step gradient and Hessian-vector product over ranks, so each rank steps the same w_t and
                returns the same loss; the gradients of X and lr it returns are this rank's share.

        Returns:
            0-dim loss ``||w_N - w*||^2 / ||w_start - w*||^2``, differentiable in X and lr.
        """
        ...


def model_num_classes(model: nn.Module) -> int | None:
    """The student's class count when it states one as an int ``num_classes`` (the ConvNet family does), else None:
    the range its labels must lie in."""
    k = getattr(model, "num_classes", None)
    return int(k) if isinstance(k, int) else None


def normalized_distance(w_start: Tensor, w_target: Tensor) -> Tensor:
    """``||w_start - w*||^2`` as a 0-dim tensor; raises ValueError when it is 0 or not finite.

    A zero distance means the two expert snapshots are identical. That is what expert buffers
    trained on a CPU with the reference code contain: it snapshots with ``p.detach().cpu()``, which
    on a CPU aliases the live parameter, so every snapshot equals the final weights.
    """
    denom = (w_start.detach() - w_target.detach()).pow(2).sum()
    value = float(denom)
    if value == 0.0:
        raise ValueError(
            "the expert snapshots at the start and target epochs are identical (distance 0), so trajectory "
            "matching would divide by zero. The expert buffer is broken: buffers trained on a CPU with the "
            "reference code alias every snapshot to the final weights (p.detach().cpu() does not copy on a "
            "CPU). Re-train the experts with `haba-fast buffer`, which stores copies."
        )
    if not math.isfinite(value):  # also where a snapshot holds NaN or Inf: they reach the distance
        raise ValueError(f"the distance between the expert snapshots is not finite ({value}); the buffer is corrupt")
    return denom


def as_lr_tensor(lr, X: Tensor) -> Tensor:
    """The learned lr as a tensor: a Python number becomes a 0-dim tensor of X's dtype and device."""
    if isinstance(lr, Tensor):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a 0-dim tensor or a number, got {type(lr).__name__}")
    return torch.tensor(float(lr), dtype=X.dtype, device=X.device)


def check_engine_inputs(model: nn.Module, X: Tensor, Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor) -> None:
    """Validate the engine arguments' types, shapes and dtypes (clear ValueError/TypeError)."""
    for name, t in (("X", X), ("Y", Y), ("w_start", w_start), ("w_target", w_target), ("lr", lr)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if X.dim() != 5:
        raise ValueError(f"X must be [N, B, C, H, W] (one batch per unrolled step), got shape {tuple(X.shape)}")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must hold at least one step of at least one sample, got shape {tuple(X.shape)}")
    if Y.dim() != 2 or tuple(Y.shape) != tuple(X.shape[:2]):
        raise ValueError(f"Y must be [N, B] = {tuple(X.shape[:2])} to match X, got shape {tuple(Y.shape)}")
    if Y.dtype != torch.long:
        raise TypeError(f"Y must be int64 class labels, got {Y.dtype}")
    if not X.is_floating_point():
        raise TypeError(f"X must be a floating-point tensor, got {X.dtype}")
    n_params = sum(p.numel() for p in model.parameters())
    for name, w in (("w_start", w_start), ("w_target", w_target)):
        if w.dim() != 1 or w.numel() != n_params:
            raise ValueError(
                f"{name} must be a flat parameter vector [P] with P = {n_params} (the model's parameter count), "
                f"got shape {tuple(w.shape)}; is the expert buffer for a different model or dataset?"
            )
    if lr.dim() != 0:
        raise ValueError(f"lr must be a 0-dim tensor, got shape {tuple(lr.shape)}")


def check_engine_values(Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor, device: torch.device) -> Tensor:
    """Every input on X's ``device``, the expert snapshots finite and apart, lr finite (clear ValueError).

    Returns:
        ``normalized_distance(w_start, w_target)``, the loss's denominator (computed once here).
    """
    for name, t in (("Y", Y), ("w_start", w_start), ("w_target", w_target), ("lr", lr)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but X is on {device}: put all engine inputs on one device")
    denom = normalized_distance(w_start, w_target)  # also refuses NaN or Inf in either snapshot
    if not torch.isfinite(lr.detach()):
        raise ValueError(f"lr is not finite ({float(lr)}); lower --lr_lr")
    return denom


def check_engine_batch(model: nn.Module, X: Tensor, Y: Tensor) -> None:
    """X finite and of the model's image size, Y within the model's classes (clear ValueError)."""
    if not torch.isfinite(X.detach()).all():
        raise ValueError("X (the synthetic batches) contains NaN or Inf; lower the learning rates")
    im_size = getattr(model, "im_size", None)
    if im_size is not None and tuple(X.shape[-2:]) != tuple(im_size):
        raise ValueError(
            f"X holds {X.shape[-2]}x{X.shape[-1]} images but the model was built for im_size {tuple(im_size)}; "
            "build the student with the synthetic images' size"
        )
    classes = model_num_classes(model)
    if classes is not None and Y.numel() and (int(Y.min()) < 0 or int(Y.max()) >= classes):
        raise ValueError(f"labels Y must be in [0, {classes}) for this model, got [{int(Y.min())}, {int(Y.max())}]")
