"""The one backend gate: picks ``torch`` (reference), ``cpu`` (C++ extension) or ``triton`` (CUDA).

Selection order for an op on a tensor's device:
  1. an explicit ``backend=`` argument, else the ``HABA_FAST_BACKEND`` environment variable
     (``torch`` | ``cpu`` | ``triton`` | ``auto``);
  2. ``auto``: ``triton`` for CUDA tensors when Triton imports, ``cpu`` for CPU tensors when the
     extension registered the op, else ``torch``.
A backend asked for by name that cannot run raises ``BackendUnavailableError``; an automatic choice
that is unavailable falls back to ``torch`` with one warning per (op, backend). No CUDA query happens
at import time; availability checks are cached.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Optional

import torch

BACKENDS = ("torch", "cpu", "triton")
ENV_VAR = "HABA_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run here."""


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


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: the argument, else $HABA_FAST_BACKEND, else ``auto``."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(
            f"unknown backend {name!r}: choose one of {', '.join(BACKENDS + ('auto',))} (argument or ${ENV_VAR})"
        )
    return name


_warned: set = set()


def select_backend(op: str, device: torch.device, backend: Optional[str] = None, cpu_op: Optional[str] = None) -> str:
    """Return the backend that runs ``op`` on ``device``.

    Args:
        op: public op name (``generate``, ``augment``, ...), used in messages.
        device: device of the op's input tensors.
        backend: explicit override; None reads $HABA_FAST_BACKEND (default ``auto``).
        cpu_op: name of the registered C++ op that implements ``op`` (default: ``op``).
    """
    device = torch.device(device)
    asked = requested_backend(backend)
    cpu_op = cpu_op or op
    if asked == "torch":
        return "torch"
    if asked == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpu' for {op} needs CPU tensors, got device {device}")
        if not cpu_op_available(cpu_op):
            raise BackendUnavailableError(
                f"backend 'cpu' for {op}: the C++ extension is not built or lacks op {cpu_op!r}; "
                "rebuild with `pip install --no-build-isolation -e .`"
            )
        return "cpu"
    if asked == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                f"backend 'triton' for {op} needs CUDA tensors (or TRITON_INTERPRET=1), got {device}"
            )
        if not triton_available():
            raise BackendUnavailableError(f"backend 'triton' for {op}: triton is not installed (pip install triton)")
        return "triton"
    # auto
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _warn_once(op, "triton", "triton is not installed")
        return "torch"
    if device.type == "cpu":
        if cpu_op_available(cpu_op):
            return "cpu"
        _warn_once(op, "cpu", "the C++ extension is not available")
        return "torch"
    return "torch"


def _warn_once(op: str, backend: str, why: str) -> None:
    key = (op, backend)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"haba_fast: {op} falls back to the torch backend ({backend} unavailable: {why})", RuntimeWarning, stacklevel=3
    )
