"""Trajectory matching (MTT) for the ``Pixels`` and ``HaBa`` parameterizations: the ``mtt`` objective.

The adjoint engines (``exact``, ``first-order``) get each step's batch from :func:`step_inputs` on demand
(``engine.stream``): generate (bases × the step's hallucinator; for Pixels, a gather of images) then DSA with the
step's own parameters, all fixed by the step plan, so rebuilding a batch in the backward sweep gives the same
batch. Its gradient goes to the bases/hallucinators step by step; neither X [N, B, C, H, W] nor the
generate/augment graph of N steps is held, so memory does not grow with N. The ``naive`` engine (and soft labels)
take all N steps' inputs from ONE batched call (:func:`build_inputs`); autograd carries dL/dX back through
augment ∘ generate.
"""

from __future__ import annotations

import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from haba_fast.engines.base import Engine, model_num_classes
from haba_fast.objectives.base import Objective, ObjectiveOutput, ObjectiveSetup, register_objective
from haba_fast.plan import StepPlan, aug_to

__all__ = [
    "is_haba",
    "synthetic_labels",
    "synthetic_samples",
    "augment_groups",
    "build_inputs",
    "step_inputs",
    "check_plan",
    "trajectory_loss",
    "soft_label_trajectory_loss",
    "TrajectoryMatching",
]


def is_haba(syn: nn.Module) -> bool:
    """True for a factorized (HaBa) synthetic set, False for plain images (Pixels)."""
    return hasattr(syn, "hallucinator_parameters") and hasattr(syn, "bases")


def synthetic_labels(syn: nn.Module) -> Tensor:
    """Labels of the flat class-major rows: HaBa's bases or Pixels' images, [M] int64."""
    labels = syn.base_labels if is_haba(syn) else syn.labels
    return labels.long()


def synthetic_samples(syn: nn.Module, base_idx: Tensor, hall_idx: Optional[Tensor] = None) -> Tensor:
    """Samples [n, C, H, W] for rows ``base_idx`` [n] (and per-sample hallucinators ``hall_idx`` [n] for HaBa)."""
    if is_haba(syn):
        if hall_idx is None:
            raise ValueError("a HaBa synthetic set needs hall_idx (one hallucinator per sample)")
        device = syn.bases.device
        return syn.generate(base_idx.to(device), hall_idx.to(device))
    return syn.images[base_idx.to(syn.images.device)]


def _family_key(params: Any) -> Tuple[str, ...]:
    if isinstance(params, (list, tuple)):
        return tuple(p.family for p in params)
    return (params.family,)


def _cat(params_list: Sequence[Any]) -> Any:
    from haba_fast.augment import AugParams

    first = params_list[0]
    if isinstance(first, (list, tuple)):  # "M" mode: one chain per step; concatenate position by position
        return [AugParams.cat([p[i] for p in params_list]) for i in range(len(first))]
    return AugParams.cat(list(params_list))


def augment_groups(x: Tensor, params_per_group: Sequence[Any], group_size: int) -> Tensor:
    """Augment consecutive groups of ``group_size`` rows of ``x``, each with its own parameters.

    In "S" mode each group (an unrolled step) has one family; groups with the same family chain are
    concatenated and augmented in one call (at most one call per family), then put back in order.

    Args:
        x: [G * group_size, C, H, W].
        params_per_group: G AugParams (or G lists of AugParams for "M" mode), each for group_size samples.
        group_size: rows per group.

    Returns:
        [G * group_size, C, H, W], differentiable in x.
    """
    from haba_fast import augment

    G = len(params_per_group)
    if x.shape[0] != G * group_size:
        raise ValueError(f"augment_groups: x has {x.shape[0]} rows, expected {G} groups × {group_size}")
    params_per_group = [aug_to(p, x.device) for p in params_per_group]
    keys = [_family_key(p) for p in params_per_group]
    order: Dict[Tuple[str, ...], List[int]] = {}
    for g, k in enumerate(keys):
        order.setdefault(k, []).append(g)
    if len(order) == 1:
        return augment.apply(x, _cat(params_per_group))
    xs = x.reshape(G, group_size, *x.shape[1:])
    pieces, placed = [], []
    for groups in order.values():
        idx = torch.tensor(groups, device=x.device)
        sub = xs.index_select(0, idx).reshape(len(groups) * group_size, *x.shape[1:])
        pieces.append(augment.apply(sub, _cat([params_per_group[g] for g in groups])))
        placed.extend(groups)
    out = torch.cat(pieces).reshape(G, group_size, *x.shape[1:])
    inverse = torch.empty(G, dtype=torch.long)
    inverse[torch.tensor(placed)] = torch.arange(G)
    return out.index_select(0, inverse.to(x.device)).reshape_as(x)


