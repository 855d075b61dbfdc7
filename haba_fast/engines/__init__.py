"""Trajectory-matching engines and their registry.

Every engine implements the contract of :class:`haba_fast.engines.base.Engine`: run N plain SGD steps of a
student from ``w_start`` on synthetic batches ``X [N, B, C, H, W]`` and return
``||w_N - w*||^2 / ||w_start - w*||^2``, differentiable in ``X`` and ``lr``. Engines:

* ``naive`` (:mod:`~haba_fast.engines.naive`): the create-graph unroll; autograd keeps all N steps' graphs,
  so memory grows linearly with N. Simple, the oracle for the others.
* ``exact`` (:mod:`~haba_fast.engines.adjoint`): the constant-memory adjoint. Its forward pass saves X and
  the N+1 flat weight vectors w_t (no activation, no graph); the backward pass recomputes one step's
  activations at a time from the saved (w_t, X_t). Same gradient as ``naive`` up to float rounding.
* ``first-order``: the adjoint without the Hessian term in w (TESLA-style); an approximation.

Module layout (no import cycle): ``base`` (protocol, checks) <- ``naive``, ``adjoint`` <- this registry.
"""

from __future__ import annotations

from typing import Optional

from haba_fast.engines.adjoint import ExactEngine, FirstOrderEngine, get_adjoint_engine
from haba_fast.engines.base import Engine, check_engine_inputs, normalized_distance
from haba_fast.engines.naive import NaiveEngine

ENGINES = ("exact", "naive", "first-order")

__all__ = [
    "ENGINES",
    "Engine",
    "ExactEngine",
    "FirstOrderEngine",
    "NaiveEngine",
    "check_engine_inputs",
    "default_engine_name",
    "get_adjoint_engine",
    "get_engine",
    "normalized_distance",
]


def default_engine_name() -> str:
    """The engine ``auto`` resolves to: ``exact`` (same gradients as ``naive``, memory of one step)."""
    return "exact"


def get_engine(name: Optional[str] = None) -> Engine:
    """Return the engine called ``name`` (``exact`` | ``naive`` | ``first-order``; None or ``auto``: default).

    Raises:
        ValueError: unknown name.
    """
    if name is None or name == "auto":
        name = default_engine_name()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    if name == "naive":
        return NaiveEngine()
    return get_adjoint_engine(name)
