"""``haba-fast distill``: distill a dataset into HaBa bases + hallucinators (or pixel MTT images).

With no ``--dataset`` (and no ``--preset``) it runs the embedded digits demo end to end: experts,
HaBa, pixel MTT and a random coreset at the same storage, evaluated and tabulated.

Every flag of the HaBa reference's ``distill_fac.py`` is accepted in its spelling (``--ipc``,
``--n_style``, ``--syn_steps``, ``--Iteration``, ...) and in our dash spelling (``--n-style``,
``--syn-steps``, ``--iterations``, ...); both set the same option, so the reference's shell scripts
run with ``python distill_fac.py`` replaced by ``haba-fast distill``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List

_S = argparse.SUPPRESS


def _bool_value(text: str) -> bool:
    """The reference's ``--dsa True|False`` and ``--no_aug`` (argparse ``type=bool``) values."""
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# (DistillConfig field, flag spellings, argparse kwargs, help). Defaults are suppressed so that only flags given
# on the command line override the preset and DistillConfig's defaults (the reference's).
_FLAGS: List[tuple] = [
    # --- the reference's distill_fac.py flags ---
    (
        "dataset",
        ["--dataset"],
        dict(type=str),
        "dataset: digits, mnist, fashion-mnist, cifar10, cifar100, svhn, folder "
        "(reference spellings such as CIFAR10 work); omit it for the digits demo",
    ),
    ("subset", ["--subset"], dict(type=str), "ImageNet subset (accepted for compatibility; unused)"),
    ("model", ["--model"], dict(type=str), "student / expert network (default ConvNet)"),
    (
        "ipc",
        ["--ipc", "--bpc"],
        dict(type=int),
        "bases per class (HaBa) or images per class (pixels), as the reference's --ipc",
    ),
    (
        "eval_mode",
        ["--eval_mode", "--eval-mode"],
        dict(type=str),
        "evaluation model pool (reference; S = the training model)",
    ),
    ("num_eval", ["--num_eval", "--num-eval"], dict(type=int), "networks per evaluation (0: no evaluation)"),
    (
        "eval_it",
        ["--eval_it", "--eval-it"],
        dict(type=int),
        "evaluate every this many iterations (in the last tenth of the run, as the reference, and at the end)",
    ),
    (
        "epoch_eval_train",
        ["--epoch_eval_train", "--epoch-eval-train"],
        dict(type=int),
        "epochs to train an evaluation network",
    ),
    ("iterations", ["--Iteration", "--iterations"], dict(type=int), "distillation iterations"),
    ("lr_img", ["--lr_img", "--lr-img"], dict(type=float), "learning rate of the bases (HaBa) or images (pixels)"),
    ("lr_lr", ["--lr_lr", "--lr-lr"], dict(type=float), "learning rate of the learned learning rate"),
    ("lr_teacher", ["--lr_teacher", "--lr-teacher"], dict(type=float), "initial learned learning rate"),
    ("lr_style", ["--lr_style", "--lr-style"], dict(type=float), "learning rate of the hallucinators"),
    ("batch_real", ["--batch_real", "--batch-real"], dict(type=int), "real-data batch (accepted for compatibility)"),
    ("batch_syn", ["--batch_syn", "--batch-syn"], dict(type=int), "bases per unrolled step (default: all)"),
    ("batch_train", ["--batch_train", "--batch-train"], dict(type=int), "evaluation training batch"),
    (
        "pix_init",
        ["--pix_init", "--pix-init"],
        dict(type=str, choices=["noise", "real"]),
        "initialize from real images or noise",
    ),
    ("dsa", ["--dsa"], dict(type=_bool_value, metavar="{True,False}"), "differentiable Siamese augmentation"),
    ("dsa_strategy", ["--dsa_strategy", "--dsa-strategy"], dict(type=str), "DSA strategy (families joined by _)"),
    ("data_path", ["--data_path", "--data-path"], dict(type=str), "folder holding the dataset files"),
    (
        "buffer_path",
        ["--buffer_path", "--buffer-path"],
        dict(type=str),
        "expert buffers: <buffer_path>/<DATASET>[_NO_ZCA]/<model> or a buffer folder itself",
    ),
    (
        "pretrained_ckpt",
        ["--pretrained_ckpt", "--pretrained-ckpt"],
        dict(type=str),
        "accepted for compatibility (unused)",
    ),
    ("expert_epochs", ["--expert_epochs", "--expert-epochs"], dict(type=int), "expert epochs between start and target"),
    ("syn_steps", ["--syn_steps", "--syn-steps"], dict(type=int), "unrolled student steps per iteration"),
    (
        "max_start_epoch",
        ["--max_start_epoch", "--max-start-epoch"],
        dict(type=int),
        "start epochs are drawn in [0, this)",
    ),
    ("zca", ["--zca"], dict(action="store_const", const=True), "ZCA-whiten the data (as the reference's --zca)"),
    (
        "load_all",
        ["--load_all", "--load-all"],
        dict(action="store_const", const=True),
        "accepted for compatibility (buffers are memory-mapped)",
    ),
    (
        "no_aug",
        ["--no_aug", "--no-aug"],
        dict(type=_bool_value, nargs="?", const=True),
        "no augmentation while distilling",
    ),
    ("max_files", ["--max_files", "--max-files"], dict(type=int), "accepted for compatibility"),
    ("max_experts", ["--max_experts", "--max-experts"], dict(type=int), "accepted for compatibility"),
    (
        "force_save",
        ["--force_save", "--force-save"],
        dict(action="store_const", const=True),
        "accepted for compatibility",
    ),
    ("n_hallucinators", ["--n_style", "--n-style", "--n-hallucinators"], dict(type=int), "number of hallucinators"),
    (
        "single_channel",
        ["--single_channel", "--single-channel"],
        dict(action="store_const", const=True),
        "single-channel bases",
    ),
    (
        "lambda_club_content",
        ["--lambda_club_content", "--lambda-club-content"],
        dict(type=float),
        "weight of the club term",
    ),
    (
        "lambda_likeli_content",
        ["--lambda_likeli_content", "--lambda-likeli-content"],
        dict(type=float),
        "weight of the adversary's cosine term",
    ),
    (
        "lambda_cls_content",
        ["--lambda_cls_content", "--lambda-cls-content"],
        dict(type=float),
        "weight of the adversary's classification term",
    ),
    (
        "lambda_contrast_content",
        ["--lambda_contrast_content", "--lambda-contrast-content"],
        dict(type=float),
        "weight of the adversary's SupCon term",
    ),
    # --- ours ---
    (
        "parameterization",
        ["--parameterization"],
        dict(type=str, choices=["haba", "pixels"]),
        "haba (bases + hallucinators) or pixels (plain MTT)",
    ),
    (
        "engine",
        ["--engine"],
        dict(type=str, choices=["exact", "naive", "first-order", "auto"]),
        "unrolled-gradient engine (auto: exact when available, else naive)",
    ),
    (
        "budget_ipc",
        ["--budget-ipc", "--budget_ipc"],
        dict(type=int),
        "choose bases per class so bases + hallucinators fit this many images per class",
    ),
    ("kernel_size", ["--kernel-size", "--kernel_size"], dict(type=int), "hallucinator kernel size"),
    ("min_lr", ["--min-lr", "--min_lr"], dict(type=float), "floor of the learned lr (the reference clips at 0.001)"),
    ("device", ["--device"], dict(type=str), "cpu, cuda, cuda:N or auto"),
    ("seed", ["--seed"], dict(type=int), "seed of every random choice"),
    (
        "checkpoint_every",
        ["--checkpoint-every", "--checkpoint_every"],
        dict(type=int),
        "write a checkpoint every this many iterations (default: --eval_it)",
    ),
    ("max_loss", ["--max-loss", "--max_loss"], dict(type=float), "stop when the matching loss exceeds this (exploded)"),
    (
        "batch_standardize",
        ["--batch-standardize", "--batch_standardize"],
        dict(action="store_const", const=True),
        "HaBa's evaluation batch standardization",
    ),
    ("eval_models", ["--eval-models", "--eval_models"], dict(type=str), "comma-separated evaluation networks"),
]

