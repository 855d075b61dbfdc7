"""Loads the compiled extension ``haba_fast._C`` once; warns once and reports unavailability on failure.

The extension registers its ops under ``torch.ops.haba_fast`` (TORCH_LIBRARY). Loading it is
deferred until an op first asks, so ``import haba_fast`` stays cheap and never fails.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

_load_error: Optional[str] = None


@functools.lru_cache(maxsize=None)
def extension_available() -> bool:
    """True when ``haba_fast._C`` imported and registered its ops (cached)."""
    global _load_error
    try:
        import torch  # noqa: F401  (loads libtorch, which _C links against)

        from haba_fast import _C  # noqa: F401
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        _load_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"haba_fast C++ extension not loaded ({_load_error}); falling back to the pure-PyTorch backend. "
            "Rebuild with `pip install --no-build-isolation -e .` to get the fast CPU kernels.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def extension_error() -> Optional[str]:
    """The reason the extension failed to load, or None (call ``extension_available`` first)."""
    return _load_error


def has_op(name: str) -> bool:
    """True when the extension is loaded and registered ``torch.ops.haba_fast.<name>``."""
    if not extension_available():
        return False
    import torch

    return hasattr(torch.ops.haba_fast, name)
