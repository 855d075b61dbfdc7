"""Trajectory-matching engines and their registry.

Every engine implements the contract of :class:`haba_fast.engines.base.Engine`: run N plain SGD steps of a
student from ``w_start`` on synthetic batches ``X [N, B, C, H, W]`` and return
``||w_N - w*||^2 / ||w_start - w*||^2``, differentiable in ``X`` and ``lr``. Engines:

* ``naive`` (:mod:`~haba_fast.engines.naive`): the create-graph unroll; autograd keeps all N steps' graphs,
  so memory grows linearly with N. Simple, the oracle for the others.
* ``exact`` (:mod:`~haba_fast.engines.adjoint`): the constant-memory adjoint. Its forward pass saves X and
  the N+1 flat weight vectors w_t (no activation, no graph); the backward pass recomputes one step's
  activations at a time from the saved (w_t, X_t). Same gradient as ``naive`` up to float rounding. Within a
  memory budget (:mod:`~haba_fast.engines.memory`) it also keeps the last steps' graphs instead of recomputing
  them; ``engine.stream(...)`` builds each step's batch on demand, so memory does not grow with N but for the w_t,
  which ``offload_weights`` (:mod:`~haba_fast.engines.offload`) moves to a file or to host memory.
* ``first-order``: the adjoint without the Hessian term in w (TESLA-style); an approximation.

Module layout (no import cycle): ``base`` (protocol, checks) <- ``naive``, ``adjoint`` <- this registry.
"""

from __future__ import annotations

from typing import Optional, Union

from haba_fast.engines.adjoint import ExactEngine, FirstOrderEngine, get_adjoint_engine
from haba_fast.engines.base import Engine, check_engine_inputs, normalized_distance
from haba_fast.engines.memory import parse_memory_budget
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
    "parse_memory_budget",
]


def default_engine_name() -> str:
    """The engine ``auto`` resolves to: ``exact`` (same gradients as ``naive``, memory of one step)."""
    return "exact"


def get_engine(
    name: Optional[str] = None,
    *,
    memory_budget: Union[str, int] = 0,
    offload_weights: bool = False,
    compile_step: bool = False,
    cuda_graphs: bool = False,
) -> Engine:
    """Return the engine called ``name`` (``exact`` | ``naive`` | ``first-order``; None or ``auto``: default).

    Args:
        name: engine name.
        memory_budget: the adjoint engines' budget for stored per-step tensors (``0`` | a size such as ``"2GB"`` |
            ``"auto"`` | ``"unlimited"``; :mod:`haba_fast.engines.memory`). ``naive`` stores every step by
            construction and takes only 0.
        offload_weights: the adjoint engines store the weight trajectory off the device
            (:mod:`~haba_fast.engines.offload`); ``naive`` refuses it.
        compile_step: the adjoint engines run the torch step compiled with ``torch.compile`` (budget 0 or ``min``;
            :class:`~haba_fast.engines.adjoint.AdjointEngine`); ``naive`` refuses it.
        cuda_graphs: the adjoint engines replay the C++ op's steps from CUDA graphs (CUDA tensors;
            :mod:`~haba_fast.engines.graphs`); ``naive`` refuses it.

    Raises:
        ValueError: unknown name, a bad budget, or a budget or offloading for ``naive``.
        TypeError: a switch that is not a bool.
    """
    if name is None or name == "auto":
        name = default_engine_name()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
    budget = parse_memory_budget(memory_budget)
    switches = {"offload_weights": offload_weights, "compile_step": compile_step, "cuda_graphs": cuda_graphs}
    for flag, value in switches.items():
        if not isinstance(value, bool):  # a string such as "no" would read as on
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if name == "naive":
        if budget != 0:
            raise ValueError(
                "engine 'naive' keeps every step's graph (memory grows with N) and takes no memory budget; use "
                "--engine exact with --memory-budget"
            )
        if offload_weights:
            raise ValueError(
                "engine 'naive' keeps every step's graph and cannot offload its weight trajectory; use --engine exact "
                "with --offload-weights"
            )
        if compile_step:
            raise ValueError(
                "engine 'naive' is autograd's create-graph unroll and has no step to compile; use --engine exact with "
                "--compile-step"
            )
        if cuda_graphs:
            raise ValueError(
                "engine 'naive' is autograd's create-graph unroll and has no step op to replay; use --engine exact "
                "with --cuda-graphs"
            )
        return NaiveEngine()
    return get_adjoint_engine(
        name,
        memory_budget=budget,
        offload_weights=offload_weights,
        compile_step=compile_step,
        cuda_graphs=cuda_graphs,
    )
