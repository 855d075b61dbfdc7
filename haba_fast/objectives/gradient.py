"""Gradient matching: DC (Zhao et al., ICLR 2021) and DSA (Zhao & Bilen, ICML 2021), for any parameterization.

One synthetic update (one ``Distiller.step``) is one step of DC's outer loop:

1. at the first outer step a fresh randomly initialized network is drawn (``cfg.model``);
2. per class c, a real batch of that class (``batch_real``) and the class's synthetic batch (every stored row;
   HaBa: every basis through every hallucinator, see :mod:`haba_fast.objectives.base`); DSA: one augmentation
   per class, the same on both batches (:func:`~haba_fast.objectives.base.siamese_augment`);
3. the weight gradients of the mean cross-entropy on each batch (synthetic side: soft cross-entropy on soft
   labels), ``g_real`` detached, ``g_syn`` with a graph;
4. loss = sum over classes and layers of DC's layer-wise distance (:func:`layer_distance`; ``--dis_metric
   ours``, the default), or of ``mse`` / ``cos`` over all layers' gradients concatenated (:func:`match_distance`);
5. after the synthetic update (``after_update``), unless it was the last outer step, the network trains
   ``inner_loop`` epochs on the (detached) synthetic set: SGD lr ``lr_net``, no momentum, batch ``batch_train``,
   DSA on its batches for DSA (per-sample draws).

So the public code's iteration (a fresh network, ``outer_loop`` synthetic updates) is ``outer_loop`` iterations
here. Defaults: ``get_loops(ipc)`` of the public code (:func:`get_loops`), ``lr_img`` 0.1, momentum 0.5,
``lr_net`` 0.01; DC distils and evaluates without augmentation, DSA with.

Speed: per-class gradients can be computed for all classes at once with ``torch.func.vmap`` over
``torch.func.grad`` (one batched forward/backward per side instead of K) or with the public code's loop over
classes. ``batched="auto"`` (the default) vmaps the synthetic side (tiny per-class batches and a double backward:
the loop's per-call overhead dominates) and, on a CPU, loops over the real side (``batch_real`` images per class
already fill a call; vmap's grouped convolutions measured about 2x slower there); on CUDA both sides are vmapped.
``True`` / ``False``: vmap / loop on both sides. Measured on a 2-core CPU (bench/results/OBJECTIVE.md): ``auto``
1.2x faster than the loop in 3 of 4 DC/DSA configurations, vmap on both sides 2x slower.

Networks whose vmapped double backward torch gets wrong (:func:`vmap_unsafe_modules`): ``auto`` loops over the
synthetic side for them, and ``True`` is a ValueError. Cause (torch 2.13, functorch's ``BatchRulesNorm.cpp``): under
``vmap`` the batching rule of ``native_layer_norm_backward`` forms the weight gradient as
``sum((x - mean) * rstd * grad_out)`` from the forward's saved ``mean`` / ``rstd``, and autograd never
differentiates those outputs (derivatives.yaml: ``native_layer_norm``'s formula reads only ``grad``, the gradient
of its first output), so the derivative of the affine weight's gradient with respect to the input drops every term
through the statistics; the batch-norm rule does the same with its batch statistics. The value and the first-order
gradients are right; the second-order terms of the norm weights' gradients are not. Measured in float64 (vmap vs
loop, gradient of the matching loss wrt the synthetic images; a central finite difference agrees with the loop to
1e-8): ConvNetLN 0.7-4% off; a conv -> norm -> tanh probe (every parameter weighted): ``LayerNorm`` (affine) 1-10%,
``InstanceNorm2d(affine=True)`` 3%, ``BatchNorm2d`` with batch statistics 4%; exact (1e-15): ``GroupNorm`` (the
models' instancenorm and groupnorm; its derivative does read the statistics' gradients), ``LayerNorm`` /
``InstanceNorm2d`` without affine, ``BatchNorm2d`` in eval mode, ``RMSNorm``, and every other network of
:mod:`haba_fast.models` that DC accepts. DC's default ``ours`` distance gives 1-D parameters 0, so there only
weights of 2+ dims (ConvNetLN's LayerNorm ``[C, H, W]``) are hit; ``mse`` / ``cos`` see every affine weight. The
check is by module type: a custom module calling ``F.layer_norm`` / ``F.batch_norm`` / ``F.instance_norm`` with a
weight is not detected.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from haba_fast.objectives.base import (
    Objective,
    ObjectiveOutput,
    ObjectiveSetup,
    RealSampler,
    fresh_network,
    register_objective,
    siamese_augment,
    synthetic_classes,
)

__all__ = [
    "DIS_METRICS",
    "LOOPS",
    "get_loops",
    "layer_distance",
    "match_distance",
    "vmap_unsafe_modules",
    "class_gradients",
    "gradient_match_loss",
    "GradientMatching",
    "DSAGradientMatching",
]

# (outer_loop, inner_loop) per images-per-class, as the public code's get_loops.
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}

# The public code's --dis_metric choices (utils.match_loss); see match_distance.
DIS_METRICS = ("ours", "mse", "cos")


def get_loops(ipc: int) -> Tuple[int, int]:
    """DC's (outer_loop, inner_loop) for ``ipc`` images per class (ValueError where the public code has none)."""
    if ipc not in LOOPS:
        raise ValueError(
            f"DC defines outer/inner loops only for IPC {', '.join(map(str, LOOPS))}, not {ipc}; "
            "give --outer-loop and --inner-loop"
        )
    return LOOPS[ipc]


