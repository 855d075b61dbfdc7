"""Memory budgets of the adjoint engines: parsing ``--memory-budget``, and which steps a budget keeps.

The adjoint engines store the N+1 flat weight vectors w_t (P floats each, ~1.3 MB for ConvNet-128) and, within
a memory budget, the per-step tensors of the forward sweep that their backward sweep would otherwise recompute
(the torch step: the first-order gradient's autograd graph; the C++ step: per block the conv output, the block
output and the input gradient; both: the step's batch graph). A budget is:

* ``0``: store no per-step tensor; every step is recomputed in the backward sweep (memory flat in N apart from
  the w_t themselves);
* a size (``8GB``, ``512MB``, ``1.5GiB``, ``4096``): a hard cap in bytes on the stored per-step tensors;
* ``auto``: :data:`AUTO_FRACTION` of the memory free when the engine runs (``MemAvailable`` of /proc/meminfo,
  or free CUDA memory for CUDA tensors);
* ``unlimited``: store every step; nothing is recomputed;
* ``min`` (``minimal``): below 0: store no per-step tensor AND only every s-th weight vector w_t (s =
  :func:`checkpoint_every` (N) = ceil(sqrt(N))); the backward sweep recomputes each segment's w_t from its
  checkpoint with the forward sweep's ops (the same values, bit for bit). About 2 sqrt(N) + 2 w_t are held instead of
  N + 1, so memory is flat in N; it costs one more forward gradient per step (~N - N/s in all).

Schedule (see docs/ARCHITECTURE.md, "Memory budget"): every w_t is stored whatever the budget but ``min``, so a
step that is not kept costs exactly one recomputation wherever it sits; binomial checkpointing (revolve) saves
recomputation only when the states themselves do not fit. The engine keeps the LAST k steps: the backward sweep
consumes them first and frees each as it goes, so the recomputation of the earlier steps never runs on top of the
kept ones. One step's worth of the budget is held back for the step being computed, so k = min(N, budget //
per_step - 1) and peak = fixed + (k + 1) steps at most. ``min`` checkpoints the w_t in uniform segments of
ceil(sqrt(N)) steps (:func:`checkpoint_every`), not revolve's binomial schedule: a w_t is small next to a step's
work, so what matters is that each w_t is recomputed at most once (revolve would hold ~sqrt(2N) instead of ~2
sqrt(N) vectors for the same count of recomputations, a few MB, at the price of a schedule table).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Optional, Union

import torch

from haba_fast._ext import BufferCacheRun, buffer_cache_free_cap

__all__ = [
    "AUTO_FRACTION",
    "UNLIMITED",
    "MINIMAL",
    "budget_bytes",
    "checkpoint_every",
    "holds_step_buffers",
    "free_memory_bytes",
    "keep_last",
    "parse_memory_budget",
    "RunBuffers",
    "spare_bytes",
]

AUTO_FRACTION = 0.5  # ``auto``: half of the free memory (the rest for generate/augment, the optimizer, other jobs)
UNLIMITED = "unlimited"
MINIMAL = "min"  # checkpoint the weight trajectory too (every ceil(sqrt(N))-th w_t)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$")

Budget = Union[int, str]  # bytes >= 0, "auto", "unlimited" or "min"


def spare_bytes(stats: dict) -> Optional[int]:
    """What a budget leaves beside its kept steps and the step held back for the one being computed: budget -
    (stored_steps + 1) x per_step_bytes, from an engine's ``last_stats``; None for an unlimited budget (or no stats).
    """
    budget = stats.get("memory_budget_bytes")
    if budget is None:
        return None
    return int(budget) - (int(stats.get("stored_steps", 0)) + 1) * int(stats.get("per_step_bytes", 0))


def holds_step_buffers(memory_budget: Union[str, int, float, None], stats: Optional[dict] = None) -> bool:
    """Whether a run at this memory budget keeps its steps' large CPU blocks between steps (the C++ buffer cache
    held, each step in a scope: :class:`RunBuffers`). Every free block of a step then stays in the process for the
    next one -- the whole working set, not only the kept steps -- which saves re-faulting it in (up to ~30 us per
    4 KiB page on a VM that hands freed pages back to its host) but piles the free blocks of the step's phases up
    beside each other (measured at bpc 50, batch 500: +1.5 GB over budget 0's 3 GB peak), up to the cache's free
    cap (``HABA_FAST_BUFFER_CACHE_MB``, default 4096 MiB).

    * ``unlimited``: always.
    * a size or ``auto``: once an unroll on CPU tensors has shown (``stats``: the engine's ``last_stats``) that the
      budget's spare bytes (:func:`spare_bytes`) hold the whole free cap, so that peak RSS stays within the budget +
      budget 0's peak; a budget that its kept steps fill does not hold, nor one of GPU memory.
    * 0 and ``min``: never (they keep the smallest footprint).
    """
    budget = parse_memory_budget(memory_budget)
    if budget == UNLIMITED:
        return True
    if budget in (0, MINIMAL) or not stats or stats.get("memory_device") != "cpu":
        return False
    spare, cap = spare_bytes(stats), buffer_cache_free_cap()
    return spare is not None and cap is not None and spare >= cap


class RunBuffers(BufferCacheRun):
    """The C++ buffer cache over a run of steps at a memory budget (``distill()``, ``bench iteration``): held from
    the start at ``unlimited``, from the step after the first unroll that shows the budget can afford it at a size
    or ``auto`` (:func:`holds_step_buffers`), never at 0 or ``min``; once held, to the end of the run (a size's
    kept steps and spare bytes do not change between iterations; ``auto``'s free memory then counts the held
    blocks as used, which must not release them); every block goes back at the end.

    Use::

        with RunBuffers(budget) as buffers:
            for ...:
                with buffers.step():
                    distiller.step()
                buffers.after_step(distiller.engine)
    """

    def __init__(self, memory_budget):
        self.memory_budget = parse_memory_budget(memory_budget)
        super().__init__(hold=holds_step_buffers(self.memory_budget))

    def after_step(self, engine) -> None:
        """After a step: hold from the next step on where the engine's last unroll (``engine.last_stats``; None: an
        objective without a trajectory engine) shows that the budget affords it."""
        if not self.held and holds_step_buffers(self.memory_budget, getattr(engine, "last_stats", None)):
            self.hold()


def parse_memory_budget(value: Union[str, int, float, None]) -> Budget:
    """Parse a memory budget: ``0`` | a size (``8GB``, ``512MB``, ``1.5GiB``, bytes) | ``auto`` | ``unlimited`` |
    ``min``.

    Units are binary (1 KB = 1024 bytes, as RSS is reported). None means 0. ``minimal`` is a spelling of ``min``,
    ``inf`` one of ``unlimited``. A size must come to a whole number of bytes: ``1.5GiB`` is, ``0.5`` (bytes) and
    ``0.1B`` are not.

    Returns:
        bytes (int >= 0), ``"auto"``, ``"unlimited"`` or ``"min"``.

    Raises:
        ValueError: anything else (negative, NaN, unknown unit, a fraction of a byte), with the accepted forms.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"memory budget must be a size, 0, auto, unlimited or min, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"memory budget must be a whole number of bytes >= 0, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"memory budget must be a string or a number of bytes, got {type(value).__name__}")
    text = value.strip().lower()
    if text in ("auto", UNLIMITED, "inf"):
        return "auto" if text == "auto" else UNLIMITED
    if text in (MINIMAL, "minimal"):
        return MINIMAL
    m = _SIZE.match(text)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(
            f"memory budget {value!r} is not understood: give 0, a size such as 512MB, 8GB or 1.5GiB (binary "
            "units B/KB/MB/GB/TB), auto (a fraction of the free memory), unlimited, or min (checkpoint the weight "
            "trajectory too: memory flat in N, one more forward gradient per step)"
        )
    size = float(m.group(1)) * _UNITS[m.group(2)]
    if size != int(size) and (_UNITS[m.group(2)] == 1 or size < 1):  # 1.5GiB rounds to bytes; 0.5 bytes does not
        raise ValueError(f"memory budget {value!r} is not a whole number of bytes: give 0, or 1 byte or more")
    return int(size)


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: free CUDA memory, or ``MemAvailable`` of /proc/meminfo.

    Raises:
        ValueError: the free memory cannot be read here (give the budget as a size instead).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError("--memory-budget auto reads MemAvailable from /proc/meminfo, not available here; give a size")


