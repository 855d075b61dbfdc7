"""The exact constant-memory trajectory engine, and its first-order approximation.

Both engines run N plain SGD steps of a student network on synthetic batches, starting at an expert snapshot
(see ``haba_fast.engines.base.Engine`` for the contract)::

    w_0 = w_start;  g_t = grad_w CE(model_{w_t}(X_t), Y_t);  w_{t+1} = w_t - lr * g_t
    loss = ||w_N - w*||^2 / ||w_start - w*||^2

and differentiate the loss in ``X`` and ``lr`` with the adjoint recursion of docs/DESIGN.md: the forward sweep
saves the N+1 flat vectors w_t (or checkpoints of them); the backward sweep walks the steps in reverse with
``lam = dL/dw_{t+1}``, gets step t's activations (recomputed from w_t and X_t, or kept from the forward sweep) and
takes one Hessian-vector product::

    (h_w, h_x) = grad(g_t, [w_t, X_t], grad_outputs=lam)
    dL/dX_t = -lr h_x;   dL/dlr -= <g_t, lam>;   lam <- lam - lr h_w

The result equals the create-graph unroll (``naive``) up to float rounding, whatever is kept.

Where step t's batch comes from:

* ``engine(model, X, Y, ...)``: a stored ``X [N, B, C, H, W]`` (autograd carries dL/dX back to whatever built X);
* ``engine.stream(model, make_inputs, N, params, ...)``: ``make_inputs(t) -> (X_t, Y_t)`` builds each step's batch
  on demand (the MTT objective passes the step plan's generate + augment), without a graph in the forward sweep and
  again with one in the backward sweep, which pushes dL/dX_t into ``params`` at once: neither X nor the N steps'
  generate/augment graph is held, so memory does not grow with N.

Memory budget (``memory_budget``, :mod:`haba_fast.engines.memory`): 0 keeps no per-step tensor (every step is
recomputed in the backward sweep); a budget keeps the last k steps' forward-sweep tensors and their batch graphs
(the torch step: the first-order gradient's autograd graph; the C++ step: per block the conv output, the block
output and the gradient w.r.t. the block input), k = budget // (one step's bytes, measured on step 0) - 1 (one step
held back for the step being computed), so the backward sweep recomputes only the first N - k; ``unlimited``
recomputes nothing. Kept or recomputed, a step's results are the same. ``min`` keeps no step and checkpoints the
weight trajectory too: the forward sweep stores every ceil(sqrt(N))-th w_t (and w_N), the backward sweep
recomputes one segment's w_t at a time from its checkpoint with the forward sweep's ops (the same values, bit for
bit): ~2 sqrt(N) + 2 vectors held instead of N + 1, for one more forward gradient per step. ``offload_weights``
keeps every w_t but off the device (:mod:`haba_fast.engines.offload`: a temporary file for CPU tensors, pinned host
memory for CUDA ones), written once and read back once: memory flat in N at any budget but ``min``, at the price of
that traffic (1.2 MB a step for ConvNet-128).

``first-order`` is an APPROXIMATION (TESLA-style): it keeps lam fixed (drops the ``- lr h_w`` update, i.e. the
second-order coupling between steps), so it skips the Hessian product in w. Its gradients differ from the exact
ones when N > 1 (equal at N = 1). It says so in its name, docstring and a one-time warning.

Backends (``haba_fast.backend``'s vocabulary; ``select_backend("trajectory_match", ...)`` decides):

* ``cpu``: the C++ ops (csrc/trajectory.cpp) for the ConvNet family (``cpp_spec(model)`` not None, norm
  instancenorm / groupnorm / layernorm / none), float32/float64, CPU or CUDA tensors: the whole unroll in one op
  (``trajectory_match``) for a stored X, or its per-step halves (``trajectory_step_grad`` /
  ``trajectory_step_adjoint``) for streamed batches. Analytic forward-over-reverse Hessian-vector products, fused
  CPU loops. With budget 0 a stored X runs the whole-unroll op; with a budget both run the per-step halves, kept
  steps through ``trajectory_step_grad_keep`` / ``trajectory_step_adjoint_kept``;
* ``torch``: autograd on ``haba_fast.models.functional_forward``, any ``nn.Module``; honours the memory budget.

With ``backend`` None/``auto`` the engine takes ``cpu`` wherever it can run, at any budget and on CPU or CUDA
tensors; it spends the budget itself, in about a third of the torch step's bytes per kept step (98 against 283 MB
for ConvNet-128 at batch 100). On CPUs it is the faster backend at every budget (bench/results/MEMORY_BUDGET.md).
On GPUs the two have been measured only on different cards, each as a ratio to naive on its own card
(docs/RESULTS.md): the C++ op at budget 0 (every step recomputed) took 0.45x naive at bpc 10 / batch 100 and 1.19x
at bpc 50 / batch 500 on an H100, the torch step with every step kept 1.07x and 1.13x on an H200; keeping its
steps spares the C++ op the primal convolutions, 2 of its 12 per block and step, which should take it below the
torch step at both sizes. ``bench/run_iteration.sh`` on a GPU times both at ``auto`` side by side to settle it.
``backend="torch"`` / ``"cpu"`` force one.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from haba_fast import ops
from haba_fast._ext import buffer_cache_retain, buffer_cache_scope
from haba_fast.backend import OpInputs, register_check, requested_backend, select_backend
from haba_fast.dist import BatchReducer
from haba_fast.engines.base import (
    as_lr_tensor,
    check_engine_batch,
    check_engine_inputs,
    check_engine_values,
)
from haba_fast.engines.graphs import StepGraphs
from haba_fast.engines.memory import MINIMAL, Budget, budget_bytes, checkpoint_every, keep_last, parse_memory_budget
from haba_fast.engines.offload import OFFLOAD_WITH_MIN, OffloadedRows
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


def _cpu_engine_reasons(inp: OpInputs) -> list[str]:
    reasons = []
    if inp.extra.get("distributed"):
        reasons.append("the C++ op has no per-step all-reduce (a multi-process run uses the torch engine)")
    model = inp.extra.get("model")
    if model is not None and cpp_spec(model) is None:
        reasons.append(
            f"{type(model).__name__} is not a ConvNet the C++ engine implements (instance/group/layer/no norm)"
        )
    return reasons


register_check("trajectory_match", "cpu", _cpu_engine_reasons)


# ----------------------------------------------------------------------------------------------------------------------
# Where step t's batch comes from: a stored X [N, B, C, H, W], or a callable that rebuilds it (streamed).


class _TensorBatches:
    """Steps read from a stored ``X [N, B, C, H, W]``; dL/dX is written into one [N, ...] tensor."""

    def __init__(self, X: Tensor, Y: Tensor):
        self.X, self.Y = X, Y
        self.n_steps = int(X.shape[0])
        self.dX: Tensor | None = None

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        return self.X[t].detach(), self.Y[t]

    def push(self, t: int, x_graph: Tensor, dx: Tensor) -> None:
        if self.dX is None:
            self.dX = torch.zeros_like(self.X)
        self.dX[t] = dx


class _StreamedBatches:
    """Steps rebuilt by ``make_inputs(t) -> (X_t [B, C, H, W], Y_t [B])`` (differentiable in ``params``).

    The forward sweep builds each batch without a graph; the backward sweep rebuilds it with one and pushes dL/dX_t
    into ``params`` at once, so neither X nor the generate/augment graph of all N steps ever exists.
    ``values_checked``: ``make_inputs`` runs under ``haba_fast.ops.values_checked()`` (its caller checked the
    values the ops would read back from the device, once).
    """

    def __init__(
        self,
        make_inputs: Callable[[int], tuple[Tensor, Tensor]],
        n_steps: int,
        params: tuple[Tensor, ...],
        values_checked: bool = False,
    ):
        self.make_inputs = make_inputs
        self.n_steps = int(n_steps)
        self.params = params
        self.values_checked = values_checked
        self.grads: list[Tensor | None] = [None] * len(params)

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        with ops.values_checked() if self.values_checked else contextlib.nullcontext():
            x, y = self.make_inputs(t)
        if x.dim() != 4 or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"make_inputs({t}) must return X_t [B, C, H, W] and Y_t [B], got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return x, y

    def push(self, t: int, x_graph: Tensor, dx: Tensor) -> None:
        if not x_graph.requires_grad:
            return
        wanted = [p for p in self.params if p.requires_grad]
        got = iter(torch.autograd.grad(x_graph, wanted, dx, allow_unused=True))
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                continue
            g = next(got)
            if g is not None:
                self.grads[i] = g if self.grads[i] is None else self.grads[i] + g


# ----------------------------------------------------------------------------------------------------------------------
# One step's math: the forward sweep's gradient g_t, and the backward sweep's (<g_t, lam>, h_w, h_x).


class _TorchStep:
    """Autograd on ``functional_forward`` (any nn.Module). Can keep a step's graph for the backward sweep."""

    can_keep = True

    def __init__(self, model: nn.Module):
        self.model = model

    def keep(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The forward sweep's g_t, and what a kept step stores: its create-graph graph (autograd's saved tensors)."""
        graph = self.graph(w, x, y)
        return graph[2].detach(), graph

    @staticmethod
    def kept_sizes(kept) -> list[int]:
        """Byte sizes of a kept step's storages outside autograd's saved tensors (none: the graph is all saved
        tensors)."""
        return []

    def graph(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w leaf, x leaf, g with its create-graph graph): what a kept step stores."""
        with torch.enable_grad():
            wl = w.detach().requires_grad_(True)  # shares w's storage: the trajectory never writes a w_t again
            xl = x.detach().requires_grad_(True)
            ce = F.cross_entropy(functional_forward(self.model, wl, xl), y)
            (g,) = torch.autograd.grad(ce, wl, create_graph=True)
        return wl, xl, g

    def grad(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            wl = w.detach().requires_grad_(True)
            ce = F.cross_entropy(functional_forward(self.model, wl, x.detach()), y)
            (g,) = torch.autograd.grad(ce, wl)
        return g

    def adjoint(self, kept, w: Tensor, x: Tensor, y: Tensor, lam: Tensor, want_hw: bool, want_hx: bool):
        wl, xl, g = kept if kept is not None else self.graph(w, x, y)
        inputs = ([wl] if want_hw else []) + ([xl] if want_hx else [])
        with torch.enable_grad():
            hs = torch.autograd.grad(g, inputs, grad_outputs=lam, allow_unused=True) if inputs else ()
        g_dot_lam = torch.dot(g.detach(), lam)
        hw = hs[0] if want_hw else None
        hx = hs[-1] if want_hx else None
        if want_hw and hw is None:
            hw = torch.zeros_like(lam)
        if want_hx and hx is None:
            hx = torch.zeros_like(x)
        return g_dot_lam, hw, hx


class _CppStep:
    """The C++ op's per-step halves (``trajectory_step_grad`` / ``trajectory_step_adjoint``).

    A kept step runs ``trajectory_step_grad_keep`` in the forward sweep (g_t and, per block, the conv output, the
    block output and the gradient w.r.t. the block input: 3 x depth tensors) and ``trajectory_step_adjoint_kept``
    in the backward sweep, which reuses them instead of recomputing the primal convolutions (same results).
    """

    can_keep = True

    def __init__(self, spec: list[int], check_values: bool = True):
        self.spec = spec
        self.check_values = check_values  # False: the ops skip their value checks (a device sync each on CUDA)

    def grad(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return torch.ops.haba_fast.trajectory_step_grad(w, x.detach(), y, self.spec, self.check_values)

    def keep(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        g, kept = torch.ops.haba_fast.trajectory_step_grad_keep(w, x.detach(), y, self.spec, self.check_values)
        return g, tuple(kept)

    @staticmethod
    def kept_sizes(kept) -> list[int]:
        """Byte sizes of the distinct storages of a kept step's tensors."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept if t.numel()}
        return [int(n) for n in storages.values()]

    def adjoint(self, kept, w: Tensor, x: Tensor, y: Tensor, lam: Tensor, want_hw: bool, want_hx: bool):
        if kept is None:
            g_dot_lam, hw, hx = torch.ops.haba_fast.trajectory_step_adjoint(w, x.detach(), y, lam, self.spec, want_hw)
        else:
            g_dot_lam, hw, hx = torch.ops.haba_fast.trajectory_step_adjoint_kept(
                w, x.detach(), y, lam, list(kept), self.spec, want_hw
            )
        return g_dot_lam, (hw if want_hw else None), hx


class _GraphedCppStep(_CppStep):
    """The C++ op's per-step halves replayed from CUDA graphs (:mod:`haba_fast.engines.graphs`): the same kernels
    on the same values, so the same results, without the ops' value checks (a capture cannot read back)."""

    def __init__(self, spec: list[int], graphs: StepGraphs):
        super().__init__(spec, check_values=False)
        self.graphs = graphs

    def _run(self, name: str, fn, inputs, *options) -> list[Tensor]:
        return self.graphs.run(name, fn, inputs, (tuple(self.spec),) + options)

    def grad(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        def fn(w, x, y):
            return [torch.ops.haba_fast.trajectory_step_grad(w, x, y, self.spec, False)]

        return self._run("trajectory_step_grad", fn, [w, x, y])[0]

    def keep(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        def fn(w, x, y):
            g, kept = torch.ops.haba_fast.trajectory_step_grad_keep(w, x, y, self.spec, False)
            return [g, *kept]

        g, *kept = self._run("trajectory_step_grad_keep", fn, [w, x, y])
        return g, tuple(kept)

    def adjoint(self, kept, w: Tensor, x: Tensor, y: Tensor, lam: Tensor, want_hw: bool, want_hx: bool):
        if kept is None:

            def fn(w, x, y, lam):
                return list(torch.ops.haba_fast.trajectory_step_adjoint(w, x, y, lam, self.spec, want_hw))

            out = self._run("trajectory_step_adjoint", fn, [w, x, y, lam], want_hw)
        else:

            def fn(w, x, y, lam, *kept):
                kept = list(kept)
                return list(torch.ops.haba_fast.trajectory_step_adjoint_kept(w, x, y, lam, kept, self.spec, want_hw))

            out = self._run("trajectory_step_adjoint_kept", fn, [w, x, y, lam, *kept], want_hw)
        g_dot_lam, hw, hx = out
        return g_dot_lam, (hw if want_hw else None), hx


# torch.compile's backend for compiled steps (the tests set "aot_eager": the same traced graphs, no code generated).
COMPILE_BACKEND = "inductor"
_COMPILE_NEEDS_TORCH = "compile_step compiles the torch backend's step; it cannot run with backend {!r}"
_GRAPHS_NEED_CPP = "cuda_graphs replays the C++ op's steps (backend cpu); it cannot run with backend {!r}"
_GRAPHS_WITH_COMPILE = (
    "cuda_graphs replays the C++ op's steps and compile_step compiles the torch backend's step: choose one"
)


def check_compile_step_budget(budget: Budget, name: str = "compile_step") -> None:
    """A compiled step keeps no step: ValueError (naming the option as ``name``) unless the parsed ``budget`` is 0 or
    ``min``. The engine's check, and ``DistillConfig.validate``'s for ``--compile-step``."""
    if parse_memory_budget(budget) not in (0, MINIMAL):
        raise ValueError(
            f"{name} recomputes every step (a compiled step keeps no graph): it takes --memory-budget 0 or min, got "
            f"{budget!r}"
        )


class _CompiledStep:
    """The torch step's math as two pure ``torch.func`` functions, each compiled once with ``torch.compile``
    (``compile_step=True``: Triton kernels on CUDA, C++ on a CPU, the elementwise work between the convolutions
    fused):

        forward sweep:  g = grad_w CE(f(w, x), y)
        backward sweep: jvp(w -> grad_{w,x} CE(f(w, x), y), w, lam) -> primal (g, .), tangent (H_ww lam, H_xw lam)

    i.e. forward-over-reverse, as the C++ op computes it; ``<g, lam>`` from the primal. Any ``nn.Module`` that
    ``torch.func`` and ``torch.compile`` take (through ``functional_forward``). It keeps no step: each backward step
    recomputes its primal inside the compiled call, so the engine's budget must be 0 or ``min``.

    Args:
        model: the student architecture.
        compiler: ``torch.compile``'s backend (``inductor``; the tests also use ``aot_eager``, which traces the same
            graphs without generating code).
    """

    can_keep = False

    def __init__(self, model: nn.Module, compiler: str = "inductor"):
        self.model = model

        def loss(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_forward(model, w, x), y)

        def grad(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return torch.func.grad(loss)(w, x, y)

        def adjoint(w: Tensor, x: Tensor, y: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            def grads(w_: Tensor):  # x is held fixed: the tangent runs along lam in w only
                return torch.func.grad(loss, argnums=(0, 1))(w_, x, y)

            (g, _), (hw, hx) = torch.func.jvp(grads, (w,), (lam,))
            return torch.dot(g, lam), hw, hx

        self._grad = torch.compile(grad, backend=compiler, fullgraph=True, dynamic=False)
        self._adjoint = torch.compile(adjoint, backend=compiler, fullgraph=True, dynamic=False)

    @staticmethod
    def _run(fn, *args: Tensor):
        try:
            return fn(*args)
        except Exception as exc:  # dynamo / inductor failures: say what happened and which option to drop
            if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            if "RecompileLimit" in type(exc).__name__ or "recompile limit" in str(exc).lower():
                raise RuntimeError(
                    "compile_step: dynamo's recompile limit is reached in this process (each new input shape, dtype "
                    "or student architecture compiles the step again); raise torch._dynamo.config.recompile_limit "
                    "or run without compile_step"
                ) from exc
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise RuntimeError(
                f"compile_step: torch.compile failed ({type(exc).__name__}: {first}); run without compile_step"
            ) from exc

    def grad(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self._run(self._grad, w.detach(), x.detach(), y)

    def adjoint(self, kept, w: Tensor, x: Tensor, y: Tensor, lam: Tensor, want_hw: bool, want_hx: bool):
        g_dot_lam, hw, hx = self._run(self._adjoint, w.detach(), x.detach(), y, lam.detach())
        return g_dot_lam, (hw if want_hw else None), (hx if want_hx else None)


def _saved_sizes(fn, exclude: set[int]):
    """Run ``fn()`` and list the byte sizes of the distinct storages autograd saves for backward (not in
    ``exclude``)."""
    seen: set[int] = set()
    sizes: list[int] = []

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen and key not in exclude:
            seen.add(key)
            sizes.append(int(st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


# ----------------------------------------------------------------------------------------------------------------------
# The unroll and its adjoint, for any batch source and step implementation.


def _forward_grad(run: "_Run", t: int, w: Tensor) -> Tensor:
    """Step t's gradient g_t at ``w`` as the forward sweep takes it (batch without a graph, then the grad hooks)."""
    with torch.no_grad():
        x, y = run.source.batch(t)
    g = run.step.grad(w, x, y)
    for hook in run.grad_hooks:
        g = hook(g)
    return g


class _AllWeights:
    """The weight trajectory stored whole: w_0 .. w_N, each its own [P] tensor, never written after it is made.

    Separate tensors, not the rows of one [N+1, P] tensor: a kept torch step's graph then saves w_t itself (a leaf
    sharing its storage) instead of a copy, which writing the next row in place would otherwise force (rows share
    their base's version counter), so kept steps hold no weight vector beyond the trajectory's.
    """

    def __init__(self, run: "_Run", n: int, lr: Tensor):
        self.ws: list[Tensor] = [run.w_start.contiguous()]
        self.n, self.lr = n, lr
        run.stats["stored_weights"] = n + 1

    def current(self, t: int) -> Tensor:
        """The forward sweep's w_t."""
        return self.ws[t]

    def advance(self, t: int, g: Tensor) -> None:
        """w_{t+1} = w_t - lr g_t."""
        if len(self.ws) != t + 1:
            raise RuntimeError(f"the forward sweep is at step {len(self.ws) - 1}, not {t}")
        self.ws.append(torch.sub(self.ws[t], self.lr * g))

    def final(self) -> Tensor:
        return self.ws[self.n]

    def at(self, t: int) -> Tensor:
        """The backward sweep's w_t (t = N-1 down to 0)."""
        return self.ws[t]

    def release(self) -> None:
        """After the backward sweep (the tensors go with the autograd graph; a second backward reuses them)."""


class _OffloadedWeights:
    """The weight trajectory offloaded (``offload_weights``): the forward sweep writes w_0 .. w_{N-1} to an
    :class:`~haba_fast.engines.offload.OffloadedRows` store (a temporary file for CPU tensors, pinned host memory for
    CUDA ones) as it leaves each; the backward sweep reads each back once. Held on the device: the current w_t and
    w_N. The update is ``_AllWeights``'s, so every w_t is the same bit for bit.
    """

    def __init__(self, run: "_Run", n: int, lr: Tensor):
        w0 = run.w_start
        self.store = OffloadedRows(n, w0.numel(), w0.dtype, w0.device)
        self.cur, self.cur_t = w0.contiguous(), 0  # laid out as _AllWeights's w_0: the same strides, the same bits
        self.n, self.lr = n, lr
        run.stats.update(stored_weights=2, offloaded_weights=n, offloaded_bytes=self.store.nbytes)

    def current(self, t: int) -> Tensor:
        if t != self.cur_t:
            raise RuntimeError(f"the forward sweep is at step {self.cur_t}, not {t}")
        return self.cur

    def advance(self, t: int, g: Tensor) -> None:
        self.store.write(t, self.cur)
        self.cur, self.cur_t = torch.sub(self.cur, self.lr * g), t + 1

    def final(self) -> Tensor:
        return self.cur

    def at(self, t: int) -> Tensor:
        return self.store.read(t)

    def release(self) -> None:
        """After the backward sweep. The store (its file or pinned block) lives as long as the autograd graph, as
        the in-memory trajectory does, so a second backward reads it again; dropping the loss frees it."""


class _CheckpointedWeights:
    """The weight trajectory checkpointed (``--memory-budget min``): w_0, w_s, w_2s, ... and w_N are stored
    (s = ``checkpoint_every(N)``); the backward sweep recomputes one segment's w_t at a time from its checkpoint.

    The recomputation runs the forward sweep's ops on the same inputs (``_forward_grad``, then ``w - lr * g``; the
    batches are deterministic), so every w_t is the forward sweep's bit for bit and the gradients are those of the
    whole trajectory. ``run.stats["stored_weights"]``: the most w_t held at once (~2 sqrt(N) + 2).
    """

    def __init__(self, run: "_Run", n: int, lr: Tensor):
        self.run, self.n, self.lr = run, n, lr
        self.every = run.checkpoint_every or checkpoint_every(n)
        self.saved: dict[int, Tensor] = {0: run.w_start.clone()}
        self.cur, self.cur_t = self.saved[0], 0
        self.last: Tensor | None = None
        self.segment: dict[int, Tensor] = {}
        self.peak = 1
        run.stats.update(stored_weights=1, checkpoint_every=self.every)

    def _count(self, *extra: Tensor) -> None:
        held = {w.data_ptr() for w in (*self.saved.values(), *self.segment.values(), *extra) if w is not None}
        held |= {w.data_ptr() for w in (self.cur, self.last) if w is not None}
        self.peak = max(self.peak, len(held))
        self.run.stats["stored_weights"] = self.peak

    def current(self, t: int) -> Tensor:
        if t != self.cur_t:
            raise RuntimeError(f"the forward sweep is at step {self.cur_t}, not {t}")
        return self.cur

    def _next(self, w: Tensor, g: Tensor) -> Tensor:
        return torch.sub(w, self.lr * g)  # the one update both sweeps use

    def advance(self, t: int, g: Tensor) -> None:
        nxt = self._next(self.cur, g)
        self._count(nxt)
        if t + 1 == self.n:
            self.last = nxt
        elif (t + 1) % self.every == 0:
            self.saved[t + 1] = nxt
        self.cur, self.cur_t = nxt, t + 1

    def final(self) -> Tensor:
        return self.last

    def at(self, t: int) -> Tensor:
        if t not in self.segment:
            a = (t // self.every) * self.every
            self.cur = None
            self.segment = {}  # the later segment is consumed (its checkpoint stays: a second backward reuses it)
            w = self.saved[a]
            self.segment[a] = w
            for u in range(a, t):
                w = self._next(w, _forward_grad(self.run, u, w))
                self.segment[u + 1] = w
                self._count()
            self.run.stats["recomputed_weights"] = self.run.stats.get("recomputed_weights", 0) + t - a
        for later in [u for u in self.segment if u > t]:
            del self.segment[later]  # consumed by the step after t
        return self.segment[t]

    def release(self) -> None:
        """After the backward sweep: drop the last segment (recomputable); the checkpoints go with the graph."""
        self.segment, self.cur = {}, None


def _cached_sweeps(run: "_Run") -> bool:
    """Whether the sweeps run the C++ per-step ops on CPU tensors, which draw from the C++ buffer cache."""
    return isinstance(run.step, _CppStep) and run.w_start.device.type == "cpu"


def _sweep_buffers(run: "_Run"):
    """The C++ buffer cache held for a whole sweep of the C++ per-step ops on CPU tensors (their steps allocate the
    same large blocks: a held scope reuses them across steps instead of per op call), else nothing."""
    return buffer_cache_scope() if _cached_sweeps(run) else contextlib.nullcontext()


def _retain_kept_blocks(run: "_Run") -> None:
    """Before the backward sweep of the C++ ops on CPU: let blocks of the kept steps' sizes (one kept step's
    storages x the kept steps) outlive the sweep, so the next unroll's forward sweep takes its kept tensors from
    them instead of faulting in fresh pages -- what PyTorch's CUDA caching allocator does across iterations. Budget
    0 keeps no step and retains nothing (which also hands back what an earlier kept unroll retained, unless a run
    holds the cache: ``engines.memory.RunBuffers``). ``distill()`` hands the blocks back when its run ends."""
    if _cached_sweeps(run):
        buffer_cache_retain(run.kept_block_sizes * int(run.stats.get("stored_steps", 0)))


class _Unroll(torch.autograd.Function):
    """Forward: N SGD steps storing the weight trajectory (every w_t, or checkpoints of it) and, within the budget,
    the last k steps' graphs. Backward: the adjoint recursion (exact, or first-order), recomputing the steps that
    were not kept (and, checkpointed, each segment's w_t).

    Inputs: ``lr``, a holder object (batch source, step, budget, stats), then the tensors differentiated (X, or
    the synthetic parameters the streamed batches are built from).
    """

    @staticmethod
    def forward(ctx, lr: Tensor, run: "_Run", *leaves: Tensor) -> Tensor:
        with _sweep_buffers(run):
            return _Unroll._forward(ctx, lr, run, *leaves)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        _retain_kept_blocks(ctx.run)
        with _sweep_buffers(ctx.run):
            return _Unroll._backward(ctx, grad_loss)

    @staticmethod
    def _forward(ctx, lr: Tensor, run: "_Run", *leaves: Tensor) -> Tensor:
        src, step = run.source, run.step
        n = src.n_steps
        lr_d = lr.detach()
        traj = (_CheckpointedWeights if run.checkpoint else _OffloadedWeights if run.offload else _AllWeights)(
            run, n, lr_d
        )
        kept: dict[int, tuple] = {}
        budget = run.budget
        k = 0
        for t in range(n):
            w = traj.current(t)
            keep_t = step.can_keep and budget != 0 and (t == 0 or t >= n - k)
            if keep_t and t == 0:
                # Measure one step's stored tensors (its batch's graph included), then decide how many fit. w_t is
                # the trajectory's, unless offloaded: then a kept graph holds it on the device, part of the step.
                exclude = {p.untyped_storage().data_ptr() for p in leaves}
                if not run.offload:
                    exclude.add(traj.current(0).untyped_storage().data_ptr())

                def first_step():
                    with torch.enable_grad():
                        x, y = src.batch(0)
                    return step.keep(traj.current(0), x, y), x, y

                ((g, graph), x, y), sizes = _saved_sizes(first_step, exclude)
                sizes += step.kept_sizes(graph)
                per_step = sum(sizes)
                k = keep_last(n, per_step, budget)
                run.stats.update(per_step_bytes=per_step, stored_steps=k)
                run.kept_block_sizes = sizes
                if n - k == 0:
                    kept[0] = (graph, x, y)
                del graph, x
                for hook in run.grad_hooks:
                    g = hook(g)
            elif keep_t:
                with torch.enable_grad():
                    x, y = src.batch(t)
                g, graph = step.keep(w, x, y)
                kept[t] = (graph, x, y)
                del graph
                for hook in run.grad_hooks:
                    g = hook(g)
            else:
                g = _forward_grad(run, t, w)
            traj.advance(t, g)
            del w, g
        run.stats.setdefault("stored_steps", 0)
        run.stats["recomputed_steps"] = n - len(kept)
        denom = (run.w_start - run.w_target).pow(2).sum()
        # The backward sweep reads w_start (as w_0) and w_target again: an in-place change in between is an error,
        # as autograd makes it for the tensors naive's graph saves.
        ctx.snapshot_versions = (run.w_start._version, run.w_target._version)
        ctx.run, ctx.traj, ctx.kept = run, traj, kept
        ctx.save_for_backward(lr)
        return (traj.final() - run.w_target).pow(2).sum() / denom

    @staticmethod
    def _backward(ctx, grad_loss: Tensor):
        (lr,) = ctx.saved_tensors
        run, traj, kept = ctx.run, ctx.traj, ctx.kept
        src, step = run.source, run.step
        n = src.n_steps
        lr_d = lr.detach()
        need_x = any(ctx.needs_input_grad[2:])
        if (run.w_start._version, run.w_target._version) != ctx.snapshot_versions:
            raise RuntimeError(
                "w_start or w_target was modified in place after the engine's forward pass, which the backward pass "
                "reads; pass a copy (w_start.clone()) if the buffer is reused"
            )
        denom = (run.w_start - run.w_target).pow(2).sum()
        lam = 2.0 * grad_loss * (traj.final() - run.w_target) / denom
        dlr = torch.zeros((), dtype=lr.dtype, device=lr.device)
        want_hw = not run.first_order
        for t in range(n - 1, -1, -1):
            w = traj.at(t)
            entry = kept.pop(t, None)
            if entry is not None:
                graph, x_graph, y = entry  # the step's batch as the forward sweep built it (with its graph)
                x = x_graph
            else:
                graph = None
                with torch.enable_grad() if need_x else torch.no_grad():
                    x_graph, y = src.batch(t)
                x = x_graph
            g_dot_lam, hw, hx = step.adjoint(graph, w, x, y, lam, want_hw, need_x)
            for hook in run.hvp_hooks:
                g_dot_lam, hw, hx = hook(g_dot_lam, hw, hx)
            dlr -= g_dot_lam.to(dlr.dtype)
            if need_x:
                src.push(t, x_graph, -lr_d * hx)
            del graph, x_graph, x, w
            if want_hw:
                lam = lam - lr_d * hw
        ctx.kept = {}
        traj.release()
        if isinstance(src, _TensorBatches):
            leaf_grads = (src.dX,)
        else:
            leaf_grads = tuple(src.grads)
        return ((dlr if ctx.needs_input_grad[0] else None), None) + leaf_grads


class _Run:
    """Everything one unroll needs besides the differentiated tensors (not a tensor: autograd passes it through)."""

    def __init__(
        self,
        source,
        step,
        w_start,
        w_target,
        first_order: bool,
        budget: int | None,
        checkpoint: bool = False,
        offload: bool = False,
    ):
        self.source, self.step = source, step
        self.w_start, self.w_target = w_start, w_target
        self.first_order = first_order
        self.budget = budget  # bytes for kept steps; None = unlimited
        self.checkpoint = checkpoint  # store checkpoints of the weight trajectory (``min``), not every w_t
        self.checkpoint_every: int | None = None  # their spacing; None: ``checkpoint_every(N)``
        self.offload = offload  # store every w_t off the device (``_OffloadedWeights``)
        if checkpoint and budget != 0:
            raise ValueError("a checkpointed weight trajectory keeps no step: its budget must be 0")
        if checkpoint and offload:
            raise ValueError(OFFLOAD_WITH_MIN)
        self.stats: dict = {}
        self.kept_block_sizes: list[int] = []  # byte sizes of one kept step's storages (measured on step 0)
        # Per-step hooks (e.g. a cross-process reduction): g -> g in the forward sweep,
        # (<g, lam>, h_w, h_x) -> same in the backward sweep. Empty by default.
        self.grad_hooks: list = []
        self.hvp_hooks: list = []


def _unroll(run: _Run, lr: Tensor, leaves: tuple[Tensor, ...]) -> Tensor:
    return _Unroll.apply(lr, run, *leaves)


def adjoint_unroll(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    w_start: Tensor,
    w_target: Tensor,
    lr: Tensor,
    *,
    first_order: bool = False,
    memory_budget: Budget = 0,
    reducer: Optional[BatchReducer] = None,
) -> Tensor:
    """The Python adjoint engine on any ``nn.Module`` (no input checks; engines call it after validating).

    Args:
        model: the student architecture (its weights are ignored; ``functional_forward`` uses ``w``).
        X: [N, B, C, H, W] float inputs; Y: [N, B] int64; w_start, w_target: [P] (X's dtype); lr: 0-dim.
        first_order: drop the Hessian term in w (approximation).
        memory_budget: bytes of per-step graphs to keep (``haba_fast.engines.memory``); 0 recomputes every step;
            ``min`` also checkpoints the weight trajectory.
        reducer: data parallelism (``haba_fast.dist.BatchReducer``; None: one process): X, Y are this rank's shard
            of every step's batch (see :func:`_add_reducer_hooks`).

    Returns:
        0-dim loss, differentiable in X and lr.
    """
    budget = budget_bytes(memory_budget, X.device)
    checkpoint = parse_memory_budget(memory_budget) == MINIMAL
    run = _Run(_TensorBatches(X, Y), _TorchStep(model), w_start, w_target, bool(first_order), budget, checkpoint)
    _add_reducer_hooks(run, reducer)
    return _unroll(run, lr, (X,))


def _add_reducer_hooks(run: "_Run", reducer: Optional[BatchReducer]) -> None:
    """Data parallelism through the per-step hooks (nothing on one process).

    Rank r unrolls its shard of every step's batch; its mean cross-entropy is weighted by ``reducer.weight`` (its
    share of the batch), so summing the weighted shard gradients over ranks gives the full batch's gradient. The
    forward sweep sums g_t (every rank then takes the same step); the backward sweep sums the Hessian-vector
    products h_w (every rank keeps the same lambda). ``<g_t, lambda>`` and h_x stay this rank's weighted share: the
    lr's and the synthetic set's gradients are summed over ranks with the rest (``Distiller``).
    """
    if reducer is None or not reducer.active:
        return
    w = reducer.weight
    run.grad_hooks.append(lambda g: reducer.reduce_(g * w))

    def hvp(g_dot_lam, hw, hx):
        return g_dot_lam * w, (None if hw is None else reducer.reduce_(hw * w)), (None if hx is None else hx * w)

    run.hvp_hooks.append(hvp)


# ----------------------------------------------------------------------------------------------------------------------
# Engines.


class AdjointEngine:
    """Base of the two adjoint engines: validation, dtype handling, the backend dispatch and the memory budget.

    Args:
        backend: ``torch`` (the Python implementation, any nn.Module), ``cpu`` (the C++ op; ConvNet family),
            ``auto`` or None (``haba_fast.backend.select_backend``: the C++ op when it can run, else torch;
            None also reads ``$HABA_FAST_BACKEND``, then the deprecated ``$HABA_FAST_ADJOINT``). ``cpp`` /
            ``python`` are deprecated spellings of ``cpu`` / ``torch``.
        memory_budget: bytes of per-step forward-sweep tensors the backward sweep may reuse instead of
            recomputing: ``0`` (default; store only w_t), a size (``"2GB"``), ``"auto"`` or ``"unlimited"``
            (``haba_fast.engines.memory``). Both backends store steps; an automatic choice takes ``cpu`` wherever
            it can run, at any budget (see the module docstring). ``"min"``: keep
            no step and checkpoint the weight trajectory (every ceil(sqrt(N))-th w_t; memory flat in N, one more
            forward gradient per step); both backends, stored or streamed batches.
        offload_weights: keep the weight trajectory off the compute device: every w_t goes to a temporary file
            (CPU tensors) or pinned host memory (CUDA tensors) as the forward sweep leaves it and comes back once in
            the backward sweep (:mod:`haba_fast.engines.offload`), so memory is flat in N at any budget but ``min``
            (which refuses it). The per-step path's results bit for bit; a stored X on the ``cpu`` backend then runs
            the C++ op's per-step halves instead of the whole-unroll op (equal up to float rounding).
        compile_step: run the torch backend's step compiled (:class:`_CompiledStep`: ``torch.func``
            forward-over-reverse under ``torch.compile``, its elementwise work fused; the first call of a run
            compiles, tens of seconds). Takes the torch backend (``backend`` ``cpu`` refuses it) and keeps no step
            (budget 0 or ``min``; offloading works). Gradients equal the other steps' up to float rounding.
        cuda_graphs: replay the C++ op's per-step halves from CUDA graphs (:mod:`haba_fast.engines.graphs`; CUDA
            tensors, the ``cpu`` backend, any budget): each distinct step op runs eagerly once, is captured at its
            second call and replayed from then on, so a step costs the host a few launches instead of 60-230. The
            same results; the steps skip their value checks (the engine checks a stored X once per call; ``stream``
            needs ``values_checked=True``). A stored X at budget 0 then runs the per-step halves instead of the
            whole-unroll op. Not with ``compile_step``, nor with another backend named by ``$HABA_FAST_BACKEND``.
    """

    name = "adjoint"
    approximate = False
    first_order = False

    def __init__(
        self,
        backend: str | None = None,
        memory_budget: Budget = 0,
        offload_weights: bool = False,
        compile_step: bool = False,
        cuda_graphs: bool = False,
    ):
        # a clear ValueError for an unknown name now
        asked = requested_backend(backend) if backend is not None else None
        self.backend = backend
        self.memory_budget = parse_memory_budget(memory_budget)
        self.checkpoint = self.memory_budget == MINIMAL  # checkpoint the weight trajectory
        self.offload_weights = bool(offload_weights)
        if self.checkpoint and self.offload_weights:
            raise ValueError(OFFLOAD_WITH_MIN)
        self.compile_step = bool(compile_step)
        if self.compile_step:
            if asked not in (None, "auto", "torch"):
                raise ValueError(_COMPILE_NEEDS_TORCH.format(asked))
            check_compile_step_budget(self.memory_budget)
        self._compiled: _CompiledStep | None = None  # the last model's compiled step (a run has one student)
        if cuda_graphs:
            if self.compile_step:
                raise ValueError(_GRAPHS_WITH_COMPILE)
            if asked not in (None, "auto", "cpu"):
                raise ValueError(_GRAPHS_NEED_CPP.format(asked))
        # cuda_graphs: the captured step ops, kept across calls (a run's iterations replay them); .captures /
        # .replays count them since the engine was made; tests swap in another capture
        self.step_graphs: StepGraphs | None = StepGraphs() if cuda_graphs else None
        self.last_backend: str | None = None  # which implementation the last call used ("cpu" | "torch")
        # The last call's budget bookkeeping: memory_device ("cpu" | "cuda": where the budget's bytes are),
        # memory_budget_bytes (None = unlimited), per_step_bytes (measured on
        # step 0; 0 when nothing is stored), stored_steps, recomputed_steps, stored_weights (the most w_t held at
        # once: N + 1, ~2 sqrt(N) + 2 with ``min``, 2 offloaded), with ``min`` checkpoint_every and
        # recomputed_weights, offloaded: offloaded_weights and offloaded_bytes.
        self.last_stats: dict = {}

    @property
    def cuda_graphs(self) -> bool:
        """Whether the C++ op's steps are replayed from CUDA graphs (``step_graphs`` holds them)."""
        return self.step_graphs is not None

    def _select(self, model: nn.Module, device: torch.device, dtype: torch.dtype, *, distributed: bool = False) -> str:
        if self.compile_step:  # a torch-backend step ($HABA_FAST_BACKEND may still name another)
            asked = requested_backend(self.backend, legacy_env="HABA_FAST_ADJOINT")
            if asked not in ("auto", "torch"):
                raise ValueError(_COMPILE_NEEDS_TORCH.format(asked))
            return "torch"
        if self.step_graphs is not None:  # graphs replay the C++ op's steps: $HABA_FAST_BACKEND may not name another
            asked = requested_backend(self.backend, legacy_env="HABA_FAST_ADJOINT")
            if asked not in ("auto", "cpu"):
                raise ValueError(_GRAPHS_NEED_CPP.format(asked))
            self.step_graphs.check_device(device)
        return select_backend(
            "trajectory_match",
            OpInputs(device, dtype, extra={"model": model, "distributed": distributed}),
            "cpu" if self.step_graphs is not None else self.backend,
            legacy_env="HABA_FAST_ADJOINT",
        )

    def _step(self, name: str, model: nn.Module, check_values: bool = True):
        """The per-step implementation of backend ``name``. A compiled step is kept for the next call with the same
        model, which then runs its compiled code without tracing again. ``check_values=False``: the C++ op's steps
        skip their per-step value checks (the torch steps have none)."""
        if name == "cpu" and self.step_graphs is not None:
            return _GraphedCppStep(cpp_spec(model), self.step_graphs)
        if name == "cpu":
            return _CppStep(cpp_spec(model), check_values)
        if not self.compile_step:
            return _TorchStep(model)
        if self._compiled is None or self._compiled.model is not model:
            self._compiled = _CompiledStep(model, COMPILE_BACKEND)
        return self._compiled

    def _record(self, run: "_Run | None", budget: int | None, n_steps: int, device: torch.device) -> None:
        stats = {
            "memory_device": device.type,  # where the budget's bytes are: host memory or the GPU's
            "memory_budget_bytes": budget,
            "per_step_bytes": 0,
            "stored_steps": 0,
            "recomputed_steps": n_steps,
            "stored_weights": n_steps + 1,
        }
        if run is not None:  # the run's own dict: the backward sweep adds to it (checkpointed w_t)
            for key, value in stats.items():
                run.stats.setdefault(key, value)
            stats = run.stats
        self.last_stats = stats

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
                shard of every step's batch. An active reducer runs the torch implementation (the C++ op has no
                per-step all-reduce).

        Returns:
            0-dim loss ``||w_N - w*||^2 / ||w_start - w*||^2`` in X's dtype.

        Raises:
            BackendUnavailableError: a backend forced by name cannot run these inputs.
        """
        lr = as_lr_tensor(lr, X)
        check_engine_inputs(model, X, Y, w_start, w_target, lr)
        check_engine_values(Y, w_start, w_target, lr, X.device)
        check_engine_batch(model, X, Y)
        ws = w_start.detach().to(X.dtype)
        wt = w_target.detach().to(X.dtype)
        lr_x = lr.to(X.dtype)
        distributed = reducer is not None and reducer.active
        name = self._select(model, X.device, X.dtype, distributed=distributed)
        self.last_backend = name
        budget = budget_bytes(self.memory_budget, X.device)
        whole = not (self.checkpoint or self.offload_weights or self.cuda_graphs)
        if name == "cpu" and budget == 0 and whole:
            self._record(None, 0, int(X.shape[0]), X.device)
            try:
                return torch.ops.haba_fast.trajectory_match(X, Y, ws, wt, lr_x, cpp_spec(model), self.first_order)
            except RuntimeError as exc:  # the op's checks: bad input the checks above did not catch
                raise ValueError(str(exc).split("\n")[0]) from exc
        step = self._step(name, model)
        run = _Run(_TensorBatches(X, Y), step, ws, wt, self.first_order, budget, self.checkpoint, self.offload_weights)
        _add_reducer_hooks(run, reducer)
        out = _unroll(run, lr_x, (X,))
        self._record(run, budget, int(X.shape[0]), X.device)
        return out

    def stream(
        self,
        model: nn.Module,
        make_inputs: Callable[[int], tuple[Tensor, Tensor]],
        n_steps: int,
        params: Sequence[Tensor],
        w_start: Tensor,
        w_target: Tensor,
        lr: Tensor,
        *,
        values_checked: bool = False,
    ) -> Tensor:
        """The matching loss with each step's batch built on demand: memory flat in N.

        Args:
            model: the student architecture.
            make_inputs: ``t -> (X_t [B, C, H, W] float, Y_t [B] int64)``; deterministic (called without a graph in
                the forward sweep and again with one in the backward sweep), differentiable in ``params``.
            n_steps: N >= 1.
            params: the tensors X_t depends on (the synthetic set's parameters); autograd gives them the gradients.
            w_start, w_target: [P] constants; lr: 0-dim (differentiable).
            values_checked: the caller vouches that every step's labels lie in [0, the model's classes) and that the
                values ``make_inputs``'s ops would check (indices, augmentation parameters) were checked
                (``haba_fast.objectives.mtt.check_plan``). Then no step reads a value back from the device (on CUDA,
                a sync each): ``make_inputs`` runs under ``haba_fast.ops.values_checked()`` and the C++ op's steps
                skip their value checks. w_start, w_target, lr and the first batch are still checked here, once; a
                step whose inputs or weights turn non-finite is not stopped, and the loss comes out NaN or Inf (the
                ``Distiller``'s guarded update refuses it).

        Returns:
            0-dim loss, differentiable in ``params`` and ``lr``; equal to ``self(model, X, Y, ...)`` with
            ``X = stack([make_inputs(t)[0] for t in range(N)])``.
        """
        n_steps = int(n_steps)
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if self.step_graphs is not None and not values_checked:
            raise ValueError(
                "cuda_graphs replays steps without their value checks (a capture cannot read values back): stream "
                "batches whose values the caller checked once (values_checked=True, after "
                "haba_fast.objectives.mtt.check_plan), or run without cuda_graphs"
            )
        params = tuple(params)
        source = _StreamedBatches(make_inputs, n_steps, params, values_checked)
        with torch.no_grad():
            x0, y0 = source.batch(0)
        lr = as_lr_tensor(lr, x0)
        check_engine_inputs(model, x0[None], y0[None], w_start, w_target, lr)
        check_engine_values(y0, w_start, w_target, lr, x0.device)
        check_engine_batch(model, x0, y0)
        ws = w_start.detach().to(x0.dtype)
        wt = w_target.detach().to(x0.dtype)
        name = self._select(model, x0.device, x0.dtype)
        self.last_backend = name
        budget = budget_bytes(self.memory_budget, x0.device)
        step = self._step(name, model, check_values=not values_checked)
        run = _Run(source, step, ws, wt, self.first_order, budget, self.checkpoint, self.offload_weights)
        del x0, y0
        out = _unroll(run, lr.to(ws.dtype), params)
        self._record(run, budget, n_steps, ws.device)
        return out

    def __repr__(self) -> str:
        offload = ", offload_weights=True" if self.offload_weights else ""
        compiled = ", compile_step=True" if self.compile_step else ""
        graphs = ", cuda_graphs=True" if self.cuda_graphs else ""
        return (
            f"{type(self).__name__}(backend={self.backend!r}, memory_budget={self.memory_budget!r}{offload}{compiled}"
            f"{graphs})"
        )


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


def get_adjoint_engine(
    name: str,
    backend: str | None = None,
    memory_budget: Budget = 0,
    offload_weights: bool = False,
    compile_step: bool = False,
    cuda_graphs: bool = False,
) -> AdjointEngine:
    """The adjoint engine ``exact`` or ``first-order`` (``first_order`` is accepted too).

    Args:
        name: engine name.
        backend: ``torch`` | ``cpu`` | ``auto`` | None (see :class:`AdjointEngine`).
        memory_budget: ``0`` | a size | ``auto`` | ``unlimited`` | ``min`` (see :mod:`haba_fast.engines.memory`).
        offload_weights: store the weight trajectory off the device (see :class:`AdjointEngine`).
        compile_step: the torch backend's step compiled with ``torch.compile`` (see :class:`AdjointEngine`).
        cuda_graphs: the C++ op's steps replayed from CUDA graphs (see :class:`AdjointEngine`).

    Raises:
        ValueError: unknown name or backend, ``min`` with ``offload_weights``, or ``compile_step`` with a budget
            other than 0 and ``min``.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key == "exact":
        return ExactEngine(backend, memory_budget, offload_weights, compile_step, cuda_graphs)
    if key == "first-order":
        return FirstOrderEngine(backend, memory_budget, offload_weights, compile_step, cuda_graphs)
    raise ValueError(f"unknown adjoint engine {name!r}: choose one of {', '.join(ADJOINT_ENGINES)}")
