"""Distillation objectives.

* ``mtt``: trajectory matching (MTT) for the ``Pixels`` and ``HaBa`` parameterizations, through an
  engine of ``haba_fast.trajectory``.
* ``contrastive``: HaBa's adversarial contrastive term (the adversary network, its loss, the club term).
"""

from __future__ import annotations

__all__ = ["mtt", "contrastive"]
