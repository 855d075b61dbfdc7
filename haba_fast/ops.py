"""Public ops: ``generate``, ``augment``, ``generate_augment``.

Each picks its backend with ``haba_fast.backend.select_backend`` (torch reference / C++ / Triton).
Until the fused kernels land, every backend request resolves to the torch reference.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from haba_fast import _reference

__all__ = ["generate", "augment", "generate_augment"]


def generate(bases: Tensor, enc_weight: Tensor, enc_bias: Tensor, scale: Tensor, shift: Tensor, dec_weight: Tensor,
             dec_bias: Tensor, base_idx: Tensor, hall_idx: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Hallucinated samples [n, C, H, W]; shapes as in ``_reference.generate_reference``."""
    return _reference.generate_reference(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx)


def augment(x: Tensor, params, *, backend: Optional[str] = None) -> Tensor:
    """DSA-augmented ``x`` [n, C, H, W] under ``params`` (an AugParams or a list of them, applied in order)."""
    return _reference.augment_reference(x, params)


def generate_augment(bases: Tensor, enc_weight: Tensor, enc_bias: Tensor, scale: Tensor, shift: Tensor,
                     dec_weight: Tensor, dec_bias: Tensor, base_idx: Tensor, hall_idx: Tensor, params, *,
                     backend: Optional[str] = None) -> Tensor:
    """``augment(generate(...), params)``."""
    x = generate(bases, enc_weight, enc_bias, scale, shift, dec_weight, dec_bias, base_idx, hall_idx, backend=backend)
    return augment(x, params, backend=backend)
