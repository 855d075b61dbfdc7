"""The ``naive`` engine: the create-graph unroll, the oracle the other engines are tested against."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast.dist import BatchReducer
from haba_fast.engines.base import (
    as_lr_tensor,
    check_engine_batch,
    check_engine_inputs,
    check_engine_values,
)
from haba_fast.models import functional_forward

__all__ = ["NaiveEngine"]


class NaiveEngine:
    """Create-graph unroll: autograd through all N steps (memory grows with N). The oracle engine.

    Autograd keeps every step's graph (activations and the first-order gradient graph) until the
    backward pass, so memory is O(N) activations; gradients are autograd's, with no hand-written math.
    """

    name = "naive"
    approximate = False

    def __call__(
        self,
        model: nn.Module,
        X: Tensor,
        Y: Tensor,
        w_start: Tensor,
        w_target: Tensor,
        lr: Tensor,
        *,
        reducer: Optional[BatchReducer] = None,
    ) -> Tensor:
        """Matching loss after N SGD steps (the contract of ``haba_fast.engines.base.Engine``).

        ``reducer`` (data parallelism, ``haba_fast.dist.BatchReducer``): X and Y hold this rank's shard of every
        step's batch; the weighted shard gradients are summed over ranks so every rank steps the same w_{t+1}.
        """
        lr = as_lr_tensor(lr, X)
        check_engine_inputs(model, X, Y, w_start, w_target, lr)
        denom = check_engine_values(Y, w_start, w_target, lr, X.device)
        check_engine_batch(model, X, Y)
        # The start point is a constant of the objective; a fresh leaf so grad() can differentiate the CE.
        w = w_start.detach().to(X.dtype).requires_grad_(True)
        reducer = reducer if reducer is not None else BatchReducer.single(X.shape[1])
        for t in range(X.shape[0]):
            # The reducer hook (identity on one process): this rank's shard gradient, weighted, summed over ranks;
            # in the backward pass share() sums the shards' Hessian-vector products.
            w_in = reducer.share(w)
            ce = F.cross_entropy(functional_forward(model, w_in, X[t]), Y[t]) * reducer.weight
            (g,) = torch.autograd.grad(ce, w_in, create_graph=True)
            w = w - reducer.reduce(lr * g)
        return (w - w_target.detach().to(w.dtype)).pow(2).sum() / denom.to(w.dtype)

    def __repr__(self) -> str:
        return "NaiveEngine()"
