"""The step plan: every random choice of one distillation iteration, drawn as data.

The random choices of an iteration (which bases, which hallucinator, which augmentation) are drawn
once into a :class:`StepPlan` from a ``torch.Generator``, in a fixed order, so an iteration can be
replayed exactly from the generator's state (resume, tests). The plan only chooses inputs: the
engines (:mod:`haba_fast.engines`) receive the resulting batches ``X`` and save them for their own
backward pass, so nothing is drawn again there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from haba_fast import augment

__all__ = ["IndexStream", "PairPlan", "StepPlan", "aug_to", "sample_pair", "sample_plan"]


def aug_to(aug: Any, device) -> Any:
    """Augmentation parameters on ``device``: an AugParams, a list/tuple of them (an "M" chain, or one entry per
    step, nested as deep as a plan nests them), or None."""
    if isinstance(aug, (list, tuple)):
        return [aug_to(a, device) for a in aug]
    return aug.to(device) if aug is not None else None


class IndexStream:
    """Batches of B indices out of ``range(n)``, drawn as the reference draws ``--batch_syn`` chunks.

    The reference keeps a list of chunks: when it is empty, a random permutation of ``range(n)`` split into
    chunks of B; each batch is the last chunk, popped; the list is emptied at the start of every iteration
    (:meth:`start_iteration`), and the iteration's adversarial draws continue it. B must divide n: otherwise
    the reference alternates a smaller leftover chunk, which the engines' fixed ``[N, B]`` plan cannot hold.
    """

    def __init__(self, n: int, batch: int):
        if n < 1:
            raise ValueError(f"IndexStream needs at least one item, got n={n}")
        if not 1 <= batch <= n:
            raise ValueError(f"batch size must be in [1, {n}], got {batch}")
        if n % batch:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            below = max(d for d in divisors if d < batch)
            above = min(d for d in divisors if d > batch)
            raise ValueError(
                f"--batch_syn {batch} does not divide the {n} synthetic samples: the reference would then "
                f"alternate batches of {n % batch} and {batch}, which the engines' fixed batch cannot hold; "
                f"choose a divisor of {n} (e.g. {below} or {above})"
            )
        self.n = int(n)
        self.batch = int(batch)
        self._chunks: List[Tensor] = []

    def start_iteration(self) -> None:
        """Forget the chunks left by the last iteration (the reference's ``indices_chunks = []``)."""
        self._chunks = []

    def next(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """The next batch: [B] int64 (CPU)."""
        if not self._chunks:
            self._chunks = list(torch.randperm(self.n, generator=generator).split(self.batch))
        return self._chunks.pop()

    def state_dict(self) -> Dict[str, Any]:
        chunks = torch.stack(self._chunks) if self._chunks else torch.empty(0, self.batch, dtype=torch.long)
        return {"n": self.n, "batch": self.batch, "chunks": chunks.clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["n"]) != self.n or int(state["batch"]) != self.batch:
            raise ValueError(
                f"index stream state is for n={state['n']}, batch={state['batch']}; this run has n={self.n}, "
                f"batch={self.batch}"
            )
        if "chunks" in state:
            self._chunks = list(state["chunks"].clone().long())
        else:  # checkpoints before 2026-12-03 kept the unused indices in order, taken from the front
            self._chunks = list(reversed(state["pending"].clone().long().split(self.batch)))


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

    def to(self, device) -> "PairPlan":
        """The same draws with every tensor on ``device``."""
        return replace(
            self, base_idx=self.base_idx.to(device), hall_pair=self.hall_pair.to(device), aug=aug_to(self.aug, device)
        )


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

    def to(self, device) -> "StepPlan":
        """The same plan with every tensor on ``device``. Moved once per iteration, so that building a step's batch
        on a GPU copies nothing from the host (each such copy waits for the GPU to finish its queued work)."""
        return replace(
            self,
            base_idx=self.base_idx.to(device),
            hall_idx=self.hall_idx.to(device),
            aug=aug_to(self.aug, device),
            club=None if self.club is None else self.club.to(device),
            adversary=None if self.adversary is None else self.adversary.to(device),
        )

    @property
    def batch(self) -> int:
        return int(self.base_idx.shape[1])


def _sample_aug(strategy: Optional[str], n: int, size, generator, mode: str):
    if not strategy or strategy.lower() == "none":
        return None
    return augment.sample(strategy, n, tuple(size), generator=generator, mode=mode)


def sample_pair(stream: IndexStream, n_hallucinators: int, strategy, size, generator, mode) -> PairPlan:
    """The adversarial term's draws: a batch of bases [B], two different hallucinators [2], and augmentation
    parameters for the 2B samples (both hallucinated batches, augmented together)."""
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
        club = sample_pair(stream, n_hallucinators, strategy, im_size, generator, mode)
        adversary = sample_pair(stream, n_hallucinators, strategy, im_size, generator, mode)
    return StepPlan(
        base_idx=torch.stack(base),
        hall_idx=torch.tensor(hall, dtype=torch.long),
        aug=None if augs[0] is None else augs,
        club=club,
        adversary=adversary,
    )
