"""The ``naive`` engine: the create-graph unroll, the oracle the other engines are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast.engines.base import check_engine_inputs, normalized_distance
from haba_fast.models import functional_forward

__all__ = ["NaiveEngine"]


class NaiveEngine:
    """Create-graph unroll: autograd through all N steps (memory grows with N). The oracle engine.

    Autograd keeps every step's graph (activations and the first-order gradient graph) until the
    backward pass, so memory is O(N) activations; gradients are autograd's, with no hand-written math.
    """

    name = "naive"
    approximate = False

    def __call__(self, model: nn.Module, X: Tensor, Y: Tensor, w_start: Tensor, w_target: Tensor, lr: Tensor) -> Tensor:
        """Matching loss after N SGD steps (the contract of ``haba_fast.engines.base.Engine``)."""
        check_engine_inputs(model, X, Y, w_start, w_target, lr)
        denom = normalized_distance(w_start, w_target)
        # The start point is a constant of the objective; a fresh leaf so grad() can differentiate the CE.
        w = w_start.detach().to(X.dtype).requires_grad_(True)
        for t in range(X.shape[0]):
            logits = functional_forward(model, w, X[t])
            ce = F.cross_entropy(logits, Y[t])
            (g,) = torch.autograd.grad(ce, w, create_graph=True)
            w = w - lr * g
        return (w - w_target.detach().to(w.dtype)).pow(2).sum() / denom.to(w.dtype)

    def __repr__(self) -> str:
        return "NaiveEngine()"