def layer_distance(g_real: Tensor, g_syn: Tensor, batch_dims: int = 0) -> Tensor:
    """DC's distance ('ours') between two gradients of one parameter (0-dim, summed over any batch dims).

    The parameter's gradient is viewed as rows: conv ``[out, in, k, k]`` and 3-D ``[C, h, w]`` as ``[out, -1]``,
    linear ``[out, in]`` as it is; the distance is ``sum_rows (1 - <a, b> / (|a| |b| + 1e-6))``. Biases and other
    1-D parameters contribute 0 (as in the public code).

    Args:
        g_real, g_syn: gradients of one parameter, ``[*batch, *param_shape]`` with ``batch_dims`` leading dims.
        batch_dims: leading dims to sum over (e.g. 1 for per-class gradients ``[K, *param_shape]``).
    """
    shape = g_real.shape[batch_dims:]
    if len(shape) == 1:
        return g_real.new_zeros(())
    if len(shape) > 4 or len(shape) == 0:
        raise ValueError(f"layer_distance: unsupported parameter shape {tuple(shape)}")
    a = g_real.reshape(*g_real.shape[:batch_dims], shape[0], -1)
    b = g_syn.reshape(*g_syn.shape[:batch_dims], shape[0], -1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
    return (1.0 - cos).sum()


def match_distance(
    grads_real: Sequence[Tensor], grads_syn: Sequence[Tensor], batch_dims: int = 0, metric: str = "ours"
) -> Tensor:
    """DC's ``match_loss(gw_syn, gw_real)`` for ``--dis_metric`` ``metric`` (0-dim, summed over any batch dims).

    ``ours``: the sum of :func:`layer_distance` over the parameters. ``mse`` and ``cos``: every parameter's gradient
    flattened and concatenated into one vector ``r`` (real) and ``s`` (synthetic) per batch entry (per class), then
    ``mse = sum((s - r)**2)`` and ``cos = 1 - <r, s> / (|r| |s| + 1e-6)``, summed over the batch entries (the public
    code calls ``match_loss`` once per class and adds the results).

    Args:
        grads_real, grads_syn: one gradient per parameter, ``[*batch, *param_shape]`` with ``batch_dims`` leading
            dims (e.g. 1 for per-class gradients ``[K, *param_shape]``), the same shapes on both sides.
        batch_dims: leading dims that index separate matchings (summed over).
        metric: ``"ours"`` | ``"mse"`` | ``"cos"``.
    """
    if metric not in DIS_METRICS:
        raise ValueError(f"match_distance: unknown metric {metric!r}: choose one of {', '.join(DIS_METRICS)}")
    if len(grads_real) != len(grads_syn):
        raise ValueError(f"match_distance: {len(grads_real)} real gradients but {len(grads_syn)} synthetic ones")
    if not grads_real:
        raise ValueError("match_distance: no gradients to match")
    if metric == "ours":
        total = None
        for gr, gs in zip(grads_real, grads_syn):
            d = layer_distance(gr, gs, batch_dims)
            total = d if total is None else total + d
        return total
    r = torch.cat([g.reshape(*g.shape[:batch_dims], -1) for g in grads_real], dim=-1)  # [*batch, P]
    s = torch.cat([g.reshape(*g.shape[:batch_dims], -1) for g in grads_syn], dim=-1)
    if metric == "mse":
        return ((s - r) ** 2).sum()
    return (1.0 - (r * s).sum(-1) / (r.norm(dim=-1) * s.norm(dim=-1) + 1e-6)).sum()


def vmap_unsafe_modules(net: nn.Module) -> List[str]:
    """The modules of ``net`` through which ``torch.func.vmap`` gives a wrong double backward (module docstring).

    Affine ``LayerNorm``, and affine batch / instance norms that normalize with the batch's statistics (train mode,
    or no running statistics). Returns ``"name (Type)"`` per module, empty when vmap is safe.
    """
    bad = []
    for name, m in net.named_modules():
        if isinstance(m, nn.LayerNorm):
            wrong = m.weight is not None
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm
            wrong = bool(m.affine) and (m.training or not m.track_running_stats)
        else:
            continue
        if wrong:
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
    return bad


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    from haba_fast.training import soft_cross_entropy

    return soft_cross_entropy(logits, target)


def class_gradients(net: nn.Module, x: Tensor, target: Tensor, *, create_graph: bool, batched: bool = True):
    """Per-class weight gradients of the mean (soft) cross-entropy.

    Args:
        net: the network (its current parameters are the point of evaluation; they get no gradient).
        x: ``[K, n, C, H, W]``, one batch per class.
        target: ``[K, n]`` int64 classes or ``[K, n, K']`` soft targets.
        create_graph: keep the graph (synthetic side: differentiable in ``x`` and ``target``).
        batched: one ``vmap`` over the classes; False: a loop over classes with ``torch.autograd.grad``.

    Returns:
        list over ``net.parameters()`` of ``[K, *param_shape]`` gradients.

    Raises:
        ValueError: ``batched`` and ``create_graph`` for a network with :func:`vmap_unsafe_modules` (its double
            backward would be wrong; use ``batched=False``).
    """
    names = [n for n, _ in net.named_parameters()]
    if batched and create_graph:
        bad = vmap_unsafe_modules(net)
        if bad:
            raise ValueError(
                f"class_gradients: torch.func.vmap gives a wrong double backward through {', '.join(bad)} (torch's "
                "batching rule drops the dependence of the norm's saved statistics on the input); use batched=False "
                "(gradient_match_loss: batched='auto' or False)"
            )
    if batched:
        params = {n: p.detach() for n, p in net.named_parameters()}

        def loss(p: Dict[str, Tensor], xb: Tensor, tb: Tensor) -> Tensor:
            return _ce(torch.func.functional_call(net, p, (xb,)), tb)

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
        out = [grads[n] for n in names]
        return out if create_graph else [g.detach() for g in out]
    params = list(net.parameters())
    per_class: List[Tuple[Tensor, ...]] = []
    for c in range(x.shape[0]):
        lc = _ce(net(x[c]), target[c])
        per_class.append(torch.autograd.grad(lc, params, create_graph=create_graph))
    out = [torch.stack([g[i] for g in per_class]) for i in range(len(params))]
    return out if create_graph else [g.detach() for g in out]


def gradient_match_loss(
    net: nn.Module,
    real: Tensor,
    real_y: Tensor,
    syn: Tensor,
    syn_target: Tensor,
    *,
    batched="auto",
    metric: str = "ours",
) -> Tensor:
    """DC's loss: ``sum_c match_distance(grad(CE(net(real_c))), grad(CE(net(syn_c))), metric)`` (0-dim).

    Args:
        real: ``[K, R, C, H, W]`` real batches; real_y: ``[K, R]`` int64.
        syn: ``[K, S, C, H, W]`` synthetic batches (differentiable); syn_target: ``[K, S]`` int64 or soft ``[K, S, K]``.
        batched: ``"auto"`` | True | False (see the module docstring; True is a ValueError for a network with
            :func:`vmap_unsafe_modules`, where ``"auto"`` loops over the synthetic side).
        metric: DC's ``--dis_metric``: ``"ours"`` | ``"mse"`` | ``"cos"`` (:func:`match_distance`).
    """
    if batched not in ("auto", True, False):
        raise ValueError(f"batched must be 'auto', True or False, got {batched!r}")
    if metric not in DIS_METRICS:  # before any gradient is computed
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(DIS_METRICS)}")
    real_batched = (real.device.type == "cuda") if batched == "auto" else batched
    syn_batched = not vmap_unsafe_modules(net) if batched == "auto" else batched
    g_real = class_gradients(net, real.detach(), real_y, create_graph=False, batched=real_batched)
    g_syn = class_gradients(net, syn, syn_target, create_graph=True, batched=syn_batched)
    return match_distance(g_real, g_syn, batch_dims=1, metric=metric)


