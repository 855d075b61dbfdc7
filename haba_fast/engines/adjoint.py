"""The exact constant-memory trajectory engine, and its first-order approximation.

Both engines run N plain SGD steps of a student network on synthetic batches, starting at an expert snapshot
(see ``haba_fast.engines.base.Engine`` for the contract)::

    w_0 = w_start;  g_t = grad_w CE(model_{w_t}(X_t), Y_t);  w_{t+1} = w_t - lr * g_t
    loss = ||w_N - w*||^2 / ||w_start - w*||^2

and differentiate the loss in ``X`` and ``lr`` with the adjoint recursion of ../shared/DESIGN.md: the forward pass
saves X and the N+1 flat vectors w_t (no activation, no graph); the backward pass walks the steps in reverse with
``lam = dL/dw_{t+1}``, recomputes step t's activations with a graph from the saved (w_t, X_t), and takes one
Hessian-vector product::

    (h_w, h_x) = grad(g_t, [w_t, X_t], grad_outputs=lam)
    dL/dX_t = -lr h_x;   dL/dlr -= <g_t, lam>;   lam <- lam - lr h_w

Activation memory is that of one step, whatever N is (X itself, [N, B, C, H, W], is saved: it is an input that
autograd keeps anyway); the result equals the create-graph unroll (``naive``) up to
float rounding.

``first-order`` is an APPROXIMATION (TESLA-style): it keeps lam fixed (drops the ``- lr h_w`` update, i.e. the
second-order coupling between steps), so it skips the Hessian product in w. Its gradients differ from the exact
ones when N > 1 (equal at N = 1). It says so in its name, docstring and a one-time warning.

Two implementations of the same algorithm:

* the C++ op ``torch.ops.haba_fast.trajectory_match`` (csrc/trajectory.cpp) for the ConvNet family
  (``convnet_spec(model)`` not None, norm instancenorm / groupnorm / layernorm / none), float32/float64, CPU or
  CUDA tensors. It writes the Hessian-vector product analytically (forward-over-reverse, fused CPU loops);
* a Python ``torch.autograd.Function`` for any ``nn.Module`` (via ``haba_fast.models.functional_forward``).

The choice is automatic; ``backend="python"`` (or ``$HABA_FAST_ADJOINT=python``) forces the Python one and
``backend="cpp"`` requires the C++ one.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast.dist import BatchReducer
from haba_fast.engines.base import check_engine_inputs, normalized_distance
from haba_fast.models import convnet_spec, functional_forward

__all__ = [
    "ADJOINT_ENGINES",
    "AdjointEngine",
    "ExactEngine",
    "FirstOrderEngine",
    "adjoint_unroll",
    "cpp_spec",
    "get_adjoint_engine",
]

ADJOINT_ENGINES = ("exact", "first-order")
_BACKENDS = ("auto", "cpp", "python")
_ENV = "HABA_FAST_ADJOINT"

# Codes of csrc/trajectory.cpp's spec list.
_NORM_CODES = {"none": 0, "instancenorm": 1, "groupnorm": 2, "layernorm": 3}
_ACT_CODES = {"relu": 0, "sigmoid": 1, "leakyrelu": 2}
_POOL_CODES = {"none": 0, "avgpooling": 1, "maxpooling": 2}

_warned_first_order = False


def cpp_spec(model: nn.Module) -> list[int] | None:
    """The C++ engine's spec list for ``model``, or None when the C++ op cannot run it.

    Returns ``[channel, num_classes, width, depth, norm, act, pool, first_padding]`` (codes as in
    csrc/trajectory.cpp) for a ConvNet-family network whose norm the C++ engine implements (not batchnorm).
    """
    spec = convnet_spec(model)
    if spec is None or spec.norm not in _NORM_CODES or spec.act not in _ACT_CODES or spec.pool not in _POOL_CODES:
        return None
    return [
        spec.channel,
        spec.num_classes,
        spec.width,
        spec.depth,
        _NORM_CODES[spec.norm],
        _ACT_CODES[spec.act],
        _POOL_CODES[spec.pool],
        spec.first_padding,
    ]


def _cpp_op_available() -> bool:
    from haba_fast._ext import has_op

    return has_op("trajectory_match")


def _backend(backend: str | None) -> str:
    name = (backend if backend is not None else os.environ.get(_ENV, "auto")).strip().lower()
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown adjoint backend {name!r}: choose one of {', '.join(_BACKENDS)} (argument or ${_ENV})"
        )
    return name


# ----------------------------------------------------------------------------------------------------------------------
# The Python implementation (any nn.Module).


class _AdjointUnroll(torch.autograd.Function):
    """Forward: the unroll storing only w_t. Backward: the adjoint recursion (exact, or first-order)."""

    @staticmethod
    def forward(
        ctx,
        X: Tensor,
        lr: Tensor,
        model: nn.Module,
        Y: Tensor,
        w_start: Tensor,
        w_target: Tensor,
        first_order: bool,
        reducer: BatchReducer,
    ) -> Tensor:
        n_steps = X.shape[0]
        ws = torch.empty((n_steps + 1, w_start.numel()), dtype=w_start.dtype, device=w_start.device)
        ws[0] = w_start
        for t in range(n_steps):
            with torch.enable_grad():
                w = ws[t].detach().requires_grad_(True)
                ce = F.cross_entropy(functional_forward(model, w, X[t].detach()), Y[t]) * reducer.weight
                (g,) = torch.autograd.grad(ce, w)
            reducer.reduce_(g)  # the reducer hook: the shards' weighted gradients summed (identity on one process)
            torch.sub(ws[t], lr.detach() * g, out=ws[t + 1])
        denom = (w_start - w_target).pow(2).sum()
        ctx.save_for_backward(X, lr, Y, ws, w_target)
        ctx.model = model
        ctx.first_order = first_order
        ctx.reducer = reducer
        return (ws[n_steps] - w_target).pow(2).sum() / denom

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        X, lr, Y, ws, w_target = ctx.saved_tensors
        model, first_order, reducer = ctx.model, ctx.first_order, ctx.reducer
        n_steps = X.shape[0]
        lr_d = lr.detach()
        denom = (ws[0] - w_target).pow(2).sum()
        lam = 2.0 * grad_loss * (ws[n_steps] - w_target) / denom
        dX = torch.empty_like(X) if ctx.needs_input_grad[0] else None
        dlr = torch.zeros((), dtype=lr.dtype, device=lr.device)
        need_x = ctx.needs_input_grad[0]
        for t in range(n_steps - 1, -1, -1):
            with torch.enable_grad():
                w = ws[t].detach().requires_grad_(True)
                x = X[t].detach().requires_grad_(need_x)
                ce = F.cross_entropy(functional_forward(model, w, x), Y[t]) * reducer.weight
                (g,) = torch.autograd.grad(ce, w, create_graph=True)
                inputs = ([] if first_order else [w]) + ([x] if need_x else [])
                hs = torch.autograd.grad(g, inputs, grad_outputs=lam, allow_unused=True) if inputs else ()
            g = g.detach()
            dlr -= torch.dot(g, lam).to(dlr.dtype)
            if need_x:
                hx = hs[-1]
                dX[t] = 0.0 if hx is None else -lr_d * hx
            if not first_order:
                hw = hs[0]
                if hw is not None:
                    # The reducer hook: the shards' Hessian-vector products summed (<g_t, lam> and dX stay per shard:
                    # the lr gradient is summed over ranks with the synthetic set's).
                    lam = lam - lr_d * reducer.reduce_(hw)
        # Inputs: X, lr, model, Y, w_start, w_target, first_order (w_start/w_target are constants, as in naive).
        return dX, (dlr if ctx.needs_input_grad[1] else None), None, None, None, None, None, None


def adjoint_unroll(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    w_start: Tensor,
    w_target: Tensor,
    lr: Tensor,
    *,
    first_order: bool = False,
    reducer: Optional[BatchReducer] = None,
) -> Tensor:
    """The Python adjoint engine on any ``nn.Module`` (no input checks; engines call it after validating).

    Args:
        model: the student architecture (its weights are ignored; ``functional_forward`` uses ``w``).
        X: [N, B, C, H, W] float inputs; Y: [N, B] int64; w_start, w_target: [P] (X's dtype); lr: 0-dim.
        first_order: drop the Hessian term in w (approximation).
        reducer: data parallelism (``haba_fast.dist.BatchReducer``): X, Y are this rank's shard of every step's
            batch; per-step gradients and Hessian-vector products are summed over ranks. None: one process.

    Returns:
        0-dim loss, differentiable in X and lr.
    """
    reducer = reducer if reducer is not None else BatchReducer.single(X.shape[1])
    return _AdjointUnroll.apply(X, lr, model, Y, w_start, w_target, bool(first_order), reducer)


# ----------------------------------------------------------------------------------------------------------------------
# Engines.


class AdjointEngine:
    """Base of the two adjoint engines: validation, dtype handling, and the C++ / Python dispatch.

    Args:
        backend: ``auto`` (C++ op when the model is a supported ConvNet, the extension is loaded and the dtype is
            float32/float64; else Python), ``cpp`` (require the C++ op), ``python`` (force the Python
            implementation). None reads ``$HABA_FAST_ADJOINT`` (default ``auto``).
    """

    name = "adjoint"
    approximate = False
    first_order = False

    def __init__(self, backend: str | None = None):
        self.backend = _backend(backend)
        self.last_backend: str | None = None  # which implementation the last call used ("cpp" | "python")

    def _use_cpp(self, model: nn.Module, X: Tensor, distributed: bool = False) -> list[int] | None:
        if self.backend == "python":
            return None
        spec = cpp_spec(model)
        reason = None
        if distributed:  # the op runs the whole unroll in one call: no place for the per-step sum over ranks
            reason = "the C++ op has no per-step all-reduce (a multi-process run uses the Python adjoint)"
        elif spec is None:
            reason = f"{type(model).__name__} is not a ConvNet the C++ engine implements (instance/group/layer/no norm)"
        elif X.dtype not in (torch.float32, torch.float64):
            reason = f"dtype {X.dtype} (the C++ engine runs float32 and float64)"
        elif not _cpp_op_available():
            reason = "the C++ extension is not built or lacks trajectory_match"
        if reason is None:
            return spec
        if self.backend == "cpp":
            raise ValueError(f"engine {self.name!r} with backend 'cpp' cannot run: {reason}; use backend='auto'")
        return None

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
        """Matching loss after N SGD steps (see ``haba_fast.engines.base.Engine``).

        Args:
            model: the student architecture; only its structure is used.
            X: [N, B, C, H, W] synthetic inputs (float; autograd carries dL/dX back to whatever produced X).
            Y: [N, B] int64 labels.
            w_start: [P] flat expert snapshot at the start epoch (treated as a constant).
            w_target: [P] flat expert snapshot ``expert_epochs`` later (a constant).
            lr: 0-dim learning rate (differentiable).
            reducer: data parallelism (``haba_fast.dist.BatchReducer``; None: one process): X, Y are this rank's
                shard of every step's batch. An active reducer runs the Python implementation.

        Returns:
            0-dim loss ``||w_N - w*||^2 / ||w_start - w*||^2`` in X's dtype.
        """
        if not isinstance(lr, Tensor):
            lr = torch.tensor(float(lr), dtype=X.dtype, device=X.device)
        check_engine_inputs(model, X, Y, w_start, w_target, lr)
        for name, t in (("Y", Y), ("w_start", w_start), ("w_target", w_target), ("lr", lr)):
            if t.device != X.device:
                raise ValueError(f"{name} is on {t.device} but X is on {X.device}: put all engine inputs on one device")
        normalized_distance(w_start, w_target)
        if not torch.isfinite(X.detach()).all():
            raise ValueError("X (the synthetic batches) contains NaN or Inf; lower the learning rates")
        if not (torch.isfinite(w_start).all() and torch.isfinite(w_target).all()):
            raise ValueError("w_start or w_target contains NaN or Inf: the expert buffer is corrupt")
        if not torch.isfinite(lr.detach()):
            raise ValueError(f"lr is not finite ({float(lr)}); lower --lr_lr")
        im_size = getattr(model, "im_size", None)
        if im_size is not None and tuple(X.shape[-2:]) != tuple(im_size):
            raise ValueError(
                f"X holds {X.shape[-2]}x{X.shape[-1]} images but the model was built for im_size {tuple(im_size)}; "
                "build the student with the synthetic images' size"
            )
        classes = _num_classes(model)
        if classes is not None and Y.numel() and (int(Y.min()) < 0 or int(Y.max()) >= classes):
            raise ValueError(f"labels Y must be in [0, {classes}) for this model, got [{int(Y.min())}, {int(Y.max())}]")
        ws = w_start.detach().to(X.dtype)
        wt = w_target.detach().to(X.dtype)
        lr_x = lr.to(X.dtype)
        spec = self._use_cpp(model, X, distributed=reducer is not None and reducer.active)
        if spec is not None:
            self.last_backend = "cpp"
            try:
                return torch.ops.haba_fast.trajectory_match(X, Y, ws, wt, lr_x, spec, self.first_order)
            except RuntimeError as exc:  # the op's TORCH_CHECKs: bad input the checks above did not catch
                raise ValueError(str(exc).split("\n")[0]) from exc
        self.last_backend = "python"
        return adjoint_unroll(model, X, Y, ws, wt, lr_x, first_order=self.first_order, reducer=reducer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


def _num_classes(model: nn.Module) -> int | None:
    k = getattr(model, "num_classes", None)
    return int(k) if isinstance(k, int) else None


class ExactEngine(AdjointEngine):
    """Exact constant-memory adjoint: same gradients as the create-graph unroll, memory of one step."""

    name = "exact"
    approximate = False
    first_order = False


class FirstOrderEngine(AdjointEngine):
    """APPROXIMATION (TESLA-style first-order adjoint): keeps lam = dL/dw_N fixed through the backward pass.

    Drops the ``lam <- lam - lr H lam`` update, so the gradients of X and lr ignore how a step's change of w moves
    the gradients of later steps. Cheaper than ``exact`` (no Hessian product in w); equal to it only when N = 1.
    """

    name = "first-order"
    approximate = True
    first_order = True

    def __call__(self, *args, **kwargs) -> Tensor:
        global _warned_first_order
        if not _warned_first_order:
            _warned_first_order = True
            warnings.warn(
                "engine 'first-order' is an APPROXIMATION (TESLA-style: the Hessian terms between unrolled steps "
                "are dropped); its gradients differ from the exact ones. Use --engine exact for exact gradients.",
                UserWarning,
                stacklevel=2,
            )
        return super().__call__(*args, **kwargs)


def get_adjoint_engine(name: str, backend: str | None = None) -> AdjointEngine:
    """The adjoint engine ``exact`` or ``first-order`` (``first_order`` is accepted too).

    Args:
        name: engine name.
        backend: ``auto`` | ``cpp`` | ``python`` (see :class:`AdjointEngine`).

    Raises:
        ValueError: unknown name or backend.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key == "exact":
        return ExactEngine(backend)
    if key == "first-order":
        return FirstOrderEngine(backend)
    raise ValueError(f"unknown adjoint engine {name!r}: choose one of {', '.join(ADJOINT_ENGINES)}")
