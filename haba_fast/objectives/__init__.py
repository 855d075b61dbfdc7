"""Distillation objectives, as plug-ins over any parameterization (``Pixels``, ``HaBa``).

* ``base``: the interface (:class:`~haba_fast.objectives.base.Objective`), the registry (``get_objective``,
  ``OBJECTIVES``) and the shared pieces (per-class synthetic batches, Siamese augmentation, real batches).
* ``mtt``: trajectory matching (MTT), through an engine of ``haba_fast.engines`` (``--objective mtt``).
* ``gradient``: gradient matching, DC and DSA (``--objective dc`` / ``dsa``).
* ``distribution``: distribution matching, DM (``--objective dm``).
* ``contrastive``: HaBa's adversarial contrastive term (the adversary network, its loss, the club term), added
  on top of every objective by the distiller.
"""

from __future__ import annotations

__all__ = ["base", "mtt", "gradient", "distribution", "contrastive"]