def build_inputs(syn: nn.Module, plan: StepPlan) -> Tuple[Tensor, Tensor]:
    """All N steps' synthetic inputs in one batched generate + augment.

    Args:
        syn: a ``HaBa`` or ``Pixels`` synthetic set.
        plan: the iteration's StepPlan (base_idx [N, B], hall_idx [N], per-step aug).

    Returns:
        X [N, B, C, H, W] (differentiable in syn's parameters) and Y [N, B] int64.
    """
    N, B = plan.base_idx.shape
    flat_idx = plan.base_idx.reshape(-1)
    hall = plan.hall_idx.repeat_interleave(B) if is_haba(syn) else None
    x = synthetic_samples(syn, flat_idx, hall)
    if plan.aug is not None:
        x = augment_groups(x, plan.aug, B)
    labels = synthetic_labels(syn)
    Y = labels[flat_idx.to(labels.device)].reshape(N, B).to(x.device)
    return x.reshape(N, B, *x.shape[1:]), Y


def step_inputs(syn: nn.Module, plan: StepPlan, t: int) -> Tuple[Tensor, Tensor]:
    """Step ``t``'s synthetic batch: the t-th [B, C, H, W] slice of :func:`build_inputs`, built on its own.

    Returns:
        X_t [B, C, H, W] (differentiable in syn's parameters) and Y_t [B] int64.
    """
    idx = plan.base_idx[t]
    hall = plan.hall_idx[t].expand(idx.shape[0]) if is_haba(syn) else None
    x = synthetic_samples(syn, idx, hall)
    if plan.aug is not None:
        x = augment_groups(x, [plan.aug[t]], idx.shape[0])
    labels = synthetic_labels(syn)
    return x, labels[idx.to(labels.device)].to(x.device)


def check_plan(syn: nn.Module, plan: StepPlan, num_classes: Optional[int]) -> None:
    """The values of a step plan that building its batches would check on the device, checked once per iteration:
    the rows ``base_idx`` [N, B] in [0, the synthetic set's bases or images), the hallucinators ``hall_idx`` [N] in
    [0, Hn) (HaBa; Pixels never reads them), finite augmentation parameters (on the host, where the plan is drawn),
    and the synthetic set's labels in [0, ``num_classes``) (None: not checked; read where the labels live, one read).
    Then :func:`step_inputs` can run under ``haba_fast.ops.values_checked()`` and read nothing back from a GPU.
    ValueError naming what is wrong.
    """
    from haba_fast import ops

    base_idx = plan.base_idx.reshape(-1)
    if is_haba(syn):
        hall_idx = plan.hall_idx.reshape(-1)
        ops.check_index_bounds(base_idx, hall_idx, int(syn.num_bases), int(syn.n_hallucinators), "step plan")
    else:
        ops.check_index_bounds(base_idx, None, int(syn.images.shape[0]), 0, "step plan")
    if plan.aug:  # every step's parameters in one call: one host read
        chains = [chain if isinstance(chain, (list, tuple)) else [chain] for chain in plan.aug]
        ops.check_augment_params([p for chain in chains for p in chain], "step plan")
    labels = synthetic_labels(syn)
    if num_classes is not None and labels.numel():
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"the synthetic set's labels lie in [{lo}, {hi}] but the student has {num_classes} classes"
            )


