"""The one place a device name from a flag or a config becomes a ``torch.device``, with a clear error.

``resolve_device("auto")`` (or None) is CUDA when available, else the CPU. Any other name must be ``cpu``,
``cuda`` or ``cuda:N`` of a GPU this machine has; anything else (``tpu``, ``meta``, ``cuda:7`` on one GPU, a CUDA
device without CUDA) is a ``ValueError`` naming the flag and what to use instead, raised before any work starts.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

__all__ = ["device_memory_bytes", "resolve_device"]


def resolve_device(device: Optional[Union[str, torch.device]], flag: str = "--device") -> torch.device:
    """``auto``/None: CUDA when available, else CPU; otherwise the named device, checked.

    Args:
        device: None, ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        flag: how the error names the setting (``--device`` for the CLI).

    Raises:
        ValueError: not a device name, a device type haba_fast does not run on, or a CUDA device this machine
            does not have.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {device}: haba_fast runs on cpu or cuda (cuda:N), not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available here; use {flag} cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag} {device}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    return dev


def device_memory_bytes(device: Union[str, torch.device]) -> Tuple[int, str]:
    """Total bytes of ``device``'s memory and a name for it: the CUDA device's, or this machine's RAM (what a size
    check holds tensors against before allocating them)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), f"{device}'s memory"
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "this machine's memory (RAM)"
