"""Distillation: the HaBa / pixel-MTT iteration, the run loop with checkpoints and resume, presets.

One iteration (``Distiller.step``), as the HaBa reference (distill_fac.py) does it:

1. pick an expert trajectory and a start epoch s ∈ [0, max_start_epoch); w_start = snapshot[s],
   w_target = snapshot[s + expert_epochs];
2. draw the iteration's random choices as data (:class:`haba_fast.trajectory.StepPlan`);
3. build the N unrolled steps' inputs in one generate + augment call and run the engine:
   L = ||w_N − w*||² / ||w_start − w*||²;
4. HaBa: add λ_club · mean((cos(f(x_a), f(x_b)) + 1) / 2) for one batch of bases under two different
   hallucinators (f: the adversary's features);
5. one SGD step on the bases (lr_img), the hallucinators (lr_style), both momentum 0.95, and on the
   learned lr (lr_lr, momentum 0.9, then clipped to ≥ min_lr);
6. HaBa: one step of the adversary (SGD lr 1e-3, momentum 0.9) on a fresh batch with
   λ_cls·CE + λ_likeli·mean((1 − cos)/2) + λ_contrast·SupCon.

``distill`` runs iterations with a progress bar, evaluates periodically (the reference evaluates in
the last tenth of the run, every ``eval_it`` iterations), writes checkpoints atomically in our format
and in the reference's (``images_<it>.pt``, ``styles_<it>.pt``, ``syn_lr_<it>.pt``) plus the full
optimizer/RNG state for ``resume``, and stops with a clear message when the loss stops being finite
or explodes, keeping the last good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from haba_fast.engines import ENGINES, get_engine
from haba_fast.plan import IndexStream, StepPlan, sample_plan

__all__ = [
    "PARAMETERIZATIONS",
    "PRESETS",
    "DistillConfig",
    "Distiller",
    "DistillResult",
    "DivergenceError",
    "distill",
    "apply_preset",
    "resolve_device",
]

PARAMETERIZATIONS = ("haba", "pixels")
PIX_INITS = ("real", "noise")

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
)
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar10-ipc1": dict(_CIFAR10_COMMON, ipc=1, syn_steps=50, max_start_epoch=2, lr_lr=1e-7, lr_teacher=0.01),
    "cifar10-ipc10": dict(_CIFAR10_COMMON, ipc=10, syn_steps=30, max_start_epoch=20, lr_lr=1e-5, lr_teacher=0.001),
    "cifar10-ipc50": dict(_CIFAR10_COMMON, ipc=50, syn_steps=30, max_start_epoch=20, lr_lr=1e-5, lr_teacher=0.01),
}


class DivergenceError(ValueError):
    """The distillation loss became non-finite or exploded; the run stopped before applying that step."""


@dataclass
class DistillConfig:
    """Every hyper-parameter of the reference's distill_fac.py (its defaults), plus ours.

    Reference names: ``ipc`` (rows per class: bases per class for HaBa, images per class for Pixels),
    ``n_hallucinators`` (``--n_style``), ``iterations`` (``--Iteration``); the rest keep their spelling.
    """

    # --- the reference's flags (distill_fac.py defaults) ---
    dataset: str = "cifar10"
    subset: str = "imagenette"
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
    batch_real: int = 256
    batch_syn: Optional[int] = None
    batch_train: int = 256
    pix_init: str = "real"
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    data_path: Optional[str] = None
    buffer_path: str = "./buffers"
    pretrained_ckpt: str = ""
    expert_epochs: int = 3
    syn_steps: int = 64
    max_start_epoch: int = 25
    zca: bool = False
    load_all: bool = False
    no_aug: bool = False
    max_files: Optional[int] = None
    max_experts: Optional[int] = None
    force_save: bool = False
    n_hallucinators: int = 5
    single_channel: bool = False
    lambda_club_content: float = 0.1
    lambda_likeli_content: float = 1.0
    lambda_cls_content: float = 1.0
    lambda_contrast_content: float = 1.0
    # --- ours ---
    parameterization: str = "haba"
    engine: str = "auto"  # exact when haba_fast.adjoint is installed, else naive
    budget_ipc: Optional[int] = None  # choose ipc (bases per class) so bases + hallucinators fit this many images
    kernel_size: int = 3
    min_lr: float = 0.001  # the reference clips the learned lr to >= 0.001 after every step
    adversary_lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    checkpoint_every: Optional[int] = None  # default: eval_it
    max_loss: float = 1e4  # a matching loss above this counts as exploded (it starts near 1)
    batch_standardize: bool = False  # HaBa's evaluation standardizes every batch (on when reproducing HaBa)
    eval_models: Tuple[str, ...] = ()  # default: (model,)

    def validate(self) -> "DistillConfig":
        """Raise ValueError naming the first bad value; returns self."""
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"unknown parameterization {self.parameterization!r}: choose one of {', '.join(PARAMETERIZATIONS)}"
            )
        if self.engine not in ENGINES + ("auto",):
            raise ValueError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)} (or auto)")
        if self.pix_init not in PIX_INITS:
            raise ValueError(f"unknown --pix_init {self.pix_init!r}: choose real or noise")
        for name in ("ipc", "syn_steps", "expert_epochs", "max_start_epoch", "kernel_size", "n_hallucinators"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "num_eval", "eval_it", "epoch_eval_train"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ValueError(f"--batch_syn must be >= 1, got {self.batch_syn}")
        if self.budget_ipc is not None and self.budget_ipc < 1:
            raise ValueError(f"--budget-ipc must be >= 1, got {self.budget_ipc}")
        for name in ("lr_img", "lr_style", "lr_teacher", "min_lr"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {v}")
        if not (self.max_loss > 0):
            raise ValueError(f"max_loss must be > 0, got {self.max_loss}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_models"] = list(self.eval_models)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
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


def resolve_device(device: Optional[str]) -> torch.device:
    """``auto``/None: CUDA when available, else CPU; otherwise the named device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


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
        )
    else:
        syn = factorization.Pixels(
            num_classes=K, ipc=rpc, channels=C, im_size=tuple(dataset.im_size), generator=generator
        )
    if cfg.pix_init == "real":
        syn.init_from_real(dataset, generator=generator)
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


