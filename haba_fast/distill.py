"""Distillation: the HaBa / pixel-MTT iteration, the run loop (checkpoints and resume in haba_fast.checkpoint), presets.

One iteration (``Distiller.step``), as the HaBa reference (distill_fac.py) does it:

1. pick an expert trajectory and a start epoch s ∈ [0, max_start_epoch); w_start = snapshot[s],
   w_target = snapshot[s + expert_epochs];
2. draw the iteration's random choices as data (:class:`haba_fast.plan.StepPlan`);
3. run the engine on the N unrolled steps' inputs (the adjoint engines generate + augment each step's batch on
   demand; ``naive`` takes all N from one batched call):
   L = ||w_N − w*||² / ||w_start − w*||²;
4. HaBa: add λ_club · mean((cos(f(x_a), f(x_b)) + 1) / 2) for one batch of bases under two different
   hallucinators (f: the adversary's features);
5. one SGD step on the bases (lr_img), the hallucinators (lr_style), both momentum 0.95, and on the
   learned lr (lr_lr, momentum 0.9, then clipped to ≥ min_lr; or, with ``lr_param="log"``, on log lr);
6. HaBa: one step of the adversary (SGD lr 1e-3, momentum 0.9) on a fresh batch with
   λ_cls·CE + λ_likeli·mean((1 − cos)/2) + λ_contrast·SupCon.

``distill`` runs iterations with a progress bar, evaluates periodically (the reference evaluates in
the last tenth of the run, every ``eval_it`` iterations), and writes checkpoints (``haba_fast.checkpoint``:
our format, the reference's ``images_<it>.pt`` / ``styles_<it>.pt`` / ``syn_lr_<it>.pt``, and the resume
state). A bad iteration (non-finite or exploded loss, non-finite gradients or update) changes nothing and is
skipped (logged to the history and stderr); ``max_bad_steps`` in a row stop the run with a ``DivergenceError``
that names the likely cause, keeping the last good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from haba_fast import dist
from haba_fast.devices import device_memory_bytes, resolve_device
from haba_fast.engines import ENGINES
from haba_fast.engines.memory import RunBuffers
from haba_fast.objectives.base import OBJECTIVES
from haba_fast.plan import IndexStream, StepPlan

__all__ = [
    "PARAMETERIZATIONS",
    "PRESETS",
    "DistillConfig",
    "Distiller",
    "DistillResult",
    "BadStepError",
    "DivergenceError",
    "LR_PARAMS",
    "distill",
    "apply_objective",
    "apply_preset",
    "check_fits",
    "check_out_dir",
    "resolve_device",
]

PARAMETERIZATIONS = ("haba", "pixels")
PIX_INITS = ("real", "noise")
# HaBa's hallucinators at iteration 0: the reference's random init, or near-identity (samples start as their bases).
HALLUCINATOR_INITS = ("reference", "identity")
# How the learned lr is parameterized (see Distiller): "plain" is the reference's; "log" keeps it positive by
# construction (lr = exp(u), SGD on u; --lr_lr is then the step size of log(lr)).
LR_PARAMS = ("plain", "log")

# The reference's CIFAR-10 shell scripts (run_cifar10_ipc{1,10,50}_style5.sh), flag for flag.
_CIFAR10_COMMON = dict(
    dataset="cifar10",
    n_hallucinators=5,
    expert_epochs=2,
    zca=True,
    lr_img=100.0,
    pix_init="real",
    lr_style=100.0,
    lambda_club_content=0.1,
    lambda_contrast_content=0.1,
    lambda_cls_content=1.0,
    lambda_likeli_content=0.1,
    batch_standardize=True,  # HaBa's evaluation (utils.epoch) standardizes every train and test batch
)
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar10-ipc1": dict(_CIFAR10_COMMON, ipc=1, syn_steps=50, max_start_epoch=2, lr_lr=1e-7, lr_teacher=0.01),
    "cifar10-ipc10": dict(_CIFAR10_COMMON, ipc=10, syn_steps=30, max_start_epoch=20, lr_lr=1e-5, lr_teacher=0.001),
    "cifar10-ipc50": dict(_CIFAR10_COMMON, ipc=50, syn_steps=30, max_start_epoch=20, lr_lr=1e-5, lr_teacher=0.01),
}


_DROPPED_FIELDS = ("subset", "pretrained_ckpt", "force_save")

# Every float setting of DistillConfig: (field, flag, must be > 0). Each must be finite and >= 0 (> 0 where marked):
# a NaN lr or weight would train nothing and a negative one climb the loss. A test checks that no float field is
# missing here.
FLOAT_SETTINGS: Tuple[Tuple[str, str, bool], ...] = (
    ("lr_img", "--lr_img", False),
    ("lr_lr", "--lr_lr", False),
    ("lr_teacher", "--lr_teacher", False),
    ("lr_style", "--lr_style", False),
    ("lambda_club_content", "--lambda_club_content", False),
    ("lambda_likeli_content", "--lambda_likeli_content", False),
    ("lambda_cls_content", "--lambda_cls_content", False),
    ("lambda_contrast_content", "--lambda_contrast_content", False),
    ("min_lr", "--min_lr", False),
    ("adversary_lr", "adversary_lr", False),
    ("max_loss", "--max-loss", True),
    ("lr_net", "--lr-net", True),
    ("lr_label", "--lr-label", True),
)


def _mtt(c: "DistillConfig") -> bool:
    return c.objective == "mtt"


def _not_mtt(c: "DistillConfig") -> bool:
    return c.objective != "mtt"


def _adjoint(c: "DistillConfig") -> bool:
    return c.objective == "mtt" and c.engine != "naive" and not c.soft_labels


def _haba(c: "DistillConfig") -> bool:
    return c.parameterization == "haba"


def _gradient_matching(c: "DistillConfig") -> bool:
    return c.objective in ("dc", "dsa")


def _evaluates(c: "DistillConfig") -> bool:
    return bool(eval_iterations(c))


_MTT_BUFFER = "--objective mtt (the others read no expert buffer)"
_MTT_SEGMENT = "--objective mtt (the expert segment matched)"
_MTT_LR = "--objective mtt (the other objectives learn no lr: they train and evaluate with --lr-net)"
_ADJOINT = (
    "--objective mtt with the exact or first-order engine and hard labels (naive and soft labels keep every step's "
    "graph)"
)
_DC_LOOPS = "--objective dc or dsa (the --outer-loop / --inner-loop of gradient matching)"
_HALLUCINATORS = "--parameterization haba (pixel sets have no hallucinators)"
_EVALUATION = "the run's evaluations (--num_eval 0 evaluates nothing)"
_ADVERSARY = "--parameterization haba (the adversarial term; pixel sets have none)"
# Settings that only some configurations read: field -> (the configurations that read it, whether a config is one of
# them; the flag is checkpoint.flag_name(field)), checked against the code that reads each: only MTT
# (haba_fast.objectives.mtt) unrolls a student, reads the buffer and learns an lr (Distiller: opt_lr; the others start
# syn_lr at lr_net and never step it, so lr_lr, lr_teacher, min_lr and lr_param do nothing there) and has a normalized
# loss (max_loss); dc/dsa/dm draw --batch_syn batches only for HaBa's adversarial term; pixel sets have no hallucinators
# and no adversary. DistillConfig.refuse_unused names the first one set where it does nothing: the CLI for every flag
# given explicitly, validate for those whose default means off (_OFF_BY_DEFAULT).
SCOPES: Dict[str, Tuple[str, Callable[["DistillConfig"], bool]]] = {
    "engine": ("--objective mtt (the engine unrolls its student)", _mtt),
    "syn_steps": ("--objective mtt (the student's unrolled steps)", _mtt),
    "expert_epochs": (_MTT_SEGMENT, _mtt),
    "max_start_epoch": (_MTT_SEGMENT, _mtt),
    "buffer_path": (_MTT_BUFFER, _mtt),
    "load_all": (_MTT_BUFFER, _mtt),
    "max_files": (_MTT_BUFFER, _mtt),
    "max_experts": (_MTT_BUFFER, _mtt),
    "trajectories_per_iteration": ("--objective mtt (it matches expert segments)", _mtt),
    "lr_lr": (_MTT_LR, _mtt),
    "lr_teacher": (_MTT_LR, _mtt),
    "min_lr": (_MTT_LR, _mtt),
    "lr_param": (_MTT_LR, _mtt),
    "max_loss": (
        "--objective mtt (only its loss is normalized; the others skip a step only on a non-finite loss)",
        _mtt,
    ),
    "memory_budget": (_ADJOINT, _adjoint),
    "offload_weights": (_ADJOINT, _adjoint),
    "compile_step": (_ADJOINT, _adjoint),
    "cuda_graphs": (_ADJOINT, _adjoint),
    "batch_syn": (
        "--objective mtt, or to the adversarial term of --parameterization haba (--lambda_club_content > 0); dc, "
        "dsa and dm match every synthetic sample at once",
        lambda c: c.objective == "mtt" or (c.parameterization == "haba" and c.lambda_club_content != 0),
    ),
    "lr_net": ("--objective dc, dsa or dm (mtt learns its lr: --lr_teacher, --lr_lr)", _not_mtt),
    "outer_loop": (_DC_LOOPS, _gradient_matching),
    "inner_loop": (_DC_LOOPS, _gradient_matching),
    "dis_metric": ("--objective dc or dsa (the distance between gradients)", _gradient_matching),
    "n_hallucinators": (_HALLUCINATORS, _haba),
    "lr_style": (_HALLUCINATORS, _haba),
    "kernel_size": (_HALLUCINATORS, _haba),
    "hallucinator_init": (_HALLUCINATORS, _haba),
    "single_channel": ("--parameterization haba (its bases; pixel sets store images)", _haba),
    "lambda_club_content": (_ADVERSARY, _haba),
    "lambda_likeli_content": (_ADVERSARY, _haba),
    "lambda_cls_content": (_ADVERSARY, _haba),
    "lambda_contrast_content": (_ADVERSARY, _haba),
    "lr_label": ("--soft-labels (the learned label logits)", lambda c: bool(c.soft_labels)),
    # Ours: read only by the run's evaluations (the reference's own evaluation flags, which its scripts accept and
    # ignore with --num_eval 0, are in commands.distill.reference_no_ops).
    "batch_standardize": (_EVALUATION, _evaluates),
    "eval_models": (_EVALUATION, _evaluates),
}
# SCOPES fields whose default means "off" (no budget, no offload, DC's own loops, one segment): validate refuses them
# set to anything else where nothing reads them, whoever set them.
_OFF_BY_DEFAULT = (
    "outer_loop",
    "inner_loop",
    "trajectories_per_iteration",
    "memory_budget",
    "offload_weights",
    "compile_step",
    "cuda_graphs",
    "dis_metric",
)


class DivergenceError(ValueError):
    """The distillation loss became non-finite or exploded; the run stopped before applying that step."""


class BadStepError(DivergenceError):
    """One iteration's loss or gradients were not finite (or exploded); nothing was updated.

    ``distill`` skips such a step and stops (raising a plain ``DivergenceError``) after ``max_bad_steps`` in a row.
    Attributes: ``reason`` ("loss", "exploded", "gradient" or "update") and ``lr_clamped`` (the learned lr was
    at its floor when the step went bad).
    """

    def __init__(self, message: str, reason: str, lr_clamped: bool = False):
        super().__init__(message)
        self.reason = reason
        self.lr_clamped = lr_clamped


@dataclass
class DistillConfig:
    """Every hyper-parameter of the reference's distill_fac.py (its defaults), plus ours.

    Reference names: ``ipc`` (rows per class: bases per class for HaBa, images per class for Pixels),
    ``n_hallucinators`` (``--n_style``), ``iterations`` (``--Iteration``); the rest keep their spelling.
    """

    # --- the reference's flags (distill_fac.py defaults) ---
    dataset: str = "cifar10"
    model: str = "ConvNet"
    ipc: int = 1
    eval_mode: str = "S"
    num_eval: int = 5
    eval_it: int = 100
    epoch_eval_train: int = 1000
    iterations: int = 15000
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_teacher: float = 0.01
    lr_style: float = 100.0
    batch_syn: Optional[int] = None
    batch_train: int = 256
    pix_init: str = "real"
    hallucinator_init: str = "reference"  # not a reference flag: "identity" (HaBa.init_hallucinators_identity)
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    data_path: Optional[str] = None
    buffer_path: str = "./buffers"
    expert_epochs: int = 3
    syn_steps: int = 64
    max_start_epoch: int = 25
    zca: bool = False
    load_all: bool = False  # the reference's sampling: True draws any trajectory each time; False walks files
    no_aug: bool = False
    max_files: Optional[int] = None  # without load_all: read only this many (randomly chosen) buffer files
    max_experts: Optional[int] = None  # without load_all: keep only the first this many experts of each file
    n_hallucinators: int = 5
    single_channel: bool = False
    lambda_club_content: float = 0.1
    lambda_likeli_content: float = 1.0
    lambda_cls_content: float = 1.0
    lambda_contrast_content: float = 1.0
    # --- ours ---
    parameterization: str = "haba"
    engine: str = "auto"  # auto: the exact engine (haba_fast.engines)
    budget_ipc: Optional[int] = None  # choose ipc (bases per class) so bases + hallucinators fit this many images
    kernel_size: int = 3
    # Floor of the learned lr; None: the reference's (HaBa's distill_fac.py clips at 0.001, MTT's distill.py does
    # not clip). See ``lr_floor``.
    min_lr: Optional[float] = None
    adversary_lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    checkpoint_every: Optional[int] = None  # default: eval_it, at most 100 (the end of the run when eval_it is 0)
    max_loss: float = 1e4  # an MTT matching loss above this counts as exploded (it starts near 1)
    # HaBa's evaluation standardizes every train and test batch; None: on for haba, off for pixels (MTT's does not)
    batch_standardize: Optional[bool] = None
    eval_models: Tuple[str, ...] = ()  # overrides the eval_mode pool when given
    # --- objectives (haba_fast.objectives; apply_objective sets the public code's lr_img etc. for one) ---
    objective: str = "mtt"  # mtt | dc | dsa | dm
    batch_real: int = 256  # DC/DSA/DM: real images per class per matching step (the public code's default)
    lr_net: float = 0.01  # DC/DSA: the matching network's SGD lr; DC/DSA/DM evaluate with it (no learned lr)
    outer_loop: Optional[int] = None  # DC/DSA: synthetic updates per fresh network (None: get_loops(ipc))
    inner_loop: Optional[int] = None  # DC/DSA: network epochs on the synthetic set between them (None: get_loops)
    dis_metric: str = "ours"  # DC/DSA: gradient distance: ours (per output channel), mse or cos (all concatenated)
    soft_labels: bool = False  # learnable label logits per image (Pixels) / per basis (HaBa)
    lr_label: float = 1.0  # SGD lr of the label logits (the objective's momentum)
    max_bad_steps: int = 5  # a non-finite/exploded step is skipped; this many in a row stop the run
    lr_param: str = "plain"  # learned lr: "plain" (the reference: SGD on lr, clamped to >= min_lr) or "log"
    # MTT: expert segments matched per iteration (mean loss); > 1 is trajectory-parallel under torchrun (segment m
    # on rank m mod K). A different algorithm from the reference's one segment per iteration.
    trajectories_per_iteration: int = 1
    # MTT adjoint engines: bytes of per-step tensors kept instead of recomputed ("0" | "2GB" | "auto" | "unlimited";
    # "min": keep none and checkpoint the weight trajectory, memory flat in syn_steps)
    memory_budget: str = "0"
    # MTT adjoint engines: the weight trajectory in a temporary file (CPU) / pinned host memory (CUDA), not in memory
    offload_weights: bool = False
    # MTT adjoint engines: the torch step compiled with torch.compile (for GPUs; budget 0 or min)
    compile_step: bool = False
    # MTT adjoint engines: the C++ op's steps replayed from CUDA graphs (CUDA devices; haba_fast.engines.graphs)
    cuda_graphs: bool = False

    def validate(self) -> "DistillConfig":
        """Raise ValueError naming the first bad value; returns self.

        Normalizes in place: integer fields to ``int`` (a NumPy integer is one), and ``eval_models`` given as a
        comma-separated string (``"ConvNet,MLP"``, as ``EvalConfig.models`` takes it) to a tuple.
        """
        from haba_fast.checkpoint import flag_name

        # Every int field, by its annotation: a float would be truncated by int() (ipc 2.7 runs with 2 and records
        # 2.7) or fail later in range(); a bool or a string is a mistake. None only where the field allows it.
        # Every bool field likewise: a string such as "no" would read as on.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", "Optional[bool]"):
                if not (isinstance(v, bool) or (v is None and f.type == "Optional[bool]")):
                    raise ValueError(f"{flag_name(f.name)} must be True or False, got {v!r}")
                continue
            if f.type not in ("int", "Optional[int]"):
                continue
            if v is None and f.type == "Optional[int]":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{flag_name(f.name)} must be an integer, got {v!r}")
            setattr(self, f.name, int(v))
        if isinstance(self.eval_models, str):  # none named: the eval_mode pool (as the CLI's --eval-models "")
            from haba_fast.evaluate import split_models

            self.eval_models = split_models(self.eval_models)
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {self.parameterization!r}: choose one of {', '.join(PARAMETERIZATIONS)}"
            )
        if self.engine not in ENGINES + ("auto",):
            raise ValueError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)} (or auto)")
        if self.pix_init not in PIX_INITS:
            raise ValueError(f"unknown --pix_init {self.pix_init!r}: choose real or noise")
        from haba_fast.objectives.gradient import DIS_METRICS

        if self.dis_metric not in DIS_METRICS:
            raise ValueError(f"unknown --dis_metric {self.dis_metric!r}: choose one of {', '.join(DIS_METRICS)}")
        if self.hallucinator_init not in HALLUCINATOR_INITS:
            raise ValueError(
                f"unknown --hallucinator-init {self.hallucinator_init!r}: choose {' or '.join(HALLUCINATOR_INITS)}"
            )
        for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "kernel_size", "n_hallucinators"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "num_eval", "eval_it", "epoch_eval_train"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"--batch_syn must be >= 1, got {self.batch_syn}")
        # Checked whether or not this run evaluates (--num_eval 0): the config is recorded with the set.
        if self.batch_train < 1:
            raise ValueError(f"--batch_train must be >= 1, got {self.batch_train}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(
                f"--checkpoint-every must be >= 1, got {self.checkpoint_every} (leave it out for the default: every "
                "--eval_it iterations, or the end of the run)"
            )
        for name in ("max_files", "max_experts"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be >= 1, got {v}")
        if self.load_all and (self.max_files is not None or self.max_experts is not None):
            raise ValueError(
                "--max_files/--max_experts do nothing with --load_all in the reference (it loads every file and "
                "draws any expert); drop --load_all to sample from a subset of the experts"
            )
        if self.eval_models and self.eval_mode != "S":
            raise ValueError("give --eval_mode or --eval-models, not both")
        from haba_fast.models import NETWORK_NAMES

        if self.model not in NETWORK_NAMES:
            raise ValueError(f"unknown --model {self.model!r}; valid names: {', '.join(NETWORK_NAMES)}")
        if not self.eval_models:
            from haba_fast.evaluate import eval_pool

            eval_pool(self.eval_mode, self.model, self.pool_reference)  # a clear error now, not at the first one
        for name in self.eval_models:
            if name not in NETWORK_NAMES:
                raise ValueError(f"unknown --eval-models network {name!r}; valid names: {', '.join(NETWORK_NAMES)}")
        if self.budget_ipc is not None and self.budget_ipc < 1:
            raise ValueError(f"--budget-ipc must be >= 1, got {self.budget_ipc}")
        for name, flag, positive in FLOAT_SETTINGS:
            if getattr(self, name) is None:  # min_lr: the reference's floor
                continue
            v = float(getattr(self, name))
            if name == "max_loss" and v == math.inf:  # no "exploded" guard; a non-finite loss still stops a step
                continue
            if not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise ValueError(f"{flag} must be a finite number {'>' if positive else '>='} 0, got {v}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown --objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        for name in ("outer_loop", "inner_loop"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.batch_real < 1:
            raise ValueError(f"--batch_real must be >= 1, got {self.batch_real}")
        m = self.trajectories_per_iteration  # an int already (the field walk above)
        if m < 1:
            raise ValueError(f"--trajectories-per-iteration must be an int >= 1, got {m!r}")
        if self.soft_labels and self.objective == "mtt" and self.engine in ("exact", "first-order"):
            raise ValueError(
                f"--soft-labels with --objective mtt unrolls the student with create_graph (the {self.engine} engine "
                "takes hard labels only); use --engine naive or auto"
            )
        if self.max_bad_steps < 1:
            raise ValueError(f"--max-bad-steps must be >= 1, got {self.max_bad_steps}")
        from haba_fast.engines.memory import MINIMAL, parse_memory_budget
        from haba_fast.engines.offload import OFFLOAD_WITH_MIN

        try:
            budget = parse_memory_budget(self.memory_budget)
        except ValueError as exc:
            raise ValueError(f"--memory-budget {self.memory_budget}: {exc}") from None
        # Settings whose default means "off": set to anything else where nothing reads them, they are refused here
        # (the CLI refuses every flag of SCOPES given explicitly where it does nothing: refuse_unused).
        defaults = DistillConfig()
        off = [n for n in _OFF_BY_DEFAULT if (budget != 0 if n == "memory_budget" else
                                              getattr(self, n) != getattr(defaults, n))]
        self.refuse_unused(off)
        if self.offload_weights and budget == MINIMAL:
            raise ValueError(OFFLOAD_WITH_MIN)
        if self.cuda_graphs and self.compile_step:
            raise ValueError(
                "--cuda-graphs replays the C++ op's steps and --compile-step compiles the torch step: choose one"
            )
        if self.compile_step:
            from haba_fast.engines.adjoint import check_compile_step_budget

            check_compile_step_budget(self.memory_budget, "--compile-step")
        if self.cuda_graphs and resolve_device(self.device).type != "cuda":
            raise ValueError("--cuda-graphs replays the engine's steps as CUDA graphs: it needs --device cuda")
        if self.lr_param not in LR_PARAMS:
            raise ValueError(f"unknown --lr-param {self.lr_param!r}: choose one of {', '.join(LR_PARAMS)}")
        if self.lr_param == "log" and not self.lr_teacher > 0:
            raise ValueError(f"--lr-param log needs --lr_teacher > 0, got {self.lr_teacher}")
        return self

    def unused(self, names: Sequence[str]) -> List[str]:
        """The settings among ``names`` (DistillConfig fields) that this configuration never reads (see SCOPES)."""
        return [n for n in names if n in SCOPES and not SCOPES[n][1](self)]

    def refuse_unused(self, names: Sequence[str]) -> None:
        """Raise ValueError naming the first of ``names`` that this configuration never reads, and who reads it."""
        from haba_fast.checkpoint import flag_name

        for name in self.unused(names):
            flag, (where, _) = flag_name(name), SCOPES[name]
            if name == "memory_budget":
                flag = f"{flag} {self.memory_budget}"
            raise ValueError(f"{flag} applies to {where}; drop it")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_models"] = list(self.eval_models)
        return d

    @property
    def lr_floor(self) -> Optional[float]:
        """The learned lr's floor: ``min_lr``, or the reference's (0.001 for haba as distill_fac.py clips; none for
        pixels, as MTT's distill.py does not clip)."""
        if self.min_lr is not None:
            return float(self.min_lr)
        return 0.001 if self.parameterization == "haba" else None

    @property
    def pool_reference(self) -> str:
        """Whose ``--eval_mode`` pools apply (``evaluate.pool_reference``): HaBa's for HaBa sets, MTT's for pixel MTT
        (its ``M`` adds ResNet18_AP), the DC/DSA/DM code's for pixel DC, DSA and DM (its ``M`` adds MLP and LeNet)."""
        from haba_fast.evaluate import pool_reference

        return pool_reference(self.parameterization, self.objective)

    @property
    def standardize(self) -> bool:
        """Whether evaluation standardizes batches: ``batch_standardize``, or by default on for haba only."""
        if self.batch_standardize is None:
            return self.parameterization == "haba"
        return bool(self.batch_standardize)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        # Reference flags that never had an effect here and are now refused; old checkpoints still record them.
        d = {k: v for k, v in d.items() if k not in _DROPPED_FIELDS}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DistillConfig fields: {', '.join(unknown)}")
        d = dict(d)
        if "eval_models" in d:
            d["eval_models"] = tuple(d["eval_models"])
        return cls(**d)


def apply_preset(cfg: DistillConfig, name: str) -> DistillConfig:
    """``cfg`` with the preset's values (the reference's CIFAR-10 scripts)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(cfg, **PRESETS[name])


# MTT's distill.py (the pixel reference) defaults where they differ from HaBa's distill_fac.py, whose defaults
# DistillConfig carries. Both initialize from real images (--pix_init real: mtt-distillation's default since its
# texture commit; its first release said noise).
MTT_PIXEL_DEFAULTS: Dict[str, Any] = {"iterations": 5000, "lr_img": 1000.0, "syn_steps": 20}


def apply_pixel_reference(cfg: DistillConfig) -> DistillConfig:
    """``cfg`` as pixel MTT with MTT's distill.py defaults (``MTT_PIXEL_DEFAULTS``), for a drop-in of that script.

    The CLI applies them for ``--parameterization pixels`` (objective mtt, no preset) before the flags given.
    """
    return dataclasses.replace(cfg, parameterization="pixels", **MTT_PIXEL_DEFAULTS)


def apply_objective(cfg: DistillConfig, name: str, keep: Iterable[str] = ()) -> DistillConfig:
    """``cfg`` with ``objective=name`` and that objective's public-code defaults (DC/DSA: lr_img 0.1, noise init,
    20 evaluation networks; DM: lr_img 1.0, IPC 50 unless ``budget_ipc`` sizes the set; ...) and run length
    (:func:`objective_schedule`), except the fields named in ``keep`` (a preset's).

    The CLI applies them before the flags given explicitly, then sizes the run for the final IPC; in the Python API
    call this first, then override (and take :func:`objective_schedule` again after changing ``ipc``).
    """
    from haba_fast.objectives.base import objective_defaults

    keep = set(keep) | ({"ipc"} if cfg.budget_ipc is not None else set())
    cfg = dataclasses.replace(
        cfg, objective=name, **{k: v for k, v in objective_defaults(name).items() if k not in keep}
    )
    try:
        return dataclasses.replace(cfg, **{k: v for k, v in objective_schedule(cfg).items() if k not in keep})
    except ValueError:  # DC loops unknown for this IPC: the objective names the problem when it is built
        return cfg


def objective_schedule(cfg: DistillConfig) -> Dict[str, int]:
    """The objective's public-script run length and evaluation interval, in synthetic updates (``iterations``,
    ``eval_it``); empty for MTT (``DistillConfig`` carries distill_fac.py's).

    DC/DSA's main.py runs ``--Iteration 1000`` iterations of ``outer_loop`` updates each (one fresh network per
    iteration) and evaluates every 500 of them; DM's main_DM.py runs 20000 updates and evaluates every 2000.

    Raises:
        ValueError: DC/DSA at an IPC without public loops and not both ``outer_loop`` and ``inner_loop`` given.
    """
    from haba_fast.objectives.base import get_objective

    objective = get_objective(cfg.objective)
    if objective.reference_schedule is None:
        return {}
    iterations, every = objective.reference_schedule
    k = objective.updates_per_iteration(cfg)
    return {"iterations": iterations * k, "eval_it": every * k}


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


def rows_per_class(cfg: DistillConfig, dataset) -> int:
    """Bases (HaBa) or images (Pixels) per class: ``ipc``, or chosen to fit ``budget_ipc`` images of storage."""
    if cfg.budget_ipc is None:
        return int(cfg.ipc)
    if cfg.parameterization == "pixels":
        return int(cfg.budget_ipc)
    from haba_fast.factorization import budget_bpc

    c = dataset.channels
    c_b = 1 if cfg.single_channel else c
    return int(
        budget_bpc(
            cfg.budget_ipc,
            cfg.n_hallucinators,
            cfg.kernel_size,
            c,
            c_b,
            tuple(dataset.im_size),
            num_classes=dataset.num_classes,
        )
    )


def check_fits(cfg: DistillConfig, dataset, device) -> None:
    """Refuse, before anything is allocated, sizes whose tensors alone exceed ``device``'s total memory.

    A bound, not an estimate of the peak: the synthetic set's parameters (float32: bases + hallucinators, or images,
    and the soft label logits), and for MTT with the exact / first-order engine the weight trajectory it stores
    (``syn_steps + 1`` float32 vectors of the student's P parameters; at every --memory-budget but min, unless
    --offload-weights) together with them. Optimizer states, batches and networks come on top.

    Raises:
        ValueError: naming the sizes and the flags to lower.
    """
    from haba_fast.engines.memory import MINIMAL, parse_memory_budget
    from haba_fast.factorization import hallucinator_floats

    K, C = int(dataset.num_classes), int(dataset.channels)
    H, W = (int(s) for s in dataset.im_size)
    rpc = rows_per_class(cfg, dataset)
    total, where = device_memory_bytes(device)
    if cfg.parameterization == "haba":
        c_b = 1 if cfg.single_channel else C
        floats = K * rpc * c_b * H * W + cfg.n_hallucinators * hallucinator_floats(C, c_b, cfg.kernel_size, (H, W))
        lower = "--ipc / --budget-ipc or --n_style"
    else:
        floats = K * rpc * C * H * W
        lower = "--ipc / --budget-ipc"
    if cfg.soft_labels:
        floats += K * rpc * K
    syn = 4 * floats
    if syn > total:
        raise ValueError(
            f"the synthetic set ({floats:,} floats = {syn / 1e9:,.1f} GB) does not fit {where} "
            f"({total / 1e9:,.1f} GB): lower {lower}"
        )
    if not _adjoint(cfg) or cfg.offload_weights or parse_memory_budget(cfg.memory_budget) == MINIMAL:
        return
    from haba_fast.models import get_network, num_params

    P = num_params(get_network(cfg.model, C, K, (H, W), device="meta"))
    N = int(cfg.syn_steps)
    trajectory = 4 * (N + 1) * P
    if syn + trajectory > total:
        raise ValueError(
            f"the weight trajectory of --syn_steps {N} ({N + 1} weight vectors of {P:,} floats = "
            f"{trajectory / 1e9:,.1f} GB) with the synthetic set ({syn / 1e9:,.1f} GB) does not fit {where} "
            f"({total / 1e9:,.1f} GB): lower --syn_steps, or use --memory-budget min (keeps about 2·sqrt(N) of the "
            "vectors) or --offload-weights (keeps them in a temporary file, or in host memory on CUDA)"
        )


def check_out_dir(out_dir, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that this run must not write into, before any work.

    ``resume`` with ``overwrite`` contradict each other. A folder holding a finished run's ``synthetic.pt`` (the
    final set, written after the last checkpoint) but no checkpoint (removed, or never written: a run whose last
    steps were bad) has nothing to resume and is not free: only ``overwrite`` replaces it. A folder with a checkpoint
    needs ``resume`` (whether its settings match is ``distill``'s to judge) or ``overwrite``; one with only a killed
    run's earlier files (``synthetic_best.pt`` before the first checkpoint) starts over, as ``resume`` does without a
    checkpoint.

    Raises:
        ValueError: naming the folder, what it holds and how to proceed.
    """
    from haba_fast.checkpoint import CHECKPOINT_NAME

    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    if out_dir is None or overwrite:
        return
    out = Path(out_dir)
    if (out / CHECKPOINT_NAME).exists():
        if not resume:
            raise ValueError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it or choose "
                             "another --out")
        return  # distill() compares the run's settings with this one's
    if not (out / "synthetic.pt").exists():
        return
    if resume:
        raise ValueError(
            f"nothing to resume in {out}: it holds a finished run's synthetic.pt but no {CHECKPOINT_NAME}; pass "
            "--overwrite (without --resume) to start over there, or choose another --out"
        )
    raise ValueError(
        f"{out} already holds a finished run (synthetic.pt, and no {CHECKPOINT_NAME} to resume from); pass "
        "--overwrite to replace it or choose another --out"
    )


