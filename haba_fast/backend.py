"""The one backend gate: which implementation (``torch`` | ``cpu`` | ``triton``) runs an op, and why not the others.

Vocabulary (one for every op, the engine included):

- ``torch``: plain PyTorch (``haba_fast._reference`` for the ops, the Python engine for ``trajectory_match``);
  runs anything, anywhere.
- ``cpu``: the compiled C++ extension ``haba_fast._C`` (``torch.ops.haba_fast.*``). Named for its fused CPU loops;
  ``trajectory_match``'s C++ op also takes CUDA tensors (it is written in ATen ops there).
- ``triton``: Triton kernels (``kernels/``), CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

Each backend is an object with ``supports(op, inputs) -> list[str]``: the reasons it cannot run ``op`` on these
inputs (empty = it can), in the style of xformers' ``not_supported_reasons``. :func:`select_backend` asks them in
the device's order of preference (CUDA: triton, cpu, torch; CPU: cpu, torch) and takes the first with no reason;
:func:`explain` returns every backend's reasons (``haba-fast info`` prints them).

Override: a ``backend=`` argument, else ``$HABA_FAST_BACKEND`` (``torch`` | ``cpu`` | ``triton`` | ``auto``). A
backend asked for by name that cannot run raises :class:`BackendUnavailableError` with its reasons; an automatic
choice that falls back past an unavailable preferred backend warns once per (op, backend). The old spellings
``cpp`` (= ``cpu``) and ``python`` (= ``torch``) are accepted with a ``DeprecationWarning``. No CUDA query happens at
import time; availability checks are cached.

Ops can add their own conditions with :func:`register_check` (the engine registers "the model is a ConvNet the
C++ engine implements" for ``trajectory_match`` on ``cpu``).

Environment: ``HABA_FAST_BACKEND`` is the only variable that chooses a backend (``HABA_FAST_ADJOINT`` is its
deprecated, engine-only predecessor). ``HABA_FAST_CPU_ISA`` (cap the per-ISA copies of the C++ loops),
``HABA_FAST_TRAJECTORY_FUSED=0`` (the C++ engine's ATen-only path; ``=triton``: its blocks in the Triton kernels of
``kernels/trajectory_block.py``) and ``HABA_FAST_BUFFER_CACHE[_MB]`` tune the
``cpu`` backend from inside; they never change which backend runs. ``haba-fast info`` lists every one that is set.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OPS",
    "BackendUnavailableError",
    "OpInputs",
    "cpu_op_available",
    "explain",
    "register_check",
    "requested_backend",
    "select_backend",
    "supports",
    "triton_available",
]

BACKENDS = ("torch", "cpu", "triton")
ENV_VAR = "HABA_FAST_BACKEND"
_DEPRECATED = {"cpp": "cpu", "python": "torch"}
_FAST_DTYPES = (torch.float32, torch.float64)

# Per op: the registered C++ op, the devices the C++ op takes, and whether a Triton implementation exists.
OPS: dict[str, dict[str, Any]] = {
    "generate": {"cpu_op": "generate", "cpu_devices": ("cpu",), "triton": True},
    "augment": {"cpu_op": "augment", "cpu_devices": ("cpu",), "triton": True},
    "generate_augment": {"cpu_op": "generate_augment", "cpu_devices": ("cpu",), "triton": True},
    "trajectory_match": {"cpu_op": "trajectory_match", "cpu_devices": ("cpu", "cuda"), "triton": False},
}


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run here (the message lists why)."""


@dataclass(frozen=True)
class OpInputs:
    """What the backends look at to decide whether they can run an op.

    Attributes:
        device: device of the op's tensors.
        dtype: their floating dtype (None: not known yet, e.g. for ``haba-fast info``).
        families: augmentation families of the call (augment ops), in chain order.
        extra: anything an op's registered checks need (the engine passes ``{"model": model}``).
    """

    device: torch.device
    dtype: Optional[torch.dtype] = None
    families: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and a CUDA device exists, or TRITON_INTERPRET=1 is set (cached)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available()


def cpu_op_available(op: str) -> bool:
    """True when the C++ extension loaded and registered ``torch.ops.haba_fast.<op>``."""
    from haba_fast._ext import has_op

    return has_op(op)


# Extra conditions per (op, backend), added by the modules that know them: fn(inputs) -> list of reasons.
_CHECKS: dict[tuple[str, str], list[Callable[[OpInputs], list[str]]]] = {}


def register_check(op: str, backend: str, check: Callable[[OpInputs], list[str]]) -> None:
    """Add a condition for running ``op`` on ``backend``: ``check(inputs)`` returns reasons (empty = fine)."""
    if op not in OPS or backend not in BACKENDS:
        raise ValueError(f"register_check: unknown op {op!r} or backend {backend!r}")
    lst = _CHECKS.setdefault((op, backend), [])
    if check not in lst:
        lst.append(check)


def _family_reasons(inputs: OpInputs) -> list[str]:
    from haba_fast.aug_families import family

    out = []
    for name in dict.fromkeys(inputs.families):
        reason = family(name).no_kernel
        if reason:
            out.append(reason)
    return out


def _dtype_reasons(backend: str, inputs: OpInputs) -> list[str]:
    if inputs.dtype is not None and inputs.dtype not in _FAST_DTYPES:
        return [f"dtype {inputs.dtype}: the {backend} kernels take float32/float64"]
    return []


class _Torch:
    name = "torch"

    def supports(self, op: str, inputs: OpInputs) -> list[str]:
        return []