class Distiller:
    """One distillation run's state and its iteration.

    Args:
        cfg: the configuration.
        dataset: a ``haba_fast.data.Dataset`` (real images initialize the synthetic set; shapes).
        buffer: an expert buffer (``num_trajectories``, ``snapshot(traj, epoch) -> [P]``).
        device: where the synthetic set and the student live (default: ``cfg.device``).
        generator: CPU generator for every random choice (default: seeded with ``cfg.seed``).

    Construction is cheap (no file access): a benchmark builds one on random data and times ``step``.
    """

    def __init__(
        self, cfg: DistillConfig, dataset, buffer, *, device=None, generator: Optional[torch.Generator] = None
    ):
        from haba_fast import models
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
        self._check_buffer()

        self.synthetic = build_synthetic(cfg, dataset, generator, self.device)
        self.student = models.get_network(
            cfg.model, self.channels, self.num_classes, self.im_size, generator=generator, device=self.device
        )
        P = models.num_params(self.student)
        w0 = self.buffer.snapshot(0, 0)
        if w0.numel() != P:
            raise ValueError(
                f"the expert buffer holds {w0.numel()} parameters per snapshot but a {cfg.model} for "
                f"{self.channels}×{self.im_size[0]}×{self.im_size[1]} images with {self.num_classes} classes has {P}; "
                "was the buffer trained for another model or dataset?"
            )
        self.syn_lr = torch.tensor(float(cfg.lr_teacher), device=self.device).requires_grad_(True)
        self.engine = get_engine(cfg.engine)

        momentum = 0.95
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
        else:
            self.opt_img = torch.optim.SGD([self.synthetic.images], lr=cfg.lr_img, momentum=momentum)
            self.opt_style = None
            self.adversary = None
            self.opt_adv = None
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=0.9)

        self.labels = _labels_of(self.synthetic).to(self.device)
        M = self.labels.numel()
        batch = M if cfg.batch_syn is None else min(int(cfg.batch_syn), M)
        self.stream = IndexStream(M, batch)
        self.iteration = 0
        self.strategy = None if (not cfg.dsa or cfg.no_aug) else cfg.dsa_strategy

    # -- expert trajectories --------------------------------------------------------------------------------------
    def _check_buffer(self) -> None:
        n = int(self.buffer.num_trajectories)
        if n < 1:
            raise ValueError("the expert buffer holds no trajectories; train experts with `haba-fast buffer`")
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
        """(trajectory, start epoch, w_start [P], w_target [P]) drawn from the run's generator."""
        traj = int(torch.randint(int(self.buffer.num_trajectories), (1,), generator=self.generator))
        start = int(torch.randint(int(self.cfg.max_start_epoch), (1,), generator=self.generator))
        w_start = self.buffer.snapshot(traj, start).to(self.device, torch.float32)
        w_target = self.buffer.snapshot(traj, start + self.cfg.expert_epochs).to(self.device, torch.float32)
        return traj, start, w_start, w_target

    def sample_plan(self) -> StepPlan:
        return sample_plan(
            self.stream,
            self.cfg.syn_steps,
            self.cfg.n_hallucinators if self.haba else 1,
            self.im_size,
            strategy=self.strategy,
            adversarial=self.haba,
            generator=self.generator,
        )

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
            ``adv_contrast`` (HaBa), ``syn_lr`` (after the step), ``start_epoch``, ``trajectory``, ``iteration``.

        Raises:
            DivergenceError: non-finite or exploding loss/gradients; nothing was updated.
        """
        from haba_fast.objectives.contrastive import adversary_loss, club_loss
        from haba_fast.objectives.mtt import trajectory_loss

        traj, start, w_start, w_target = self.sample_trajectory()
        plan = self.sample_plan()
        loss = trajectory_loss(self.engine, self.student, self.synthetic, plan, w_start, w_target, self.syn_lr)
        grand = loss
        club = None
        if self.haba:
            x_pair, _ = self._pair(plan.club)
            _, feat = self.adversary(x_pair)
            B = plan.club.base_idx.numel()
            club = club_loss(feat[:B], feat[B:]) * self.weights.club
            grand = grand + club
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value) or loss_value > self.cfg.max_loss:
            raise DivergenceError(
                f"distillation loss is {loss_value} at iteration {self.iteration} (start epoch {start}); "
                + ("it exploded (above max_loss " + f"{self.cfg.max_loss:g}); " if math.isfinite(loss_value) else "")
                + "lower --lr_img / --lr_style / --lr_lr or --lr_teacher"
            )

        params = self._trainable()
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        grand.backward()
        for p in params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise DivergenceError(
                    f"non-finite gradients at iteration {self.iteration} (loss {loss_value:.4g}); "
                    "lower --lr_img / --lr_style / --lr_lr or --lr_teacher"
                )
        self.opt_img.step()
        if self.opt_style is not None:
            self.opt_style.step()
        self.opt_lr.step()
        with torch.no_grad():
            self.syn_lr.clamp_(min=self.cfg.min_lr)

        metrics: Dict[str, float] = {
            "iteration": float(self.iteration),
            "loss": loss_value,
            "grand": float(grand.detach()),
            "syn_lr": float(self.syn_lr.detach()),
            "start_epoch": float(start),
            "trajectory": float(traj),
        }
        if self.haba:
            metrics["club"] = float(club.detach())
            # The adversary trains on a fresh batch of the updated synthetic set; its loss must not move it.
            with torch.no_grad():
                x_pair, labels = self._pair(plan.adversary)
            self.opt_adv.zero_grad(set_to_none=True)
            adv = adversary_loss(self.adversary, x_pair, labels, self.weights)
            adv["total"].backward()
            self.opt_adv.step()
            metrics.update({f"adv_{k}" if k != "total" else "adv_loss": float(v.detach()) for k, v in adv.items()})
        self.iteration += 1
        return metrics

    def _trainable(self) -> List[Tensor]:
        ps = [self.syn_lr]
        if self.haba:
            ps += [self.synthetic.bases] + list(self.synthetic.hallucinator_parameters())
        else:
            ps.append(self.synthetic.images)
        return ps

    def _optimizers(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.opt_img, self.opt_style, self.opt_lr, self.opt_adv) if o is not None]

    # -- state -------------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything ``resume`` needs: synthetic set, lr, optimizers, adversary, index stream, RNG, iteration.

        A deep copy: optimizer states would otherwise share their momentum tensors with this run.
        """
        return copy.deepcopy(
            {
                "format": "haba_fast.distill/1",
                "iteration": self.iteration,
                "config": self.cfg.to_dict(),
                "synthetic": {k: v.detach().cpu() for k, v in self.synthetic.state_dict().items()},
                "syn_lr": self.syn_lr.detach().cpu(),
                "opt_img": self.opt_img.state_dict(),
                "opt_style": self.opt_style.state_dict() if self.opt_style is not None else None,
                "opt_lr": self.opt_lr.state_dict(),
                "adversary": self.adversary.state_dict() if self.adversary is not None else None,
                "opt_adv": self.opt_adv.state_dict() if self.opt_adv is not None else None,
                "stream": self.stream.state_dict(),
                "generator": self.generator.get_state(),
            }
        )

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != "haba_fast.distill/1":
            raise ValueError("not a haba_fast distillation checkpoint (missing format tag haba_fast.distill/1)")
        saved = state.get("config", {})
        for key in (
            "parameterization",
            "ipc",
            "n_hallucinators",
            "kernel_size",
            "model",
            "single_channel",
            "budget_ipc",
            "batch_syn",
        ):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ValueError(
                    f"the checkpoint was made with {key}={saved[key]!r} but this run has "
                    f"{key}={getattr(self.cfg, key)!r}; "
                    "resume with the same settings or start a new --out folder"
                )
        with torch.no_grad():
            self.synthetic.load_state_dict(state["synthetic"])
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.opt_img.load_state_dict(state["opt_img"])
        if self.opt_style is not None:
            self.opt_style.load_state_dict(state["opt_style"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
            self.opt_adv.load_state_dict(state["opt_adv"])
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])