def build_synthetic(cfg: DistillConfig, dataset, generator: torch.Generator, device: torch.device) -> nn.Module:
    """A freshly initialized ``HaBa`` or ``Pixels`` synthetic set (``pix_init``: real images or noise)."""
    from haba_fast import factorization

    K, C = dataset.num_classes, dataset.channels
    rpc = rows_per_class(cfg, dataset)
    if cfg.parameterization == "haba":
        syn = factorization.HaBa(
            num_classes=K,
            bpc=rpc,
            channels=C,
            im_size=tuple(dataset.im_size),
            n_hallucinators=cfg.n_hallucinators,
            kernel_size=cfg.kernel_size,
            base_channels=1 if cfg.single_channel else C,
            generator=generator,
            soft_labels=bool(cfg.soft_labels),
        )
    else:
        syn = factorization.Pixels(
            num_classes=K,
            ipc=rpc,
            channels=C,
            im_size=tuple(dataset.im_size),
            generator=generator,
            soft_labels=bool(cfg.soft_labels),
        )
    if cfg.pix_init == "real":
        syn.init_from_real(dataset, generator=generator)
    if cfg.parameterization == "haba" and cfg.hallucinator_init == "identity":
        # Drawn after the bases: the same seed picks the same bases under either hallucinator init.
        syn.init_hallucinators_identity(generator=generator)
    return syn.to(device)