def budget_bytes(budget: Budget, device: torch.device) -> Optional[int]:
    """The budget in bytes for kept steps on ``device`` (None: unlimited); ``auto`` is resolved now; ``min`` keeps none
    (0; whether the weight trajectory is checkpointed is the caller's: ``budget == MINIMAL``)."""
    budget = parse_memory_budget(budget) if not isinstance(budget, int) else budget
    if budget == MINIMAL:
        return 0
    if budget == UNLIMITED:
        return None
    if budget == "auto":
        return int(AUTO_FRACTION * free_memory_bytes(device))
    return int(budget)


def keep_last(n_steps: int, per_step: int, budget: Optional[int], *, warn: bool = True) -> int:
    """How many of the last steps a budget stores: ``min(N, budget // per_step - 1)`` (all when unlimited).

    One step's worth of the budget is held back for the step being computed: while the forward sweep builds
    step t's graph, its gradient's temporaries sit on top of the k graphs already kept (measured: without the
    reserve, budget 2GB at bpc 10 / batch 100 peaked 50 MB above budget + budget 0's peak). A positive budget too
    small for one step and its reserve stores none (as budget 0) and warns.
    """
    if budget is None:
        return n_steps
    if budget <= 0:
        return 0
    k = max(0, min(n_steps, budget // max(int(per_step), 1) - 1))
    if k == 0 and warn:
        warnings.warn(
            f"memory budget {budget / 2**20:.1f} MiB holds no step ({per_step / 2**20:.1f} MiB each, plus one held "
            "back for the step being computed): every step is recomputed, as with --memory-budget 0",
            RuntimeWarning,
            stacklevel=3,
        )
    return k


def checkpoint_every(n_steps: int) -> int:
    """The segment length s of ``min``: every s-th w_t is stored (w_0, w_s, w_2s, ...), s = ceil(sqrt(N)) >= 1.

    Uniform segments: the backward sweep recomputes one segment's s - 1 inner w_t at a time, each once, so at most
    ceil(N/s) checkpoints + s - 1 segment vectors + w_N (~2 sqrt(N) + 1) are held and the extra work is one forward
    gradient per step that is not a checkpoint (N - ceil(N/s) in all).
    """
    n = int(n_steps)
    if n < 1:
        raise ValueError(f"n_steps must be >= 1, got {n}")
    return max(1, math.isqrt(n - 1) + 1)