CONFIG_DESTS = tuple(f[0] for f in _FLAGS)
_REFERENCE_DESTS = set(CONFIG_DESTS[: CONFIG_DESTS.index("parameterization")])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every distillation flag (defaults suppressed: only flags given on the command line override)."""
    ref = parser.add_argument_group("reference flags (distill_fac.py spelling; dash spellings are aliases)")
    ours = parser.add_argument_group("haba_fast")
    for dest, names, kwargs, help_text in _FLAGS:
        group = ref if dest in _REFERENCE_DESTS else ours
        group.add_argument(*names, dest=dest, default=_S, help=help_text, **kwargs)
    ours.add_argument(
        "--preset",
        default=None,
        choices=sorted(_presets()),
        help="the reference's CIFAR-10 settings (flags given explicitly override them)",
    )
    ours.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/<dataset>_<parameterization>_ipc<ipc>; the demo: runs/demo)",
    )
    ours.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ours.add_argument("--overwrite", action="store_true", help="start over even when --out holds a run")
    ours.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _presets() -> Dict[str, Dict[str, Any]]:
    from haba_fast.distill import PRESETS

    return PRESETS


def config_from_args(args: argparse.Namespace):
    """DistillConfig: defaults, then the preset, then the flags given on the command line."""
    from haba_fast import augment
    from haba_fast.distill import DistillConfig, apply_preset

    cfg = DistillConfig()
    if getattr(args, "preset", None):
        cfg = apply_preset(cfg, args.preset)
    given = {d: getattr(args, d) for d in CONFIG_DESTS if hasattr(args, d)}
    if "eval_models" in given:
        given["eval_models"] = tuple(m.strip() for m in given["eval_models"].split(",") if m.strip())
    if "dataset" in given:
        given["dataset"] = _canonical_dataset(given["dataset"])
    if "dsa_strategy" in given:
        fams = augment.parse_strategy(given["dsa_strategy"])
        bad = [f for f in fams if f not in augment.FAMILIES]
        if bad:
            raise ValueError(
                f"unknown DSA families {bad} in --dsa_strategy {given['dsa_strategy']!r}: "
                f"use {', '.join(augment.FAMILIES)} joined by _ (or none)"
            )
    cfg = dataclasses.replace(cfg, **given)
    return cfg.validate()


def _canonical_dataset(name: str) -> str:
    from haba_fast.data import DATASETS, REFERENCE_NAMES

    key = name.strip().lower().replace("_", "").replace("-", "")
    for ours, ref in REFERENCE_NAMES.items():
        if key in (ours.replace("-", ""), ref.lower()):
            return ours
    raise ValueError(
        f"unknown --dataset {name!r}: choose one of {', '.join(DATASETS)} (or the reference's spellings "
        f"{', '.join(REFERENCE_NAMES.values())})"
    )


def register(sub) -> None:
    parser = sub.add_parser(
        "distill",
        help="distill a dataset (no --dataset: the digits demo)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _buffer_location(cfg) -> str:
    """The reference's <buffer_path>/<DATASET>[_NO_ZCA]/<model> when it exists, else --buffer_path itself."""
    from pathlib import Path

    from haba_fast.experts import expert_dir

    ref = expert_dir(cfg.buffer_path, cfg.dataset, cfg.model, zca=cfg.zca)
    return str(ref) if ref.exists() else str(Path(cfg.buffer_path))