# ----------------------------------------------------------------------------------------------------------------------
# The run loop


CHECKPOINT_NAME = "checkpoint.pt"


def eval_iterations(cfg: DistillConfig) -> List[int]:
    """Iterations after which the run evaluates: the reference's pool (the last tenth, every eval_it) and the end."""
    if cfg.num_eval <= 0 or cfg.iterations <= 0:
        return []
    its = set()
    if cfg.eval_it > 0:
        its.update(range((cfg.iterations // 10) * 9, cfg.iterations + 1, cfg.eval_it))
    its.add(cfg.iterations)
    return sorted(i for i in its if i > 0)


def _storage_line(storage) -> str:
    if storage is None:
        return "storage: unknown"
    return (
        f"storage: {int(storage.floats):,} floats = {storage.image_equivalents:.2f} image-equivalents = "
        f"{storage.percent_of_train:.3f}% of the training set"
    )


def _storage_of(syn: nn.Module, dataset):
    return syn.storage(int(dataset.train_labels.numel()))


def save_checkpoint(distiller: Distiller, out_dir: Path, dataset=None) -> Path:
    """Write the resume state, our format and the reference format for the current iteration (atomically)."""
    from haba_fast.io import atomic_torch_save

    it = distiller.iteration
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _meta(distiller, dataset)
    distiller.synthetic.save(out_dir / f"synthetic_{it}.pt", meta)
    distiller.synthetic.save(out_dir / "synthetic_last.pt", meta)
    ref_dir = out_dir / "reference"
    _save_reference(distiller, ref_dir, str(it))
    # The resume state goes last: a checkpoint.pt always points at files that exist.
    atomic_torch_save(distiller.state_dict(), out_dir / CHECKPOINT_NAME)
    return out_dir / CHECKPOINT_NAME


def _meta(distiller: Distiller, dataset) -> Dict[str, Any]:
    lr = float(distiller.syn_lr.detach())
    meta = {"iteration": distiller.iteration, "lr": lr, "syn_lr": lr, "config": distiller.cfg.to_dict()}
    if dataset is not None:
        meta["dataset"] = dataset.name
        zca = getattr(dataset, "zca", None)
        if zca is not None and hasattr(zca, "state_dict"):
            meta["zca"] = zca.state_dict()
    return meta


def _save_reference(distiller: Distiller, ref_dir: Path, it: str) -> None:
    """The reference's files: images_<it>.pt [K·ipc, c_b, H, W], styles_<it>.pt (HaBa), syn_lr_<it>.pt."""
    from haba_fast.io import atomic_torch_save

    distiller.synthetic.to_reference(ref_dir, it=it)
    atomic_torch_save(distiller.syn_lr.detach().cpu(), ref_dir / f"syn_lr_{it}.pt")


def eval_config(cfg: DistillConfig, device=None):
    """The evaluation protocol of a run: the reference's, with the run's epochs, repeats, batch and DSA flags."""
    from haba_fast.evaluate import EvalConfig

    return EvalConfig(
        models=tuple(cfg.eval_models) or (cfg.model,),
        num_eval=max(1, cfg.num_eval),
        epochs=max(1, cfg.epoch_eval_train),
        batch_size=cfg.batch_train,
        dsa=cfg.dsa,  # --no_aug only turns augmentation off while distilling, as in the reference
        dsa_strategy=cfg.dsa_strategy,
        batch_standardize=cfg.batch_standardize,
        device=None if device is None else str(device),
    )


def _evaluate(distiller: Distiller, dataset, cfg: DistillConfig, generator: torch.Generator) -> Dict[str, Any]:
    """Evaluate the current synthetic set with the learned lr: {"iteration", model: {"mean", "std", "accs"}}."""
    from haba_fast.evaluate import evaluate_synthetic

    res = evaluate_synthetic(
        distiller.synthetic,
        dataset,
        eval_config(cfg, distiller.device),
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
    buffer,
    out_dir=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
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
        buffer: the expert buffer (``haba_fast.experts.load_buffer``).
        out_dir: where checkpoints, the final synthetic set and the PNG grid go (None: nothing is written).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (else start fresh).
        overwrite: start fresh even when ``out_dir`` holds a checkpoint (else that is an error without resume).
        progress: show a tqdm progress bar (loss, lr).
        evaluate: run the periodic evaluations (``num_eval`` networks, ``epoch_eval_train`` epochs).
        device: overrides ``cfg.device``.
        log: where messages go.
        on_iteration: called after every iteration with the distiller and its metrics (tests use it).

    Returns:
        A DistillResult; the synthetic set is the last iterate (``synthetic_best.pt`` holds the best evaluated one).

    Raises:
        DivergenceError: the loss became non-finite or exploded; the last good checkpoint stays in out_dir.
    """
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    distiller = Distiller(cfg, dataset, buffer, device=device)
    ckpt = out / CHECKPOINT_NAME if out is not None else None
    resumed = False
    if ckpt is not None and ckpt.exists():
        if resume:
            from haba_fast.io import torch_load

            distiller.load_state_dict(torch_load(ckpt, what="distillation checkpoint", weights_only=False))
            log(f"resuming from {ckpt} at iteration {distiller.iteration}")
            resumed = True
        elif not overwrite:
            raise ValueError(
                f"{out} already holds a run ({ckpt.name}); pass --resume to continue it or choose another --out"
            )
    elif resume and out is not None:
        log(f"no checkpoint in {out}; starting a new run")
    every = cfg.checkpoint_every if cfg.checkpoint_every else (cfg.eval_it if cfg.eval_it > 0 else cfg.iterations)
    eval_its = set(eval_iterations(cfg)) if evaluate else set()
    eval_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    result = DistillResult(
        synthetic=distiller.synthetic, syn_lr=float(distiller.syn_lr.detach()), iterations=0, out_dir=out
    )
    storage = _storage_of(distiller.synthetic, dataset)
    result.storage = storage
    log(
        f"{cfg.parameterization} on {dataset.name}: {_storage_line(storage)}; engine {distiller.engine.name}"
        + (" (an approximation)" if getattr(distiller.engine, "approximate", False) else "")
    )
    best = -1.0
    if resumed and out is not None and (out / "synthetic_best.pt").exists():
        # A resumed run keeps its best: only a better evaluation may replace synthetic_best.pt.
        from haba_fast.io import torch_load

        recorded = torch_load(out / "synthetic_best.pt", what="best checkpoint").get("meta", {}).get("accuracy")
        best = float(recorded) if recorded is not None else best
    history_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        history_path = out / "history.jsonl"
        if history_path.exists():
            # Keep the metrics of the iterations the checkpoint holds (none for a fresh run).
            keep = [
                line
                for line in history_path.read_text().splitlines()
                if resumed and line.strip() and json.loads(line)["iteration"] < distiller.iteration
            ]
            from haba_fast.io import atomic_write_text

            atomic_write_text("".join(line + "\n" for line in keep), history_path)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.iterations,
            initial=distiller.iteration,
            desc=f"distill {cfg.parameterization}",
            dynamic_ncols=True,
        )
    try:
        while distiller.iteration < cfg.iterations:
            try:
                m = distiller.step()
            except DivergenceError as exc:
                last = f"; the last good checkpoint is {ckpt}" if ckpt is not None and ckpt.exists() else ""
                raise DivergenceError(f"{exc}{last}") from None
            result.history.append(m)
            if history_path is not None:
                with open(history_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['syn_lr']:.4g}")
            it = distiller.iteration
            if it in eval_its:
                ev = _evaluate(distiller, dataset, cfg, eval_gen)
                result.evaluations.append(ev)
                acc = max(v["mean"] for k, v in ev.items() if isinstance(v, dict))
                say = bar.write if (bar is not None and log is print) else log  # keep the bar intact
                say(
                    "iteration {}: ".format(it)
                    + ", ".join(
                        f"{k} {v['mean'] * 100:.2f}% ± {v['std'] * 100:.2f}"
                        for k, v in ev.items()
                        if isinstance(v, dict)
                    )
                )
                if out is not None and acc > best:
                    best = acc
                    distiller.synthetic.save(out / "synthetic_best.pt", dict(_meta(distiller, dataset), accuracy=acc))
                    _save_reference(distiller, out / "reference", "best")
            if out is not None and (it % every == 0 or it == cfg.iterations):
                result.checkpoint = save_checkpoint(distiller, out, dataset)
            if on_iteration is not None:  # last: a callback that raises leaves this iteration's checkpoint written
                on_iteration(distiller, m)
    finally:
        if bar is not None:
            bar.close()

    result.iterations = distiller.iteration
    result.syn_lr = float(distiller.syn_lr.detach())
    distiller.synthetic.meta["lr"] = result.syn_lr  # evaluation trains with the learned lr
    if out is not None:
        if result.checkpoint is None:
            result.checkpoint = save_checkpoint(distiller, out, dataset)
        distiller.synthetic.save(out / "synthetic.pt", _meta(distiller, dataset))
        result.grid_path = save_grid(distiller.synthetic, dataset, out / "synthetic.png")
    log(_storage_line(storage))
    if result.grid_path is not None:
        log(f"grid: {result.grid_path}")
    result.seconds = time.perf_counter() - t0
    return result


def save_grid(syn: nn.Module, dataset, path: Path) -> Path:
    """PNG of the synthetic set: HaBa's bases and every hallucination of them, or the pixel images.

    Every image is min-max scaled on its own, as the reference's pictures (``make_grid(normalize=True,
    scale_each=True)``): distilled images leave the data's range, and clamping them to it saturates the picture.
    """
    from haba_fast import visualize
    from haba_fast.objectives.mtt import is_haba

    if is_haba(syn):
        visualize.haba_grid(syn, path, denormalize=None)
    else:
        x = visualize.to_unit(syn.images, None)
        visualize.save_grid(x, path, nrow=max(1, int(syn.ipc)))  # one row per class
    return Path(path)