def _labels_of(syn: nn.Module) -> Tensor:
    from haba_fast.objectives.mtt import synthetic_labels

    return synthetic_labels(syn)


@dataclass
class DistillResult:
    """What ``distill`` produced."""

    synthetic: nn.Module
    syn_lr: float
    iterations: int
    out_dir: Optional[Path]
    history: List[Dict[str, float]] = field(default_factory=list)
    evaluations: List[Dict[str, Any]] = field(default_factory=list)
    storage: Any = None
    checkpoint: Optional[Path] = None
    grid_path: Optional[Path] = None
    seconds: float = 0.0


@torch.no_grad()
def step_used_hallucinators(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` on stacked hallucinator parameters, leaving unused hallucinators exactly as they were.

    The reference keeps one module per hallucinator: one that an iteration does not use gets no gradient, so SGD
    skips it and its momentum buffer. Here every hallucinator parameter is one tensor ``[n_hallucinators, ...]``, so
    an unused one has a zero gradient row, which momentum would still move (and its buffer decay). A hallucinator is
    unused when its rows are zero in every parameter's gradient; its parameter rows and momentum-buffer rows (zero
    where SGD creates the buffer in this step) are restored after the step.

    Args:
        optimizer: SGD over parameters whose first dimension indexes the hallucinators (``HaBa``'s).
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return
    used = torch.zeros(params[0].shape[0], dtype=torch.bool, device=params[0].device)
    for p in params:
        used |= p.grad.reshape(p.shape[0], -1).ne(0).any(dim=1)
    unused = (~used).nonzero().flatten()
    if unused.numel() == 0:
        optimizer.step()
        return
    saved = []
    for p in params:
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        saved.append((p, p[unused].clone(), None if buf is None else buf[unused].clone()))
    optimizer.step()
    for p, rows, buf_rows in saved:
        p[unused] = rows
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buf[unused] = 0 if buf_rows is None else buf_rows


@torch.no_grad()
def hallucinator_norms(syn) -> Dict[str, float]:
    """``{"hall_enc_norm", "hall_dec_norm"}``: Frobenius norms of a HaBa's encoder / decoder weights (all of them).

    The history logs them every iteration. The networks that train on a HaBa set (instancenorm ConvNets) normalize
    their first layer's output per image, so what they see of a sample hardly depends on its scale, nor the loss on
    the decoder weights' scale. Under SGD such weights keep growing, and their effective learning rate falls
    as 1/norm²: norms that jump by 10x or more in the first iterations and then stay put mean ``--lr_style`` froze
    the hallucinators where its first steps threw them (docs/RESULTS.md, "Why HaBa + DC/DSA collapses").
    """
    return {"hall_enc_norm": float(syn.enc_weight.norm()), "hall_dec_norm": float(syn.dec_weight.norm())}


class Distiller:
    """One distillation run's state and its iteration.

    Args:
        cfg: the configuration (``cfg.objective`` picks the objective: mtt | dc | dsa | dm).
        dataset: a ``haba_fast.data.Dataset`` (real images initialize the synthetic set and feed DC/DSA/DM).
        buffer: an expert buffer (``num_trajectories``, ``snapshot(traj, epoch) -> [P]``): MTT only; None for
            the other objectives.
        device: where the synthetic set and the networks live (default: ``cfg.device``).
        generator: CPU generator for every random choice (default: seeded with ``cfg.seed``).

    Construction is cheap (no file access): a benchmark builds one on random data and times ``step``.
    """

    def __init__(
        self, cfg: DistillConfig, dataset, buffer=None, *, device=None, generator: Optional[torch.Generator] = None
    ):
        from haba_fast.objectives.base import ObjectiveSetup, get_objective
        from haba_fast.objectives.contrastive import Adversary, AdversaryWeights

        self.cfg = cfg.validate()
        self.device = resolve_device(device if device is not None else cfg.device)
        if generator is None:
            generator = torch.Generator().manual_seed(int(cfg.seed))
        self.generator = generator
        self.buffer = buffer
        self.haba = cfg.parameterization == "haba"
        self.num_classes = dataset.num_classes
        self.channels = dataset.channels
        self.im_size = tuple(dataset.im_size)
        objective_cls = get_objective(cfg.objective)
        m, k = cfg.trajectories_per_iteration, dist.world_size()
        if m > 1 and m % k:
            raise ValueError(
                f"--trajectories-per-iteration {m} does not split evenly over {k} processes (segment m runs on process "
                f"m mod {k}): use a multiple of {k}"
            )
        if dist.world_size() > 1 and (cfg.objective != "mtt" or cfg.soft_labels):
            raise ValueError(
                f"a multi-process run ({dist.world_size()} processes) splits MTT's unrolled batches over ranks; "
                f"--objective {cfg.objective}{' with --soft-labels' if cfg.soft_labels else ''} runs on one process "
                "(start it without torchrun)"
            )
        if getattr(cfg, "cuda_graphs", False) and dist.world_size() > 1 and m == 1:
            raise ValueError(
                f"--cuda-graphs replays the C++ engine's steps, and a data-parallel run ({dist.world_size()} "
                "processes, one trajectory per iteration) unrolls with the torch engine's per-step all-reduce: drop "
                "--cuda-graphs, or run trajectory-parallel (--trajectories-per-iteration, a multiple of the processes)"
            )
        if objective_cls.needs_buffer and buffer is None:
            raise ValueError(
                f"objective {cfg.objective} needs an expert buffer (train one with `haba-fast buffer`); "
                "the dc, dsa and dm objectives need none"
            )

        check_fits(cfg, dataset, self.device)  # before the synthetic set (and the engine's trajectory) is allocated
        self.synthetic = build_synthetic(cfg, dataset, generator, self.device)
        self.labels = _labels_of(self.synthetic).to(self.device)
        M = self.labels.numel()
        batch = M if cfg.batch_syn is None else min(int(cfg.batch_syn), M)
        self.stream = IndexStream(M, batch)
        self.strategy = None if (not cfg.dsa or cfg.no_aug) else cfg.dsa_strategy
        self.objective = objective_cls(
            ObjectiveSetup(
                cfg=cfg,
                dataset=dataset,
                device=self.device,
                generator=generator,
                stream=self.stream,
                strategy=self.strategy,
                buffer=buffer,
            )
        )
        # The learned lr exists for MTT only; the other objectives evaluate with the fixed lr_net (public code).
        # ``syn_lr`` is a leaf the loss is differentiated in; the optimizer moves ``lr_param``: syn_lr itself
        # ("plain"), or u with syn_lr = exp(u) ("log"; see _update).
        learns_lr = objective_cls.learns_lr
        init_lr = float(cfg.lr_teacher) if learns_lr else float(cfg.lr_net)
        self.syn_lr = torch.tensor(init_lr, device=self.device).requires_grad_(learns_lr)
        if learns_lr and cfg.lr_param == "log":
            self.lr_param = torch.tensor(math.log(init_lr), device=self.device).requires_grad_(True)
        else:
            self.lr_param = self.syn_lr

        momentum, lr_momentum = objective_cls.momenta(cfg)
        if self.haba:
            self.opt_img = torch.optim.SGD([self.synthetic.bases], lr=cfg.lr_img, momentum=momentum)
            self.opt_style = torch.optim.SGD(
                list(self.synthetic.hallucinator_parameters()), lr=cfg.lr_style, momentum=momentum
            )
            self.weights = AdversaryWeights(
                club=cfg.lambda_club_content,
                cls=cfg.lambda_cls_content,
                likeli=cfg.lambda_likeli_content,
                contrast=cfg.lambda_contrast_content,
            )
            self.adversary = Adversary(self.channels, self.num_classes, self.im_size, generator=generator).to(
                self.device
            )
            self.opt_adv = torch.optim.SGD(self.adversary.parameters(), lr=cfg.adversary_lr, momentum=0.9)
            # The adversary reaches the synthetic set only through the club term: with λ_club = 0 it cannot change
            # it (its own losses shape only itself), so neither it nor the club term is computed.
            self.uses_adversary = cfg.lambda_club_content != 0
        else:
            self.opt_img = torch.optim.SGD([self.synthetic.images], lr=cfg.lr_img, momentum=momentum)
            self.opt_style = None
            self.adversary = None
            self.opt_adv = None
            self.uses_adversary = False
        self.opt_lr = torch.optim.SGD([self.lr_param], lr=cfg.lr_lr, momentum=lr_momentum) if learns_lr else None
        logits = getattr(self.synthetic, "label_logits", None)
        self.opt_label = (
            torch.optim.SGD([logits], lr=cfg.lr_label, momentum=momentum) if logits is not None else None
        )
        self.iteration = 0
        # The evaluation's own stream (network inits, shuffles, augmentation): saved with the checkpoint.
        self.eval_generator = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.bad_steps = 0  # bad (skipped) iterations in a row, counted by ``distill``

    def set_optimizer_lrs(self) -> None:
        """Set every optimizer's learning rate from ``cfg`` (after loading a state that saved older ones)."""
        pairs = [(self.opt_img, self.cfg.lr_img), (self.opt_style, self.cfg.lr_style), (self.opt_lr, self.cfg.lr_lr)]
        pairs += [(self.opt_label, self.cfg.lr_label), (self.opt_adv, self.cfg.adversary_lr)]
        for opt, lr in pairs:
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = float(lr)

    # -- MTT's pieces (kept here for callers of the MTT-only distiller) ---------------------------------------------
    @property
    def engine(self):
        """The trajectory engine (MTT); None for the other objectives."""
        return getattr(self.objective, "engine", None)

    @engine.setter
    def engine(self, engine) -> None:
        if not hasattr(self.objective, "engine"):
            raise ValueError(f"objective {self.cfg.objective} has no trajectory engine")
        self.objective.engine = engine

    @property
    def student(self):
        """MTT's student network (its structure; the engine replaces its weights)."""
        return getattr(self.objective, "student", None)

    def sample_trajectory(self) -> Tuple[int, int, Tensor, Tensor]:
        """(trajectory, start epoch, w_start [P], w_target [P]) drawn from the run's generator (MTT)."""
        return self.objective.sample_trajectory()

    def sample_plan(self) -> StepPlan:
        """The iteration's step plan (MTT)."""
        return self.objective.sample_plan()

    # -- the iteration ----------------------------------------------------------------------------------------------
    def _pair(self, pair) -> Tuple[Tensor, Tensor]:
        """x_pair = cat([x_a, x_b]) [2B, C, H, W] (augmented together) and labels [B] of a PairPlan."""
        from haba_fast.objectives.mtt import augment_groups, synthetic_samples

        B = pair.base_idx.numel()
        base = pair.base_idx.repeat(2)
        hall = pair.hall_pair.repeat_interleave(B)
        x = synthetic_samples(self.synthetic, base, hall)
        if pair.aug is not None:
            x = augment_groups(x, [pair.aug], 2 * B)
        return x, self.labels[pair.base_idx.to(self.device)]

    def step(self) -> Dict[str, float]:
        """One full iteration (matching loss, club term, optimizer steps, adversary step).

        Returns:
            metrics: ``loss`` (matching), ``club``, ``grand``, ``adv_loss``, ``adv_cls``, ``adv_likeli``,
            ``adv_contrast`` (HaBa with λ_club ≠ 0), ``syn_lr`` (after the step), ``lr_clamped`` (1.0 when the min_lr
            floor fired),
            ``adv_skipped`` (HaBa: 1.0 when the adversary's loss or gradients were not finite and it did not step),
            ``hall_enc_norm`` / ``hall_dec_norm`` (HaBa: Frobenius norm of all hallucinators' encoder / decoder
            weights after the step; see :func:`hallucinator_norms`), ``start_epoch``, ``trajectory``, ``iteration``.

        Raises:
            BadStepError (a DivergenceError): non-finite or exploding loss/gradients, or an update that would
            make a parameter non-finite; nothing was updated (``distill`` skips the step).
        """
        from haba_fast.objectives.contrastive import adversary_loss, club_loss

        self.stream.start_iteration()  # every iteration draws its own --batch_syn chunks, as the reference does
        # The objective's loss (MTT: trajectory matching; DC/DSA: gradient matching; DM: distribution matching).
        out = self.objective.loss(self.synthetic, self.syn_lr)
        loss = out.loss
        grand = loss
        club = None
        pairs = (out.club, out.adversary)
        if self.uses_adversary:
            if pairs[0] is None:  # the objective drew no adversarial batches: draw them here
                pairs = tuple(self._sample_pair() for _ in range(2))
            x_pair, _ = self._pair(pairs[0])
            _, feat = self.adversary(x_pair)
            B = pairs[0].base_idx.numel()
            club = club_loss(feat[:B], feat[B:]) * self.weights.club
            grand = grand + club
        loss_value = float(loss.detach())
        # Several processes: every rank computes the club term in full, so only rank 0's counts in the gradient sum.
        local = loss + club * dist.main_weight() if club is not None else loss
        lr_clamped = self._update(local, loss_value, out.metrics.get("start_epoch"))
        self.objective.after_update(self.synthetic)  # e.g. DC trains its network on the updated set

        metrics: Dict[str, float] = {
            "iteration": float(self.iteration),
            "loss": loss_value,
            "grand": float(grand.detach()),
            "syn_lr": float(self.syn_lr.detach()),
            "lr_clamped": float(lr_clamped),
        }
        metrics.update(out.metrics)
        if self.haba:
            metrics.update(hallucinator_norms(self.synthetic))
        if self.uses_adversary:
            metrics["club"] = float(club.detach())
            # The adversary trains on a fresh batch of the updated synthetic set; its loss must not move it.
            with torch.no_grad():
                x_pair, labels = self._pair(pairs[1])
            self.opt_adv.zero_grad(set_to_none=True)
            adv = adversary_loss(self.adversary, x_pair, labels, self.weights)
            metrics["adv_skipped"] = float(not self._adversary_update(adv["total"]))
            metrics.update({f"adv_{k}" if k != "total" else "adv_loss": float(v.detach()) for k, v in adv.items()})
        self.iteration += 1
        return metrics

    def _sample_pair(self):
        """One adversarial batch (bases under two hallucinators, augmentation) for objectives without a plan."""
        from haba_fast.plan import sample_pair

        return sample_pair(self.stream, self.cfg.n_hallucinators, self.strategy, self.im_size, self.generator, "S")

    # -- the guarded update ------------------------------------------------------------------------------------------
    def _update(self, grand: Tensor, loss_value: float, start: Optional[float] = None) -> bool:
        """Backward and one optimizer step of the synthetic set and the learned lr, or nothing at all.

        Raises BadStepError, having changed nothing, when the matching loss is not finite or (MTT's normalized
        loss) above ``max_loss``,
        when a gradient is not finite, or when the step would make a parameter non-finite (then the values and
        optimizer states from before the step are restored). Returns whether the learned lr's floor
        (``min_lr``) fired.

        The learned lr: "plain" (the reference) steps lr itself and clamps it to >= min_lr; "log" steps
        u = log(lr) with du = lr · d(lr) (the chain rule), so lr = exp(u) stays positive, and clamps u to
        >= log(min_lr) (with min_lr = 0: >= log of the dtype's smallest normal number, so exp(u) > 0).
        """
        lr_floor = self.cfg.lr_floor
        at_floor = lr_floor is not None and float(self.syn_lr.detach()) <= lr_floor
        lower = "lower --lr_img / --lr_style / --lr_lr or --lr_teacher"
        where = f"at iteration {self.iteration}" + (f" (start epoch {int(start)})" if start is not None else "")
        # Only MTT's loss is normalized (it starts near 1); DC/DM losses grow with classes and layers.
        above = self.objective.normalized_loss and loss_value > self.cfg.max_loss
        if not math.isfinite(loss_value) or above:
            exploded = math.isfinite(loss_value)
            raise BadStepError(
                f"distillation loss is {loss_value} {where}; "
                + (f"it exploded (above max_loss {self.cfg.max_loss:g}); " if exploded else "")
                + lower,
                "exploded" if exploded else "loss",
                at_floor,
            )
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        self.syn_lr.grad = None  # in log mode syn_lr is not an optimizer's parameter
        grand.backward()
        # Several processes: the matching loss's gradients are each rank's share of the batch; one sum over ranks
        # (before the checks, so every rank decides the same) gives every rank the full gradient.
        dist.all_reduce_grads_(self._trainable())
        for p in self._trainable():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                message = f"non-finite gradients {where} (loss {loss_value:.4g}); {lower}"
                raise BadStepError(message, "gradient", at_floor)
        if self.lr_param is not self.syn_lr and self.syn_lr.grad is not None:
            self.lr_param.grad = self.syn_lr.grad * self.syn_lr.detach()
        before = self._snapshot()
        self.opt_img.step()
        if self.opt_style is not None:
            step_used_hallucinators(self.opt_style)
        if self.opt_label is not None:
            self.opt_label.step()
        clamped = False
        if self.opt_lr is not None:  # objectives other than MTT keep a fixed lr
            self.opt_lr.step()
            clamped = self._apply_lr_floor(lr_floor)
        if not all(torch.isfinite(p).all() for p in self._trainable() + [self.lr_param]):
            self._restore(before)
            raise BadStepError(f"the update made parameters non-finite {where}; {lower}", "update", at_floor)
        return clamped

    @torch.no_grad()
    def _apply_lr_floor(self, lr_floor: Optional[float]) -> bool:
        """Clamp the learned lr to its floor after its step; returns whether the floor fired."""
        if self.lr_param is self.syn_lr:
            if lr_floor is None:  # pixels (MTT's distill.py) have none by default
                return False
            clamped = float(self.syn_lr) < lr_floor
            self.syn_lr.clamp_(min=lr_floor)
            return clamped
        # exp(u) must stay a positive float: the floor is min_lr, or the dtype's smallest normal number.
        floor = math.log(max(lr_floor or 0.0, torch.finfo(self.syn_lr.dtype).tiny))
        clamped = float(self.lr_param) < floor
        self.lr_param.clamp_(min=floor)
        self.syn_lr.copy_(self.lr_param.exp())
        return clamped

    def _adversary_update(self, total: Tensor) -> bool:
        """Backward and one step of the adversary, unless its loss or a gradient is not finite (then skipped:
        a non-finite adversary would make every later club term, and so every later step, bad)."""
        if not torch.isfinite(total.detach()):
            return False
        total.backward()
        dist.broadcast_grads_(list(self.adversary.parameters()))  # replicated batch: keep the ranks bitwise in step
        if not all(p.grad is None or torch.isfinite(p.grad).all() for p in self.adversary.parameters()):
            self.opt_adv.zero_grad(set_to_none=True)
            return False
        self.opt_adv.step()
        return True

    def _snapshot(self) -> Tuple[List[Tensor], List[Dict[str, Any]]]:
        values = [p.detach().clone() for p in self._trainable() + [self.lr_param]]
        return values, [copy.deepcopy(o.state_dict()) for o in self._optimizers()]

    def _restore(self, snapshot: Tuple[List[Tensor], List[Dict[str, Any]]]) -> None:
        values, states = snapshot
        with torch.no_grad():
            for p, v in zip(self._trainable() + [self.lr_param], values):
                p.copy_(v)
        for o, st in zip(self._optimizers(), states):
            o.load_state_dict(st)

    def _trainable(self) -> List[Tensor]:
        ps = [self.syn_lr] if self.opt_lr is not None else []
        if self.haba:
            ps += [self.synthetic.bases] + list(self.synthetic.hallucinator_parameters())
        else:
            ps.append(self.synthetic.images)
        if self.opt_label is not None:
            ps.append(self.synthetic.label_logits)
        return ps

    def _optimizers(self) -> List[torch.optim.Optimizer]:
        opts = (self.opt_img, self.opt_style, self.opt_lr, self.opt_label, self.opt_adv)
        return [o for o in opts if o is not None]

    # -- state (haba_fast.checkpoint) ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything resume needs (tensors and plain values): see ``haba_fast.checkpoint.distiller_state``."""
        from haba_fast.checkpoint import distiller_state

        return distiller_state(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the optimizers' lrs come from this run's config."""
        from haba_fast.checkpoint import load_distiller_state

        load_distiller_state(self, state)


# ----------------------------------------------------------------------------------------------------------------------
# The run loop


def eval_iterations(cfg: DistillConfig) -> List[int]:
    """Iterations after which the run evaluates (``i`` updates done; 0 is the initialization), and always at the end.

    The references' pools: HaBa's distill_fac.py (HaBa + MTT) evaluates every ``eval_it`` in the last tenth of the
    run (``np.arange((Iteration // 10) * 9, Iteration + 1, eval_it)``); MTT's distill.py (pixels) every ``eval_it``
    from the start, the initialization included (``np.arange(0, Iteration + 1, eval_it)``), as the DC/DSA/DM
    scripts, which HaBa with those objectives follows too.
    So iteration 0 is evaluated where the reference's pool holds it: pixel runs, and runs of fewer than 10
    iterations (``--Iteration 0`` evaluates the initialization alone). DC/DSA/DM's scripts evaluate only at the end
    when ``eval_mode`` is not S (``[args.Iteration]``).
    """
    if cfg.num_eval <= 0 or cfg.iterations < 0:
        return []
    its = {cfg.iterations}
    if cfg.objective != "mtt" and cfg.eval_mode not in ("S", "SS"):
        return sorted(its)  # DC/DSA/DM's scripts evaluate another pool than S at the end only
    if cfg.eval_it > 0:
        last_tenth = cfg.parameterization == "haba" and cfg.objective == "mtt"  # distill_fac.py's pool
        first = (cfg.iterations // 10) * 9 if last_tenth else 0
        its.update(range(first, cfg.iterations + 1, cfg.eval_it))
    return sorted(its)


def checkpoint_interval(cfg: DistillConfig) -> int:
    """Iterations between checkpoints: ``checkpoint_every``, else ``eval_it`` capped at 100 (DC/DSA's scripts evaluate
    every 500 x outer loop updates; a killed run loses at most 100), else only the end of the run."""
    return cfg.checkpoint_every or (min(cfg.eval_it, 100) if cfg.eval_it > 0 else max(cfg.iterations, 1))


def _storage_line(storage) -> str:
    if storage is None:
        return "storage: unknown"
    return (
        f"storage: {int(storage.floats):,} floats = {storage.image_equivalents:.2f} image-equivalents = "
        f"{storage.percent_of_train:.3f}% of the training set"
    )


def _storage_of(syn: nn.Module, dataset):
    return syn.storage(int(dataset.train_labels.numel()))


def eval_config(cfg: DistillConfig, device=None, dataset_name: Optional[str] = None):
    """The evaluation protocol of a run: the reference's, with the run's pool (``eval_models``, else the ``eval_mode``
    pool), epochs, repeats, batch, DSA and batch standardization (default: on for haba). Objective dc without DSA
    evaluates as DC's main.py: get_daparam's augmentation of ``dataset_name`` (default ``cfg.dataset``; MNIST,
    ConvNetBN), those networks 1000 epochs while ``epoch_eval_train`` is DC's default, else as given."""
    from haba_fast.dc_augment import DC_AUG_EPOCHS
    from haba_fast.evaluate import EvalConfig, eval_pool
    from haba_fast.objectives.gradient import GradientMatching
    from haba_fast.training import dsa_enabled

    dc_eval = cfg.objective == "dc" and not dsa_enabled(cfg.dsa, cfg.dsa_strategy)
    main_py_epochs = cfg.epoch_eval_train == GradientMatching.defaults["epoch_eval_train"]
    return EvalConfig(
        models=tuple(cfg.eval_models) or eval_pool(cfg.eval_mode, cfg.model, cfg.pool_reference),
        num_eval=max(1, cfg.num_eval),
        epochs=cfg.epoch_eval_train,
        batch_size=cfg.batch_train,
        dsa=cfg.dsa,  # --no_aug only turns augmentation off while distilling, as in the reference
        dsa_strategy=cfg.dsa_strategy,
        # DC's main.py evaluates with get_daparam's augmentation where DSA is off (MNIST, ConvNetBN)
        dc_aug_dataset=(dataset_name or cfg.dataset) if dc_eval else None,
        dc_aug_epochs=DC_AUG_EPOCHS if dc_eval and main_py_epochs else None,
        batch_standardize=cfg.standardize,
        device=None if device is None else str(device),
    )


def _evaluate(distiller: Distiller, dataset, cfg: DistillConfig, generator: torch.Generator) -> Dict[str, Any]:
    """Evaluate the current synthetic set with the learned lr: {"iteration", model: {"mean", "std", "accs"}}."""
    from haba_fast.evaluate import evaluate_synthetic

    res = evaluate_synthetic(
        distiller.synthetic,
        dataset,
        eval_config(cfg, distiller.device, getattr(dataset, "name", None)),
        lr=float(distiller.syn_lr.detach()),
        generator=generator,
        label=f"{cfg.parameterization} it {distiller.iteration}",
    )
    out: Dict[str, Any] = {"iteration": distiller.iteration}
    for model, accs in res.accuracies.items():
        out[model] = {"mean": res.mean(model), "std": res.std(model), "accs": list(accs)}
    return out


def distill(
    cfg: DistillConfig,
    dataset,
    buffer=None,
    out_dir=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_changed: Sequence[str] = (),
    progress: bool = True,
    evaluate: bool = True,
    device=None,
    log: Callable[[str], None] = print,
    on_iteration: Optional[Callable[[Distiller, Dict[str, float]], None]] = None,
) -> DistillResult:
    """Run a distillation.

    Args:
        cfg: the configuration (``iterations`` steps; checkpoints every ``checkpoint_every`` or ``eval_it``).
        dataset: the real dataset (``haba_fast.data.Dataset``).
        buffer: the expert buffer (``haba_fast.experts.load_buffer``); MTT only (None for dc, dsa, dm).
        out_dir: where checkpoints, the final synthetic set and the PNG grid go (None: nothing is written).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (else start fresh). The checkpoint's
            result-changing settings and inputs must equal this run's (``haba_fast.checkpoint.check_resume``).
        overwrite: start fresh even when ``out_dir`` holds a checkpoint or a run's synthetic set (else that is an
            error without resume; with resume, always an error).
        allow_changed: config keys (or flag spellings) that may differ from the checkpoint's on resume; the new
            values apply from the resumed iteration on.
        progress: show a tqdm progress bar (loss, lr).
        evaluate: run the periodic evaluations (``num_eval`` networks, ``epoch_eval_train`` epochs).
        device: overrides ``cfg.device``.
        log: where messages go (skipped steps also go to stderr).
        on_iteration: called after every iteration with the distiller and its metrics (tests use it).

    Returns:
        A DistillResult; the synthetic set is the last iterate (``synthetic_best.pt`` holds the best evaluated one).

    Raises:
        DivergenceError: ``max_bad_steps`` iterations in a row were bad (non-finite or exploded loss or gradients);
            the message names the likely cause, and the last good checkpoint stays in out_dir.
        ValueError: ``out_dir`` is not writable or holds another run (checked before any work: ``check_out_dir``),
            the sizes cannot fit the device (``check_fits``), a checkpoint write failed, or the checkpoint does not
            match this run.
    """
    from haba_fast import checkpoint as ckpt_mod
    from haba_fast.io import check_writable, remove_temp_files

    t0 = time.perf_counter()
    dist.init_from_env(device if device is not None else cfg.device)  # under torchrun: join the job (else nothing)
    out = Path(out_dir) if out_dir is not None else None
    if not dist.is_main():  # several processes: rank 0 alone reads the checkpoint, writes files and logs
        out, log, progress = None, (lambda message: None), False
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if out is not None:
        check_writable(out, what="--out folder")
        # Only the folders a run writes (a shared --out such as the home folder keeps other programs' files).
        stale = remove_temp_files(out, recursive=False) + remove_temp_files(out / "reference", recursive=False)
        if stale:
            log(f"removed {len(stale)} temp file(s) a stopped run left in {out}")
    distiller = Distiller(cfg, dataset, buffer, device=device)
    ckpt = out / ckpt_mod.CHECKPOINT_NAME if out is not None else None
    inputs = ckpt_mod.inputs_fingerprint(dataset, buffer) if out is not None else None
    resumed = False
    resumed_at = -1
    # (check_out_dir refused a checkpoint without --resume or --overwrite)
    if resume and ckpt is not None and ckpt.exists():
        state = ckpt_mod.load_checkpoint(ckpt)
        changed = ckpt_mod.check_resume(state, cfg, inputs, allow_changed, where=str(ckpt), log=log)
        distiller.load_state_dict(state)
        if distiller.iteration > cfg.iterations:  # its result is not this run's: never hand it back as one
            raise ValueError(
                f"{ckpt} is at iteration {distiller.iteration}, past this run's --Iteration {cfg.iterations}: "
                f"its synthetic set is not a {cfg.iterations}-iteration result. Take synthetic_{cfg.iterations}.pt "
                "from that folder if it was saved, raise --Iteration to continue the run, or choose another --out"
            )
        log(
            f"resuming from {ckpt} at iteration {distiller.iteration}"
            + (f" with changed {', '.join(changed)}" if changed else "")
        )
        resumed, resumed_at = True, distiller.iteration
    elif resume and out is not None:
        log(f"no checkpoint in {out}; starting a new run")
    fresh = not resumed  # a resumed run (even at iteration 0) has evaluated its initialization already
    if dist.world_size() > 1:  # every rank continues from the state rank 0 read and checked
        state = dist.broadcast(distiller.state_dict() if resumed else None)
        fresh = state is None  # what every rank knows (only rank 0 read the checkpoint): evaluation is collective
        if state is not None and not dist.is_main():
            distiller.load_state_dict(state)
    every = checkpoint_interval(cfg)
    eval_its = set(eval_iterations(cfg)) if evaluate else set()
    result = DistillResult(
        synthetic=distiller.synthetic, syn_lr=float(distiller.syn_lr.detach()), iterations=0, out_dir=out
    )
    storage = _storage_of(distiller.synthetic, dataset)
    result.storage = storage
    k = dist.world_size()
    log(
        f"{cfg.parameterization} on {dataset.name}: {_storage_line(storage)}; {distiller.objective.describe()}"
        + (
            ""
            if k == 1
            else f"; trajectory-parallel on {k} processes (segment m on process m mod {k})"
            if cfg.trajectories_per_iteration > 1
            else f"; data-parallel on {k} processes (every unrolled step's batch split over them)"
        )
    )
    # Each evaluated network's best mean so far: as the reference, an evaluation in which any network beats its own
    # best saves the set as synthetic_best.pt (reference/images_best.pt).
    best: Dict[str, float] = {}
    if resumed and out is not None and (out / "synthetic_best.pt").exists():
        # A resumed run keeps its bests: only a better evaluation may replace synthetic_best.pt.
        from haba_fast.io import torch_load

        meta = torch_load(out / "synthetic_best.pt", what="best checkpoint").get("meta", {})
        recorded = meta.get("best_accuracy")
        if isinstance(recorded, dict):
            best = {str(k): float(v) for k, v in recorded.items()}
        elif meta.get("accuracy") is not None:  # written before per-network bests: its maximum, for every network
            best = {model: float(meta["accuracy"]) for model in eval_config(cfg).models}
    history = None
    if out is not None:
        history = ckpt_mod.History(out / ckpt_mod.HISTORY_NAME)
        # Keep the metrics of the iterations the checkpoint holds (none for a fresh run).
        history.restart(distiller.iteration if resumed else 0, log=log)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.iterations,
            initial=distiller.iteration,
            desc=f"distill {cfg.parameterization}",
            dynamic_ncols=True,
        )
    def evaluate_now(say: Callable[[str], None]) -> None:
        """Evaluate the set at this iteration; save it as the best when a network beats its own best."""
        it = distiller.iteration
        ev = _evaluate(distiller, dataset, cfg, distiller.eval_generator)
        result.evaluations.append(ev)
        means = {k: v["mean"] for k, v in ev.items() if isinstance(v, dict)}
        say(f"iteration {it}: " + ", ".join(f"{k} {v['mean'] * 100:.2f}% ± {v['std'] * 100:.2f}"
                                            for k, v in ev.items() if isinstance(v, dict)))
        improved = [k for k, acc in means.items() if acc > best.get(k, -1.0)]
        best.update({k: means[k] for k in improved})
        if out is not None and improved:
            with ckpt_mod.writing(f"the best synthetic set (iteration {it})", out):
                meta = dict(ckpt_mod.synthetic_meta(distiller, dataset), accuracy=max(means.values()),
                            best_accuracy=dict(best))
                distiller.synthetic.save(out / "synthetic_best.pt", meta)
                ckpt_mod.save_reference(distiller, out / "reference", "best")

    try:
        if fresh and 0 in eval_its:  # the initialization, before any update (the reference's iteration 0)
            evaluate_now(bar.write if (bar is not None and log is print) else log)
        # Held (unlimited, or a budget with room for it): a step's blocks serve the next steps, then go back.
        with RunBuffers(cfg.memory_budget) as buffers:
            while distiller.iteration < cfg.iterations:
                with buffers.step():  # the whole step (not the evaluation) from the held cache
                    m = _guarded_step(distiller, ckpt, history, log)
                buffers.after_step(distiller.engine)
                result.history.append(m)
                if history is not None:
                    history.append(m)
                if bar is not None:
                    bar.update(1)
                    if "loss" in m:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['syn_lr']:.4g}")
                it = distiller.iteration
                if it in eval_its:
                    evaluate_now(bar.write if (bar is not None and log is print) else log)  # keep the bar intact
                # No checkpoint inside a run of bad steps: a resume must start from a state that stepped well.
                due = it % every == 0 or it == cfg.iterations
                if out is not None and due and distiller.bad_steps == 0:
                    result.checkpoint = ckpt_mod.save_checkpoint(distiller, out, dataset, inputs=inputs)
                if on_iteration is not None:  # last: a callback that raises leaves this iteration's checkpoint written
                    on_iteration(distiller, m)
    finally:
        if bar is not None:
            bar.close()

    result.iterations = distiller.iteration
    result.syn_lr = float(distiller.syn_lr.detach())
    distiller.synthetic.meta["lr"] = result.syn_lr  # evaluation trains with the learned lr
    # A finished run resumed and not stepped writes nothing: its files (whose bytes a results table records) stay.
    untouched = resumed and distiller.iteration == resumed_at and out is not None and (out / "synthetic.pt").is_file()
    if untouched:
        result.checkpoint = ckpt
    elif out is not None:
        if result.checkpoint is None and distiller.bad_steps == 0:
            result.checkpoint = ckpt_mod.save_checkpoint(distiller, out, dataset, inputs=inputs)
        from haba_fast.visualize import synthetic_grid

        with ckpt_mod.writing("the final synthetic set", out):
            distiller.synthetic.save(out / "synthetic.pt", ckpt_mod.synthetic_meta(distiller, dataset))
            result.grid_path = synthetic_grid(distiller.synthetic, out / "synthetic.png")
    log(_storage_line(storage))
    if result.grid_path is not None:
        log(f"grid: {result.grid_path}")
    result.seconds = time.perf_counter() - t0
    return result


def _guarded_step(distiller: Distiller, ckpt: Optional[Path], history, log: Callable[[str], None]) -> Dict[str, Any]:
    """``distiller.step()``, or a skipped iteration when the step was bad (nothing updated; logged to stderr).

    Raises:
        DivergenceError: the ``max_bad_steps``-th bad step in a row, naming the likely cause.
    """
    import sys

    try:
        m = distiller.step()
    except BadStepError as exc:
        distiller.bad_steps += 1
        it = distiller.iteration
        K = int(distiller.cfg.max_bad_steps)
        if distiller.bad_steps >= K:
            last = f"; the last good checkpoint is {ckpt}" if ckpt is not None and ckpt.exists() else ""
            raise DivergenceError(f"{_divergence_cause(distiller, exc)} ({exc}){last}") from None
        message = f"iteration {it}: skipped ({exc}); {distiller.bad_steps} bad step(s) in a row, stop at {K}"
        print(message, file=sys.stderr, flush=True)
        if log is not print:
            log(message)
        distiller.iteration += 1  # the iteration's random draws are spent: a resumed run skips the same way
        return {
            "iteration": float(it),
            "skipped": exc.reason,
            "syn_lr": float(distiller.syn_lr.detach()),
            "lr_clamped": float(exc.lr_clamped),
            "bad_steps": float(distiller.bad_steps),
        }
    distiller.bad_steps = 0
    return m


def _divergence_cause(distiller: Distiller, exc: BadStepError) -> str:
    cfg = distiller.cfg
    K = int(cfg.max_bad_steps)
    lr = float(distiller.syn_lr.detach())
    head = f"{K} bad distillation step(s) in a row, the last at iteration {distiller.iteration}: "
    floor = cfg.lr_floor
    if exc.lr_clamped or lr <= (floor if floor is not None else 0.0):
        where = f"at its floor (--min-lr {floor:g}" if floor is not None else "at or below zero (no --min-lr floor"
        return head + (
            f"the learned lr is {where}; its updates push it toward zero or below): "
            f"lower --lr_lr (now {cfg.lr_lr:g}) or use --lr-param log"
        )
    return head + (
        f"the synthetic set's step is likely too large: lower --lr_img (now {cfg.lr_img:g})"
        + (f" / --lr_style (now {cfg.lr_style:g})" if distiller.haba else "")
        + f", or --lr_lr / --lr_teacher (learned lr now {lr:.4g}); continue with --resume --allow-changed lr_img "
        "and the new value"
    )
