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
* ``unlimited``: store every step; nothing is recomputed.

Schedule (see docs/ARCHITECTURE.md, "Memory budget"): every w_t is stored whatever the budget, so a step that is
not kept costs exactly one recomputation wherever it sits; binomial checkpointing (revolve) saves recomputation
only when the states themselves do not fit, which here they always do. The engine keeps the LAST k steps: the
backward sweep consumes them first and frees each as it goes, so the recomputation of the earlier steps never
runs on top of the kept ones. One step's worth of the budget is held back for the step being computed, so
k = min(N, budget // per_step - 1) and peak = fixed + (k + 1) steps at most.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Optional, Union

import torch

__all__ = [
    "AUTO_FRACTION",
    "UNLIMITED",
    "budget_bytes",
    "free_memory_bytes",
    "keep_last",
    "parse_memory_budget",
]

AUTO_FRACTION = 0.5  # ``auto``: half of the free memory (the rest for generate/augment, the optimizer, other jobs)
UNLIMITED = "unlimited"

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

Budget = Union[int, str]  # bytes >= 0, "auto" or "unlimited"


def parse_memory_budget(value: Union[str, int, float, None]) -> Budget:
    """Parse a memory budget: ``0`` | a size (``8GB``, ``512MB``, ``1.5GiB``, bytes) | ``auto`` | ``unlimited``.

    Units are binary (1 KB = 1024 bytes, as RSS is reported). None means 0.

    Returns:
        bytes (int >= 0), ``"auto"`` or ``"unlimited"``.

    Raises:
        ValueError: anything else (negative, NaN, unknown unit), with the accepted forms.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"memory budget must be a size, 0, auto or unlimited, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"memory budget must be >= 0 bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"memory budget must be a string or a number of bytes, got {type(value).__name__}")
    text = value.strip().lower()
    if text in ("auto", UNLIMITED, "inf", "none"):
        return "auto" if text == "auto" else UNLIMITED
    m = _SIZE.match(text)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(
            f"memory budget {value!r} is not understood: give 0, a size such as 512MB, 8GB or 1.5GiB (binary "
            "units B/KB/MB/GB/TB), auto (a fraction of the free memory) or unlimited"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


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
    """The budget in bytes for tensors on ``device`` (None: unlimited); ``auto`` is resolved now."""
    budget = parse_memory_budget(budget) if not isinstance(budget, int) else budget
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