def trajectory_loss(
    engine: Engine,
    model: nn.Module,
    syn: nn.Module,
    plan: StepPlan,
    w_start: Tensor,
    w_target: Tensor,
    lr: Tensor,
    *,
    shard: bool = True,
) -> Tensor:
    """The MTT loss of one iteration: ``||w_N - w*||^2 / ||w_start - w*||^2`` (0-dim).

    Differentiable in the synthetic set's parameters (bases/hallucinators or images) and in ``lr``. Engines with a
    ``stream`` method build each step's batch on demand (memory flat in N); the others get X [N, B, C, H, W].

    On several processes (``haba_fast.dist``) every rank builds the same X and unrolls its shard of every step's
    batch; the loss is the same on every rank, the gradients of X (and so of the synthetic set) and of ``lr`` are
    this rank's share, to be summed over ranks (``Distiller`` does). ``shard=False``: this rank unrolls the whole
    batch (trajectory-parallel mode: the ranks match different segments).

    Streamed, the plan's values are checked once per iteration (:func:`check_plan`; the labels against the student's
    classes when it states them as an int ``num_classes``: the C++ engine's ConvNets do, and the torch step, which
    runs any other model, never checked labels per step) and no step reads a value back from the device
    (``engine.stream(..., values_checked=True)``): weights that turn non-finite during the unroll give a NaN or Inf
    loss, which the ``Distiller``'s guarded update refuses, rather than an error at that step.
    """
    from haba_fast.dist import BatchReducer, world_size

    sharded = shard and world_size() > 1
    device = next(iter(syn.parameters())).device
    streamed = hasattr(engine, "stream") and not sharded
    if streamed:  # on the host, before the move: the steps then read no value back from the device
        check_plan(syn, plan, model_num_classes(model))
    plan = plan.to(device)  # once: the steps' batches then copy nothing from the host
    if streamed:
        params = [p for p in syn.parameters() if p.requires_grad]
        return engine.stream(
            model,
            lambda t: step_inputs(syn, plan, t),
            plan.num_steps,
            params,
            w_start.to(device),
            w_target.to(device),
            lr,
            values_checked=True,
        )
    X, Y = build_inputs(syn, plan)
    reducer = BatchReducer(X.shape[1]) if shard else BatchReducer.single(X.shape[1])
    X, Y = reducer.shard(X, Y)
    return engine(model, X, Y, w_start.to(device), w_target.to(device), lr, reducer=reducer)


def soft_label_trajectory_loss(
    model: nn.Module, syn: nn.Module, plan: StepPlan, w_start: Tensor, w_target: Tensor, lr: Tensor
) -> Tensor:
    """MTT's loss with the student trained on SOFT labels (create-graph unroll; memory grows with N).

    As the naive engine, with each step's loss the soft cross-entropy against ``softmax(label_logits)`` of the
    step's rows: differentiable in the synthetic set, the label logits and ``lr``. The engines of
    ``haba_fast.engines`` take hard labels only, so soft labels always unroll this way.
    """
    from haba_fast.engines.base import normalized_distance
    from haba_fast.models import functional_forward
    from haba_fast.training import soft_cross_entropy

    X, _ = build_inputs(syn, plan)
    probs = syn.label_targets()
    P = probs[plan.base_idx.reshape(-1).to(probs.device)].reshape(*plan.base_idx.shape, -1).to(X.device)
    denom = normalized_distance(w_start, w_target).to(X.device)
    w = w_start.detach().to(X.device, X.dtype).requires_grad_(True)
    for t in range(X.shape[0]):
        (g,) = torch.autograd.grad(soft_cross_entropy(functional_forward(model, w, X[t]), P[t]), w, create_graph=True)
        w = w - lr * g
    return (w - w_target.detach().to(w)).pow(2).sum() / denom.to(w.dtype)


