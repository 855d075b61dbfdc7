"""Trajectory matching: the engine interface, the naive engine, and the per-iteration step plan.

An *engine* runs N plain SGD steps of a student network on synthetic batches, starting at an expert
snapshot, and returns how far the student lands from a later expert snapshot::

    w_0 = w_start;  w_{t+1} = w_t - lr * grad_w CE(model_w(X_t), Y_t)      (mean CE over the batch)
    loss = ||w_N - w*||^2 / ||w_start - w*||^2

differentiable in ``X`` (so gradients reach the bases/hallucinators through generate ∘ augment)
and in ``lr`` (the learned learning rate). Engines:

* ``naive``: unrolls with ``create_graph=True`` and lets autograd differentiate the whole graph;
  memory grows linearly with N. Simple, the oracle for the others.
* ``exact``: the constant-memory adjoint (``haba_fast.adjoint``): stores only w_t, recomputes each
  step's graph in the backward pass; same gradient as ``naive`` up to float rounding.
* ``first-order``: the adjoint without the Hessian term (TESLA-style); an approximation.

The random choices of an iteration (which bases, which hallucinator, which augmentation) are drawn
once into a :class:`StepPlan` from a ``torch.Generator``, so a plan can be replayed exactly (the
exact engine's backward pass recomputes the inputs it saw in the forward pass).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # Python >= 3.8
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object  # type: ignore[assignment,misc]

ENGINES = ("exact", "naive", "first-order")

__all__ = [
    "ENGINES",
    "Engine",
    "NaiveEngine",
    "get_engine",
    "default_engine_name",
    "normalized_distance",
    "check_engine_inputs",
    "IndexStream",
    "PairPlan",
    "StepPlan",
    "sample_plan",
]


class Engine(Protocol):
    """An unrolled trajectory-matching engine (see the module docstring)."""

    name: str
    approximate: bool

    def __call__(self, model: nn.Module, X: Tensor, Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor) -> Tensor:
        """Matching loss after N SGD steps.

        Args:
            model: the student architecture; only its structure is used (its own weights are ignored).
            X: [N, B, C, H, W] synthetic inputs, one batch per step (float).
            Y: [N, B] int64 labels.
            w_start: [P] flat expert snapshot at the start epoch.
            w_target: [P] flat expert snapshot ``expert_epochs`` later.
            lr: 0-dim learned learning rate.

        Returns:
            0-dim loss ``||w_N - w*||^2 / ||w_start - w*||^2``, differentiable in X and lr.
        """
        ...


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
    if not torch.isfinite(denom):
        raise ValueError(f"the distance between the expert snapshots is not finite ({value}); the buffer is corrupt")
    return denom


def check_engine_inputs(model: nn.Module, X: Tensor, Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor) -> None:
    """Validate the engine arguments' shapes and dtypes (clear ValueError/TypeError)."""
    if X.dim() != 5:
        raise ValueError(f"X must be [N, B, C, H, W] (one batch per unrolled step), got shape {tuple(X.shape)}")
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


class NaiveEngine:
    """Create-graph unroll: autograd through all N steps (memory grows with N). The oracle engine."""

    name = "naive"
    approximate = False

    def __call__(self, model: nn.Module, X: Tensor, Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor) -> Tensor:
        from haba_fast.models import functional_forward

        check_engine_inputs(model, X, Y, w_start, w_target, lr)
        denom = normalized_distance(w_start, w_target)
        # The start point is a constant of the objective; a fresh leaf so grad() can differentiate the CE.
        w = w_start.detach().to(X.dtype).requires_grad_(True)
        for t in range(X.shape[0]):
            logits = functional_forward(model, w, X[t])
            ce = F.cross_entropy(logits, Y[t])
            (g,) = torch.autograd.grad(ce, w, create_graph=True)
            w = w - lr * g
        return (w - w_target.detach().to(w.dtype)).pow(2).sum() / denom.to(w.dtype)

    def __repr__(self) -> str:
        return "NaiveEngine()"


def _adjoint_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("haba_fast.adjoint") is not None


def default_engine_name() -> str:
    """``exact`` when ``haba_fast.adjoint`` is installed, else ``naive`` (with a warning)."""
    if _adjoint_available():
        return "exact"
    warnings.warn(
        "haba_fast.adjoint (the exact constant-memory engine) is not available; using the naive engine, "
        "whose memory grows with --syn_steps",
        RuntimeWarning,
        stacklevel=2,
    )
    return "naive"


def get_engine(name: Optional[str] = None) -> Engine:
    """Return the engine called ``name`` (``exact`` | ``naive`` | ``first-order``; None or ``auto``: default).

    Raises:
        ValueError: unknown name, or ``exact``/``first-order`` asked for while ``haba_fast.adjoint`` is missing.
    """
    if name is None or name == "auto":
        name = default_engine_name()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    if name == "naive":
        return NaiveEngine()
    try:
        from haba_fast.adjoint import get_adjoint_engine
    except ImportError as exc:
        raise ValueError(
            f"engine {name!r} needs haba_fast.adjoint, which is not available ({exc}); use --engine naive"
        ) from exc
    return get_adjoint_engine(name)


# ----------------------------------------------------------------------------------------------------------------------
# The step plan: the random choices of one iteration, as data.