class _Cpu:
    name = "cpu"

    def supports(self, op: str, inputs: OpInputs) -> list[str]:
        spec = OPS[op]
        reasons = []
        if inputs.device.type not in spec["cpu_devices"]:
            reasons.append(f"the C++ {op} takes {'/'.join(spec['cpu_devices'])} tensors, got {inputs.device}")
        if not cpu_op_available(spec["cpu_op"]):
            from haba_fast import _ext

            err = _ext.extension_error()
            reasons.append(
                f"the C++ extension is not loaded ({err}); rebuild with `pip install --no-build-isolation -e .`"
                if err
                else f"the C++ extension lacks op haba_fast::{spec['cpu_op']} (rebuild it)"
            )
        return reasons + _dtype_reasons("C++", inputs) + _family_reasons(inputs)


class _Triton:
    name = "triton"

    def supports(self, op: str, inputs: OpInputs) -> list[str]:
        if not OPS[op]["triton"]:
            return [f"no Triton implementation of {op}"]
        reasons = []
        if inputs.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append(f"needs CUDA tensors (or TRITON_INTERPRET=1), got {inputs.device}")
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install triton)")
        elif inputs.device.type == "cuda" and not triton_available():
            reasons.append("no CUDA device")
        return reasons + _dtype_reasons("Triton", inputs) + _family_reasons(inputs)


_BACKEND_OBJS = {b.name: b for b in (_Torch(), _Cpu(), _Triton())}


def _inputs(device_or_inputs: Union[OpInputs, torch.device, str]) -> OpInputs:
    if isinstance(device_or_inputs, OpInputs):
        return device_or_inputs
    return OpInputs(device=torch.device(device_or_inputs))


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: choose one of {', '.join(OPS)}")


def supports(op: str, inputs: Union[OpInputs, torch.device, str], backend: str) -> list[str]:
    """Reasons ``backend`` cannot run ``op`` on ``inputs`` (a device or :class:`OpInputs`); empty = it can."""
    _check_op(op)
    inputs = _inputs(inputs)
    reasons = _BACKEND_OBJS[backend].supports(op, inputs)
    for check in _CHECKS.get((op, backend), ()):
        reasons += check(inputs)
    return reasons


def explain(op: str, inputs: Union[OpInputs, torch.device, str]) -> dict[str, list[str]]:
    """Every backend's reasons for not running ``op`` on ``inputs`` (empty list = it can), in preference order."""
    inputs = _inputs(inputs)
    return {b: supports(op, inputs, b) for b in _preference(inputs.device)}


def _preference(device: torch.device) -> tuple[str, ...]:
    return ("triton", "cpu", "torch") if device.type == "cuda" else ("cpu", "torch", "triton")


def requested_backend(backend: Optional[str] = None, *, legacy_env: Optional[str] = None) -> str:
    """The backend asked for: the argument, else $HABA_FAST_BACKEND, else ``auto`` (old spellings mapped, warned).

    ``legacy_env`` names an older, op-specific variable (``HABA_FAST_ADJOINT``) still honoured, with a
    ``DeprecationWarning``, when it is set and neither the argument nor $HABA_FAST_BACKEND is.
    """
    name = backend if backend is not None else os.environ.get(ENV_VAR)
    if name is None and legacy_env and os.environ.get(legacy_env):
        warnings.warn(
            f"haba_fast: ${legacy_env} is deprecated; set ${ENV_VAR} (torch | cpu | triton | auto) instead",
            DeprecationWarning,
            stacklevel=3,
        )
        name = os.environ[legacy_env]
    name = (name if name is not None else "auto").strip().lower()
    if name in _DEPRECATED:
        warnings.warn(
            f"haba_fast: backend name {name!r} is deprecated; use {_DEPRECATED[name]!r} (torch | cpu | triton)",
            DeprecationWarning,
            stacklevel=3,
        )
        name = _DEPRECATED[name]
    if name not in BACKENDS + ("auto",):
        raise ValueError(
            f"unknown backend {name!r}: choose one of {', '.join(BACKENDS + ('auto',))} (argument or ${ENV_VAR})"
        )
    return name


_warned: set = set()


def select_backend(
    op: str,
    inputs: Union[OpInputs, torch.device, str],
    backend: Optional[str] = None,
    *,
    legacy_env: Optional[str] = None,
) -> str:
    """Return the backend that runs ``op`` on ``inputs``.

    Args:
        op: one of :data:`OPS` (``generate``, ``augment``, ``generate_augment``, ``trajectory_match``).
        inputs: an :class:`OpInputs`, or just a device.
        backend: explicit override; None reads $HABA_FAST_BACKEND (default ``auto``).
        legacy_env: an older op-specific environment variable still honoured (see :func:`requested_backend`).

    Raises:
        BackendUnavailableError: ``backend`` (or the environment) names a backend that cannot run here.
    """
    _check_op(op)
    inputs = _inputs(inputs)
    asked = requested_backend(backend, legacy_env=legacy_env)
    if asked != "auto":
        reasons = supports(op, inputs, asked)
        if reasons:
            raise BackendUnavailableError(f"backend {asked!r} cannot run {op}: " + "; ".join(reasons))
        return asked
    skipped = []
    for name in _preference(inputs.device):
        reasons = supports(op, inputs, name)
        if not reasons:
            if skipped and name == "torch":
                _warn_once(op, skipped)
            return name
        skipped.append((name, tuple(reasons)))
    return "torch"  # unreachable: torch supports everything


def _warn_once(op: str, skipped: list) -> None:
    key = (op, tuple(skipped))
    if key in _warned:
        return
    _warned.add(key)
    why = "; ".join(f"{name}: {'; '.join(reasons)}" for name, reasons in skipped)
    warnings.warn(f"haba_fast: {op} falls back to the torch backend ({why})", RuntimeWarning, stacklevel=3)