def run(args: argparse.Namespace) -> int:
    given_dataset = hasattr(args, "dataset") or getattr(args, "preset", None)
    if not given_dataset:
        return _run_demo(args)
    from haba_fast import data, experts
    from haba_fast.distill import distill

    cfg = config_from_args(args)
    out = args.out or f"runs/{cfg.dataset}_{cfg.parameterization}_ipc{cfg.budget_ipc or cfg.ipc}"
    dataset = data.load(cfg.dataset, cfg.data_path, zca=cfg.zca)
    buffer = experts.load_buffer(_buffer_location(cfg))
    result = distill(cfg, dataset, buffer, out, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    print(
        f"done: {result.iterations} iterations in {result.seconds:.0f} s; learned lr {result.syn_lr:.4g}; "
        f"synthetic set: {result.out_dir}/synthetic.pt (reference files in {result.out_dir}/reference)"
    )
    for ev in result.evaluations[-1:]:
        for model, v in ev.items():
            if isinstance(v, dict):
                print(f"final evaluation {model}: {100 * v['mean']:.2f}% ± {100 * v['std']:.2f}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from haba_fast.demo import DemoConfig, run_demo

    demo = DemoConfig()
    if args.out:
        demo.out = args.out
    # A few flags make sense for the demo too; the rest need --dataset.
    mapping = {
        "iterations": "iterations",
        "seed": "seed",
        "device": "device",
        "engine": "engine",
        "model": "model",
        "syn_steps": "syn_steps",
        "n_hallucinators": "n_hallucinators",
        "budget_ipc": "budget_ipc",
        "num_eval": "num_eval",
        "epoch_eval_train": "eval_epochs",
        "expert_epochs": "expert_epochs",
        "max_start_epoch": "max_start_epoch",
        "lr_lr": "lr_lr",
        "lr_teacher": "lr_teacher",
        "lr_img": "haba_lr_img",
        "lr_style": "haba_lr_style",
    }
    ignored = [d for d in CONFIG_DESTS if hasattr(args, d) and d not in mapping]
    if ignored:
        raise ValueError(
            f"--{ignored[0]} needs --dataset (without it, `haba-fast distill` runs the digits demo, which "
            f"takes only {', '.join('--' + k for k in mapping)})"
        )
    for dest, field in mapping.items():
        if hasattr(args, dest):
            setattr(demo, field, getattr(args, dest))
    demo.progress = args.progress
    if demo.engine != "auto":
        from haba_fast.engines import get_engine

        get_engine(demo.engine)  # a clear error now rather than after the experts
    run_demo(demo)
    return 0