class IndexStream:
    """Batches of B indices out of ``range(n)``, taken in order from a stream of random permutations.

    Every batch has exactly B indices; a batch may straddle two permutations when B does not divide
    n (then it may repeat an index). When B divides n this draws what the reference does: each
    permutation split into n / B chunks.
    """

    def __init__(self, n: int, batch: int):
        if n < 1:
            raise ValueError(f"IndexStream needs at least one item, got n={n}")
        if not 1 <= batch <= n:
            raise ValueError(f"batch size must be in [1, {n}], got {batch}")
        self.n = int(n)
        self.batch = int(batch)
        self._pending = torch.empty(0, dtype=torch.long)

    def next(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """The next batch: [B] int64 (CPU)."""
        while self._pending.numel() < self.batch:
            perm = torch.randperm(self.n, generator=generator)
            self._pending = torch.cat([self._pending, perm])
        out, self._pending = self._pending[: self.batch], self._pending[self.batch :]
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "batch": self.batch, "pending": self._pending.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["n"]) != self.n or int(state["batch"]) != self.batch:
            raise ValueError(
                f"index stream state is for n={state['n']}, batch={state['batch']}; this run has n={self.n}, "
                f"batch={self.batch}"
            )
        self._pending = state["pending"].clone().long()


@dataclass(frozen=True)
class PairPlan:
    """One batch of bases under two different hallucinators (the adversarial term's draws).

    Attributes:
        base_idx: [B] int64 indices into the flat class-major bases.
        hall_pair: [2] int64, two different hallucinators (equal only when there is a single one).
        aug: augmentation of the 2B samples ``cat([x_a, x_b])`` (one DSA call, as the reference does:
            one family, independent per-sample values), or None without augmentation.
    """

    base_idx: Tensor
    hall_pair: Tensor
    aug: Any = None


@dataclass(frozen=True)
class StepPlan:
    """The random choices of one distillation iteration.

    Attributes:
        base_idx: [N, B] int64, the bases (or images, for Pixels) of each unrolled step.
        hall_idx: [N] int64, the hallucinator of each step (zeros for Pixels).
        aug: per-step augmentation parameters (a list of N AugParams, each for B samples; "M" mode:
            each entry is itself a list applied in order), or None without augmentation.
        club: draws of the club term (HaBa only).
        adversary: draws of the adversary's own batch (HaBa only).
    """

    base_idx: Tensor
    hall_idx: Tensor
    aug: Optional[List[Any]] = None
    club: Optional[PairPlan] = None
    adversary: Optional[PairPlan] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.base_idx.shape[0])

    @property
    def batch(self) -> int:
        return int(self.base_idx.shape[1])


def _sample_aug(strategy: Optional[str], n: int, size, generator, mode: str):
    if not strategy or strategy.lower() == "none":
        return None
    from haba_fast import augment

    return augment.sample(strategy, n, tuple(size), generator=generator, mode=mode)


def _sample_pair(stream: IndexStream, n_hallucinators: int, strategy, size, generator, mode) -> PairPlan:
    base_idx = stream.next(generator)
    if n_hallucinators >= 2:
        hall_pair = torch.randperm(n_hallucinators, generator=generator)[:2]
    else:  # a single hallucinator cannot be contrasted with another: the term compares it with itself
        hall_pair = torch.zeros(2, dtype=torch.long)
    aug = _sample_aug(strategy, 2 * base_idx.numel(), size, generator, mode)
    return PairPlan(base_idx=base_idx, hall_pair=hall_pair, aug=aug)


def sample_plan(
    stream: IndexStream,
    num_steps: int,
    n_hallucinators: int,
    im_size: Sequence[int],
    *,
    strategy: Optional[str] = "color_crop_cutout_flip_scale_rotate",
    mode: str = "S",
    adversarial: bool = False,
    generator: Optional[torch.Generator] = None,
) -> StepPlan:
    """Draw every random choice of one iteration, in a fixed order, from ``generator``.

    Args:
        stream: the run's index stream (advanced in place; its state is part of a checkpoint).
        num_steps: N unrolled steps.
        n_hallucinators: hallucinator count (0 or 1 for Pixels: all hallucinator indices are 0).
        im_size: (H, W) of the generated samples (augmentation parameters depend on it).
        strategy: DSA strategy, or None / "none" for no augmentation.
        mode: DSA mode ("S": one family per call, per-sample values).
        adversarial: also draw the club batch and the adversary's batch (HaBa).
        generator: the source of randomness (never the global RNG when given).

    Returns:
        A StepPlan with base_idx [N, B], hall_idx [N], per-step aug, and the adversarial draws.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps (--syn_steps) must be >= 1, got {num_steps}")
    base, hall, augs = [], [], []
    for _ in range(num_steps):
        base.append(stream.next(generator))
        if n_hallucinators > 1:
            hall.append(int(torch.randint(n_hallucinators, (1,), generator=generator)))
        else:
            hall.append(0)
        augs.append(_sample_aug(strategy, stream.batch, im_size, generator, mode))
    club = adversary = None
    if adversarial:
        club = _sample_pair(stream, n_hallucinators, strategy, im_size, generator, mode)
        adversary = _sample_pair(stream, n_hallucinators, strategy, im_size, generator, mode)
    return StepPlan(
        base_idx=torch.stack(base),
        hall_idx=torch.tensor(hall, dtype=torch.long),
        aug=None if augs[0] is None else augs,
        club=club,
        adversary=adversary,
    )