@register_objective
class GradientMatching(Objective):
    """DC: gradient matching without augmentation (see the module docstring)."""

    name = "dc"
    siamese = False
    momentum = 0.5
    # The public code's main.py: lr_img 0.1 (momentum 0.5), noise init, 20 evaluation networks; DC evaluates without
    # augmentation, 300 epochs. It runs --Iteration 1000 iterations of outer_loop updates each and evaluates every
    # 500 from iteration 0. The hallucinators' rate is ours (the HaBa paper gives none for DC): 0.002. A rate too
    # high throws them far in the first updates, where they freeze, and their gradient grows with the IPC: on
    # Fashion-MNIST 0.1 (the default until 2026-12-05) collapsed one seed in three at IPC 10 and 0.01 lost 8 points
    # at IPC 50; 0.002 was within 0.43 points of the best rate tried at IPC 10, 20 and 50 on the validation split,
    # and over five seeds at IPC 10 it beat 0.01 with DSA and tied it with DC (docs/RESULTS.md, "The hallucinators'
    # rate"); the table's protocols name their own rate.
    defaults = {"lr_img": 0.1, "lr_style": 0.002, "dsa": False, "epoch_eval_train": 300, "pix_init": "noise",
                "num_eval": 20}
    reference_schedule = (1000, 500)
    batched = "auto"  # per-class gradients: see the module docstring

    @staticmethod
    def loops(cfg) -> Tuple[int, int]:
        """``(outer_loop, inner_loop)``: the config's, else DC's for its IPC (ValueError where DC has none)."""
        if cfg.outer_loop is not None and cfg.inner_loop is not None:
            return int(cfg.outer_loop), int(cfg.inner_loop)
        outer, inner = get_loops(int(cfg.budget_ipc or cfg.ipc))
        return (int(cfg.outer_loop) if cfg.outer_loop is not None else outer,
                int(cfg.inner_loop) if cfg.inner_loop is not None else inner)

    @classmethod
    def updates_per_iteration(cls, cfg) -> int:
        """main.py's iteration: ``outer_loop`` synthetic updates on one fresh network."""
        return cls.loops(cfg)[0]

    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        cfg = self.cfg
        self.outer_loop, self.inner_loop = self.loops(cfg)
        self.metric = str(cfg.dis_metric)  # validated by DistillConfig (and by gradient_match_loss)
        self.strategy = setup.strategy if self.siamese else None
        self.real = RealSampler(setup.dataset, self.device)
        self.dataset = setup.dataset
        self.net: Optional[nn.Module] = None
        self.outer = 0  # outer-loop step of the current network

    def describe(self) -> str:
        aug = ""
        if self.strategy:
            aug = (", DSA strategy none (no augmentation)" if self.strategy.lower() == "none"
                   else f", Siamese DSA {self.strategy}")
        metric = "" if self.metric == "ours" else f", gradient distance {self.metric} (all layers concatenated)"
        return (
            f"objective {self.name}: gradient matching, outer loop {self.outer_loop}, inner loop {self.inner_loop}, "
            f"lr_net {self.cfg.lr_net:g}{metric}{aug}"
        )

    def loss(self, syn: nn.Module, lr: Tensor) -> ObjectiveOutput:
        if self.net is None or self.outer == 0:
            self.net = fresh_network(self.cfg, self.dataset, self.generator, self.device, what=self.name)
        x_syn, y_syn, soft = synthetic_classes(syn)
        real = self.real.sample(int(self.cfg.batch_real), self.generator)
        K, R = real.shape[:2]
        real_y = torch.arange(K, device=real.device).repeat_interleave(R).reshape(K, R)
        real, x_syn, _ = siamese_augment(real, x_syn, self.strategy, self.generator)
        target = y_syn if soft is None else soft
        loss = gradient_match_loss(self.net, real, real_y, x_syn, target, batched=self.batched, metric=self.metric)
        return ObjectiveOutput(loss, {"outer_step": float(self.outer)})

    def after_update(self, syn: nn.Module) -> None:
        if self.outer >= self.outer_loop - 1:  # the last outer step: the next iteration draws a fresh network
            self.outer = 0
            self.net = None
            return
        from haba_fast.training import train_network

        with torch.no_grad():
            x, y, soft = synthetic_classes(syn)
        target = y if soft is None else soft
        x = x.detach().reshape(-1, *x.shape[2:])
        target = target.detach().reshape(x.shape[0], *target.shape[2:])  # [N] or soft [N, K]
        train_network(
            self.net,
            x,
            target,
            epochs=self.inner_loop,
            lr=float(self.cfg.lr_net),
            batch_size=int(self.cfg.batch_train),
            momentum=0.0,
            dsa=self.strategy is not None,
            dsa_strategy=self.strategy or "none",
            generator=self.generator,
            device=self.device,
        )
        self.outer += 1

    def state_dict(self) -> Dict[str, Any]:
        net = None if self.net is None else {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {"outer": self.outer, "net": net}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.outer = int(state["outer"])
        if state.get("net") is None:
            self.net = None
            return
        from haba_fast.models import get_network

        ds = self.dataset
        g = torch.Generator().manual_seed(0)  # placeholder weights (overwritten); never the global RNG
        self.net = get_network(
            self.cfg.model, ds.channels, ds.num_classes, tuple(ds.im_size), generator=g, device=self.device
        )
        self.net.load_state_dict(state["net"])
        self.net.train()


@register_objective
class DSAGradientMatching(GradientMatching):
    """DSA: gradient matching with Siamese augmentation (one draw per class per step, same on real and synthetic)."""

    name = "dsa"
    siamese = True
    # The public code's main.py with --method DSA: lr_img 0.1, momentum 0.5; evaluation with DSA, 1000 epochs.
    defaults = {**GradientMatching.defaults, "dsa": True, "epoch_eval_train": 1000}

    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        if self.strategy is None:
            raise ValueError(
                "objective dsa needs an augmentation strategy (--dsa True, no --no_aug); "
                "without augmentation use --objective dc"
            )