@register_objective
class TrajectoryMatching(Objective):
    """MTT: match expert trajectories with a learned lr (the HaBa reference's objective).

    Per iteration: an expert trajectory and start epoch from the buffer, the iteration's step plan (which also
    holds the adversarial term's draws), and the engine's loss ``||w_N - w*||^2 / ||w_start - w*||^2``.
    """

    name = "mtt"
    needs_buffer = True
    learns_lr = True
    normalized_loss = True
    momentum = 0.95  # the HaBa reference: SGD momentum 0.95 for bases and hallucinators

    @classmethod
    def momenta(cls, cfg) -> Tuple[float, float]:
        """HaBa's distill_fac.py: 0.95 (bases, hallucinators) and 0.9 (lr); MTT's distill.py (pixels): 0.5 and 0.5."""
        return (0.95, 0.9) if cfg.parameterization == "haba" else (0.5, 0.5)
    defaults: Dict[str, Any] = {}

    def __init__(self, setup: ObjectiveSetup):
        super().__init__(setup)
        from haba_fast import models
        from haba_fast.engines import get_engine

        cfg = self.cfg
        self.buffer = setup.buffer
        if self.buffer is None:
            raise ValueError(
                "objective mtt needs an expert buffer (train one with `haba-fast buffer`, pass --buffer_path); "
                "the dc, dsa and dm objectives need none"
            )
        self.stream = setup.stream
        self.strategy = setup.strategy
        self.haba = cfg.parameterization == "haba"
        self.im_size = tuple(setup.dataset.im_size)
        ds = setup.dataset
        self._check_buffer(ds)
        # The student: only its structure is used (the engine replaces its weights by w_start).
        self.student = models.get_network(
            cfg.model, ds.channels, ds.num_classes, self.im_size, generator=self.generator, device=self.device
        )
        P = models.num_params(self.student)
        w0 = self.buffer.snapshot(0, 0)
        if w0.numel() != P:
            raise ValueError(
                f"the expert buffer holds {w0.numel()} parameters per snapshot but a {cfg.model} for "
                f"{ds.channels}×{self.im_size[0]}×{self.im_size[1]} images with {ds.num_classes} classes has {P}; "
                "was the buffer trained for another model or dataset?"
            )
        self.engine = get_engine(
            cfg.engine,
            memory_budget=getattr(cfg, "memory_budget", 0),
            offload_weights=bool(getattr(cfg, "offload_weights", False)),
            compile_step=bool(getattr(cfg, "compile_step", False)),
            cuda_graphs=bool(getattr(cfg, "cuda_graphs", False)),
        )
        from haba_fast.experts import TrajectorySampler

        self.trajectories = TrajectorySampler(
            self.buffer,
            load_all=cfg.load_all,
            max_files=cfg.max_files,
            max_experts=cfg.max_experts,
            generator=self.generator,
        )

    def state_dict(self) -> Dict[str, Any]:
        return {"trajectories": self.trajectories.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "trajectories" in state:  # checkpoints written before the reference's trajectory walk lack it
            self.trajectories.load_state_dict(state["trajectories"])

    def describe(self) -> str:
        if self.cfg.soft_labels:
            return "objective mtt: soft labels, create-graph unroll (the engines take hard labels only)"
        approx = " (an approximation)" if getattr(self.engine, "approximate", False) else ""
        m = self.cfg.trajectories_per_iteration
        segments = (
            f"; {m} expert segments per iteration, mean loss (trajectory-parallel: NOT the reference's algorithm, "
            "which matches one)"
            if m > 1
            else ""
        )
        memory = ""
        budget = getattr(self.engine, "memory_budget", 0)
        if budget != 0:
            memory += f", memory budget {self.cfg.memory_budget}"
        if getattr(self.engine, "offload_weights", False):
            cuda = torch.device(self.device).type == "cuda"
            where = "pinned host memory" if cuda else f"a temporary file in {tempfile.gettempdir()}"
            memory += f", weight trajectory offloaded to {where}"
        if getattr(self.engine, "compile_step", False):
            memory += ", step compiled with torch.compile (the first iteration compiles)"
        if getattr(self.engine, "cuda_graphs", False):
            memory += ", steps replayed from CUDA graphs (each step op captured at its second call)"
        return f"objective mtt: engine {self.engine.name}{approx}{memory}{segments}"

    def _check_buffer(self, dataset) -> None:
        n = int(self.buffer.num_trajectories)
        if n < 1:
            raise ValueError("the expert buffer holds no trajectories; train experts with `haba-fast buffer`")
        header = getattr(self.buffer, "header", None)  # our format records what the experts were trained on
        if header is not None:
            wanted = {"dataset": getattr(dataset, "name", None), "zca": getattr(dataset, "zca", None) is not None,
                      "model": self.cfg.model}
            differ = [f"{k} {header[k]!r} (this run: {v!r})" for k, v in wanted.items()
                      if k in header and header[k] is not None and v is not None and header[k] != v]
            from haba_fast.data import zca_of_normalized

            if zca_of_normalized(dataset) and header.get("zca") and header.get("zca_input") != "normalized":
                differ.append("ZCA of [0, 1] pixels (a buffer from before 2026-12-03; this run whitens the "
                              "normalized images, as the reference does for MNIST / FashionMNIST: retrain it)")
            if differ:
                raise ValueError(
                    f"the expert buffer {getattr(self.buffer, 'path', '')} was trained with {', '.join(differ)}: its "
                    "trajectories are not this run's to match (pass the buffer's --dataset/--zca/--model, or train "
                    "experts for this run with `haba-fast buffer`)"
                )
        epochs = getattr(self.buffer, "num_epochs", None)
        if epochs is not None:
            need = self.cfg.max_start_epoch - 1 + self.cfg.expert_epochs
            if need > int(epochs):
                raise ValueError(
                    f"--max_start_epoch {self.cfg.max_start_epoch} + --expert_epochs {self.cfg.expert_epochs} needs "
                    f"snapshots up to epoch {need}, but the buffer's experts trained {epochs} epochs; lower them or "
                    "train longer experts"
                )

    def sample_trajectory(self) -> Tuple[int, int, Tensor, Tensor]:
        """(trajectory, start epoch, w_start [P], w_target [P]) drawn from the run's generator.

        The trajectory is the reference's choice (:class:`haba_fast.experts.TrajectorySampler`: ``load_all``,
        ``max_files``, ``max_experts``)."""
        traj = self.trajectories.next()
        start = int(torch.randint(int(self.cfg.max_start_epoch), (1,), generator=self.generator))
        w_start = self.buffer.snapshot(traj, start).to(self.device, torch.float32)
        w_target = self.buffer.snapshot(traj, start + self.cfg.expert_epochs).to(self.device, torch.float32)
        return traj, start, w_start, w_target

    def sample_plan(self) -> StepPlan:
        from haba_fast.plan import sample_plan

        return sample_plan(
            self.stream,
            self.cfg.syn_steps,
            self.cfg.n_hallucinators if self.haba else 1,
            self.im_size,
            strategy=self.strategy,
            adversarial=self.haba,
            generator=self.generator,
        )

    def loss(self, syn: nn.Module, lr: Tensor) -> ObjectiveOutput:
        if self.cfg.trajectories_per_iteration > 1:
            return self._segments_loss(syn, lr)
        traj, start, w_start, w_target = self.sample_trajectory()
        plan = self.sample_plan()
        if getattr(syn, "label_logits", None) is not None:
            loss = soft_label_trajectory_loss(self.student, syn, plan, w_start, w_target, lr)
        else:
            loss = trajectory_loss(self.engine, self.student, syn, plan, w_start, w_target, lr)
        metrics = {"start_epoch": float(start), "trajectory": float(traj)}
        return ObjectiveOutput(loss, metrics, club=plan.club, adversary=plan.adversary)

    def _segments_loss(self, syn: nn.Module, lr: Tensor) -> ObjectiveOutput:
        """``--trajectories-per-iteration M`` (a different algorithm from the reference's): the mean matching loss of
        M expert segments, each with its own plan. Every rank draws all M (the generators stay in step, and the
        draws do not depend on the number of processes); segment m is unrolled whole on rank m mod K. The returned
        loss has the M-mean's value on every rank and this rank's segments' gradient (summed over ranks by the
        Distiller); the club and adversary batches are the first segment's."""
        from haba_fast import dist

        M = self.cfg.trajectories_per_iteration
        draws = [(self.sample_trajectory(), self.sample_plan()) for _ in range(M)]
        local = None
        for m, ((_traj, _start, w_start, w_target), plan) in enumerate(draws):
            if m % dist.world_size() != dist.rank():
                continue
            if getattr(syn, "label_logits", None) is not None:
                term = soft_label_trajectory_loss(self.student, syn, plan, w_start, w_target, lr)
            else:
                term = trajectory_loss(self.engine, self.student, syn, plan, w_start, w_target, lr, shard=False)
            local = term / M if local is None else local + term / M
        total = dist.all_reduce_sum_(local.detach().clone())
        loss = total + (local - local.detach())  # value: the M-mean (exactly); gradient: this rank's segments
        (traj, start, _, _), first = draws[0]
        metrics = {"start_epoch": float(start), "trajectory": float(traj), "segments": float(M)}
        return ObjectiveOutput(loss, metrics, club=first.club, adversary=first.adversary)
