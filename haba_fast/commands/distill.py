"""``haba-fast distill``: distill a dataset into HaBa bases + hallucinators (or pixel MTT images).

With no ``--dataset`` (and no ``--preset``) it runs the embedded digits demo end to end: experts,
HaBa, pixel MTT and a random coreset at the same storage, evaluated and tabulated.

Every flag of the HaBa reference's ``distill_fac.py`` (and of mtt-distillation's ``distill.py``) is
parsed in its spelling (``--ipc``, ``--n_style``, ``--syn_steps``, ``--Iteration``, ...) and in our dash
spelling (``--n-style``, ``--syn-steps``, ``--iterations``, ...); both set the same option, so the
reference's shell scripts run with ``python distill_fac.py`` replaced by ``haba-fast distill``. A flag
either means what it means in the reference or is refused with the reason and what to use instead
(:data:`REFUSED`: ``--subset``, ``--batch_real`` with MTT, ``--pretrained_ckpt``, ``--force_save``, ``--lr_init``,
``--texture``, ``--canvas_size``, ``--canvas_samples``, and ``--no_aug False``); nothing is ignored. A flag given
that the chosen configuration never reads is refused as well (``--syn_steps`` with ``--objective dm``, ``--n_style``
with ``--parameterization pixels``: :data:`haba_fast.distill.SCOPES`); a combination that the reference scripts
accept and ignore too (``--dsa False --dsa_strategy color``) runs, with a warning (:func:`reference_no_ops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, List, Optional

_S = argparse.SUPPRESS


class _StoreWithSpelling(argparse.Action):
    """Store the value and which of the flag's spellings was given (``--Iteration`` counts DC/DSA's iterations)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_spelling", option_string)


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
    ("subset", ["--subset"], dict(type=str), "refused (see REFUSED)"),
    ("num_exp", ["--num_exp", "--num-exp"], dict(type=int), "refused (see REFUSED)"),
    ("save_path", ["--save_path", "--save-path"], dict(type=str), "refused (see REFUSED)"),
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
        "evaluation pool, the reference's get_eval_pool: S the training model, M ConvNet/AlexNet/VGG11/ResNet18, "
        "W widths, D depths, A activations, P poolings, N norms, C the training model and ConvNet",
    ),
    ("num_eval", ["--num_eval", "--num-eval"], dict(type=int), "networks per evaluation (0: no evaluation)"),
    (
        "eval_it",
        ["--eval_it", "--eval-it"],
        dict(type=int),
        "evaluate every this many synthetic updates (haba: in the last tenth of the run, as distill_fac.py; pixels: "
        "from iteration 0, as MTT's distill.py; and at the end; dc/dsa default 500 x outer loop, dm 2000, as their "
        "scripts)",
    ),
    (
        "epoch_eval_train",
        ["--epoch_eval_train", "--epoch-eval-train"],
        dict(type=int),
        "epochs to train an evaluation network",
    ),
    (
        "iterations",
        ["--Iteration", "--iterations"],
        dict(type=int, action=_StoreWithSpelling),
        "distillation iterations: synthetic updates; with dc/dsa, --Iteration counts main.py's iterations (outer "
        "loop updates each, a fresh network per iteration) and --iterations updates (default: each objective's "
        "script: 15000, pixels 5000, dc/dsa 1000 x outer loop, dm 20000)",
    ),
    ("lr_img", ["--lr_img", "--lr-img"], dict(type=float), "learning rate of the bases (HaBa) or images (pixels)"),
    ("lr_lr", ["--lr_lr", "--lr-lr"], dict(type=float), "learning rate of the learned learning rate"),
    ("lr_teacher", ["--lr_teacher", "--lr-teacher"], dict(type=float), "initial learned learning rate"),
    ("lr_style", ["--lr_style", "--lr-style"], dict(type=float),
     "learning rate of the hallucinators (default: mtt 100, the reference's; dc/dsa 0.002; dm 1.0)"),
    ("batch_real", ["--batch_real", "--batch-real"], dict(type=int), "dc/dsa/dm: real images per class per step"),
    ("batch_syn", ["--batch_syn", "--batch-syn"], dict(type=int),
     "bases per unrolled step (default: all; a divisor of them)"),
    ("batch_train", ["--batch_train", "--batch-train"], dict(type=int), "evaluation training batch"),
    (
        "pix_init",
        ["--pix_init", "--pix-init", "--init"],
        dict(type=str, choices=["noise", "real"]),
        "initialize from real images or noise (DC/DSA/DM's --init; default real, dc/dsa noise, as their scripts)",
    ),
    (
        "hallucinator_init",
        ["--hallucinator-init"],
        dict(type=str, choices=["reference", "identity"]),
        "haba: hallucinators at iteration 0: the reference's random init, or near-identity (samples start as "
        "their bases; not a reference flag)",
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
        "refused (see REFUSED)",
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
        "draw any expert trajectory each iteration (with replacement); without it, walk the buffer files in a "
        "random order, each file's experts in a random order, as the reference",
    ),
    (
        "no_aug",
        ["--no_aug", "--no-aug"],
        dict(type=_bool_value, nargs="?", const=True),
        "no augmentation while distilling (--no_aug or --no_aug True; the reference reads any value as True, so "
        "--no_aug False is refused)",
    ),
    (
        "max_files",
        ["--max_files", "--max-files"],
        dict(type=int),
        "use only this many buffer files, chosen at random (not with --load_all)",
    ),
    (
        "max_experts",
        ["--max_experts", "--max-experts"],
        dict(type=int),
        "use only the first this many experts of each buffer file (not with --load_all)",
    ),
    ("force_save", ["--force_save", "--force-save"], dict(action="store_const", const=True), "refused (see REFUSED)"),
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
    # mtt-distillation's distill.py flags that HaBa's distill_fac.py does not have
    ("lr_init", ["--lr_init", "--lr-init"], dict(type=float), "refused (see REFUSED)"),
    ("texture", ["--texture"], dict(action="store_const", const=True), "refused (see REFUSED)"),
    ("canvas_size", ["--canvas_size", "--canvas-size"], dict(type=int), "refused (see REFUSED)"),
    ("canvas_samples", ["--canvas_samples", "--canvas-samples"], dict(type=int), "refused (see REFUSED)"),
    # --- ours ---
    (
        "parameterization",
        ["--parameterization"],
        dict(type=str, choices=["haba", "pixels"]),
        "haba (bases + hallucinators) or pixels (plain MTT, with MTT distill.py's defaults)",
    ),
    (
        "engine",
        ["--engine"],
        dict(type=str, choices=["exact", "naive", "first-order", "auto"]),
        "unrolled-gradient engine (auto: exact)",
    ),
    (
        "budget_ipc",
        ["--budget-ipc", "--budget_ipc"],
        dict(type=int),
        "choose bases per class so bases + hallucinators fit this many images per class",
    ),
    ("kernel_size", ["--kernel-size", "--kernel_size"], dict(type=int), "hallucinator kernel size"),
    (
        "min_lr",
        ["--min-lr", "--min_lr"],
        dict(type=float),
        "floor of the learned lr (default: the reference's, 0.001 for haba; none for pixels, as MTT)",
    ),
    ("device", ["--device"], dict(type=str), "cpu, cuda, cuda:N or auto"),
    ("seed", ["--seed"], dict(type=int), "seed of every random choice"),
    (
        "checkpoint_every",
        ["--checkpoint-every", "--checkpoint_every"],
        dict(type=int),
        "write a checkpoint every this many iterations (default: --eval_it, at most 100; the end of the run when "
        "--eval_it is 0)",
    ),
    (
        "max_loss",
        ["--max-loss", "--max_loss"],
        dict(type=float),
        "MTT: a step whose normalized matching loss exceeds this (default 1e4) counts as exploded: it is skipped, "
        "and --max-bad-steps of them in a row stop the run",
    ),
    (
        "batch_standardize",
        ["--batch-standardize", "--batch_standardize"],
        dict(type=_bool_value, nargs="?", const=True, metavar="{True,False}"),
        "standardize every evaluation batch by its mean/std, as HaBa's evaluation (default: on for haba, off for "
        "pixels)",
    ),
    ("eval_models", ["--eval-models", "--eval_models"], dict(type=str), "comma-separated evaluation networks"),
    (
        "objective",
        ["--objective"],
        dict(type=str, choices=["mtt", "dc", "dsa", "dm"]),
        "distillation objective: mtt (trajectory matching, needs a buffer), dc / dsa (gradient matching without / "
        "with Siamese augmentation), dm (distribution matching); sets that objective's public-code defaults "
        "(lr_img, ...) under the flags given",
    ),
    ("lr_net", ["--lr-net", "--lr_net"], dict(type=float), "dc/dsa: network lr; dc/dsa/dm: evaluation lr (0.01)"),
    ("outer_loop", ["--outer-loop", "--outer_loop"], dict(type=int), "dc/dsa: updates per network (default per IPC)"),
    ("inner_loop", ["--inner-loop", "--inner_loop"], dict(type=int), "dc/dsa: network epochs between updates"),
    (
        "dis_metric",
        ["--dis_metric", "--dis-metric"],
        dict(type=str, choices=["ours", "mse", "cos"]),
        "dc/dsa: gradient distance, as the public code's: ours (per output channel, 1 - cos), mse or cos (all "
        "gradients concatenated) (default ours)",
    ),
    (
        "soft_labels",
        ["--soft-labels", "--soft_labels"],
        dict(action="store_const", const=True),
        "learn soft labels (logits per image, or per basis for HaBa), trained by the objective",
    ),
    ("lr_label", ["--lr-label", "--lr_label"], dict(type=float), "learning rate of the soft label logits"),
    (
        "max_bad_steps",
        ["--max-bad-steps", "--max_bad_steps"],
        dict(type=int),
        "skip an iteration whose loss or gradients are not finite (or exploded); stop after this many in a row "
        "(default 5)",
    ),
    (
        "lr_param",
        ["--lr-param", "--lr_param"],
        dict(type=str, choices=["plain", "log"]),
        "learned lr: plain (the reference: SGD on lr, clamped to >= --min-lr) or log (SGD on log lr: always "
        "positive; --lr_lr is then the step of log lr)",
    ),
    (
        "trajectories_per_iteration",
        ["--trajectories-per-iteration", "--trajectories_per_iteration"],
        dict(type=int),
        "MTT: match M expert segments per iteration (mean loss; default 1). A DIFFERENT ALGORITHM from the "
        "reference's one segment per iteration. Under torchrun it is trajectory-parallel (segment m on process "
        "m mod K; M a multiple of K); with M = 1 torchrun splits every unrolled batch instead (same algorithm)",
    ),
    (
        "memory_budget",
        ["--memory-budget", "--memory_budget"],
        dict(type=str, metavar="SIZE|auto|0|unlimited|min"),
        "mtt engine: memory for per-step tensors kept from the forward sweep instead of recomputed, same gradients "
        "(0: keep none, memory flat in --syn_steps but for one weight vector per step; 2GB / 512MB: a cap; auto: "
        "half the free memory; unlimited: recompute nothing; min: keep none and store only every ceil(sqrt(N))-th "
        "weight vector, recomputing the others: memory flat in --syn_steps, one more forward step per step)",
    ),
    (
        "offload_weights",
        ["--offload-weights", "--offload_weights"],
        dict(action="store_const", const=True),
        "mtt engine: keep the weight trajectory (one weight vector per unrolled step) in a temporary file in "
        "$TMPDIR (CPU) or in pinned host memory (CUDA) instead of in memory: memory flat in --syn_steps at any "
        "--memory-budget but min, the same results",
    ),
    (
        "compile_step",
        ["--compile-step", "--compile_step"],
        dict(action="store_const", const=True),
        "mtt engine, for GPUs: run each unrolled step compiled with torch.compile (its elementwise work fused; the "
        "first iteration compiles, tens of seconds); --memory-budget 0 or min. The same gradients up to float "
        "rounding; on a CPU the default C++ engine is faster",
    ),
    (
        "cuda_graphs",
        ["--cuda-graphs", "--cuda_graphs"],
        dict(action="store_const", const=True),
        "mtt engine, CUDA only: replay each unrolled step's C++ ops from CUDA graphs (each captured at its second "
        "call, replayed after: a step costs the host a few launches instead of hundreds); any --memory-budget. The "
        "same gradients; the steps skip their per-step value checks (the plan is checked once per iteration)",
    ),
]

# Reference flags that would not mean here what they mean there: parsed only to refuse them with the reason.
REFUSED: Dict[str, str] = {
    "subset": "it picks an ImageNet subset in the reference, and haba_fast has no ImageNet loader (the reference "
    "ignores it for other datasets); put the subset's images in class folders and use --dataset folder --data_path",
    "batch_real": "the HaBa/MTT reference uses it only for its ImageNet per-class loaders, which haba_fast does not "
    "have (it is the real batch per class of --objective dc, dsa and dm); "
    "drop it",
    "pretrained_ckpt": "the reference parses it and never reads it; to continue a run use --resume --out RUN",
    "force_save": "it only makes the reference log image grids to wandb at ipc >= 50; haba_fast always writes "
    "synthetic.png; drop it",
    "lr_init": "mtt-distillation parses it and never reads it (the learned lr starts at --lr_teacher); use "
    "--lr_teacher",
    "texture": "texture distillation (MTT's tileable canvases) is not implemented in haba_fast; use "
    "mtt-distillation's distill.py for textures",
    "canvas_size": "it only sizes MTT's --texture canvases, which haba_fast does not implement; drop it",
    "canvas_samples": "it only counts MTT's --texture canvas crops, which haba_fast does not implement; drop it",
    "num_exp": "DC/DSA/DM's scripts repeat the whole distillation this many times and pool the accuracies; run the "
    "command once per experiment with its own --seed and --out (haba-fast table runs seeds as cells)",
    "save_path": "DC/DSA/DM's result folder; use --out (the run writes synthetic.pt, synthetic_best.pt and "
    "reference/ there)",
}

# DC/DSA/DM's --method (main.py: DC or DSA; main_DM.py: DM) names the objective, in any case but DSA's: main.py
# compares it with 'DSA' exactly (another value, 'dsa' too, runs DC there; main_DM.py never reads it).
METHODS = {"dc": "dc", "dsa": "dsa", "dm": "dm"}

# main.py's --dsa_strategy default: 'None', which augments nothing (DiffAugment returns its input).
MAIN_PY_DSA_STRATEGY = "none"

# Refused reference flags that mean something for other objectives: flag -> the objectives that use it.
OBJECTIVE_FLAGS: Dict[str, tuple] = {"batch_real": ("dc", "dsa", "dm")}

CONFIG_DESTS = tuple(f[0] for f in _FLAGS)
_REFERENCE_DESTS = set(CONFIG_DESTS[: CONFIG_DESTS.index("parameterization")])


def refuse_unsupported(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first reference flag given that haba_fast refuses, with why and what instead."""
    names = {f[0]: f[1][0] for f in _FLAGS}
    for dest, reason in REFUSED.items():
        if dest in OBJECTIVE_FLAGS and getattr(args, "objective", "mtt") in OBJECTIVE_FLAGS[dest]:
            continue
        if hasattr(args, dest):
            raise ValueError(f"{names[dest]} is not supported: {reason}")
    if getattr(args, "no_aug", True) is False:
        raise ValueError(
            "--no_aug False would turn augmentation OFF in the reference (argparse type=bool reads any non-empty "
            "value as True); leave --no_aug out to keep augmentation, or write --no_aug True"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every distillation flag (defaults suppressed: only flags given on the command line override)."""
    ref = parser.add_argument_group("reference flags (distill_fac.py spelling; dash spellings are aliases)")
    ours = parser.add_argument_group("haba_fast")
    for dest, names, kwargs, help_text in _FLAGS:
        group = ref if dest in _REFERENCE_DESTS else ours
        if dest in REFUSED:
            prefix = f"{help_text}; with mtt refused: " if dest in OBJECTIVE_FLAGS else "refused: "
            help_text = f"{prefix}{REFUSED[dest]}".replace("%", "%%")
        group.add_argument(*names, dest=dest, default=_S, help=help_text, **kwargs)
    ref.add_argument(
        "--method",
        dest="method",
        default=_S,
        type=str,
        help="DC/DSA/DM's scripts' --method (DC, DSA or DM, spelled so): --objective dc, dsa or dm, except that "
        "--method DSA without --dsa_strategy takes main.py's default strategy 'None' (no augmentation)",
    )
    ours.add_argument(
        "--preset",
        default=None,
        choices=sorted(_presets()),
        help="the reference's CIFAR-10 settings (flags given explicitly override them)",
    )
    ours.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/<dataset>_<parameterization>[_<objective> unless mtt]_ipc<budget-ipc or "
        "ipc>; the demo: runs/demo)",
    )
    ours.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ours.add_argument(
        "--allow-changed",
        "--allow_changed",
        dest="allow_changed",
        default="",
        metavar="FLAG,...",
        help="with --resume: continue although these result-changing flags differ from the checkpoint's "
        "(e.g. lr_img,lr_style); the new values apply from the resumed iteration on",
    )
    ours.add_argument("--overwrite", action="store_true", help="start over even when --out holds a run")
    ours.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _presets() -> Dict[str, Dict[str, Any]]:
    from haba_fast.distill import PRESETS

    return PRESETS


def config_from_args(args: argparse.Namespace):
    """DistillConfig: defaults, then the preset, then the flags given on the command line."""
    from haba_fast import augment, dist
    from haba_fast.checkpoint import flag_name
    from haba_fast.distill import DistillConfig, apply_objective, apply_pixel_reference, apply_preset

    _method_as_objective(args)  # first: what is refused depends on the objective (--batch_real)
    refuse_unsupported(args)
    cfg = DistillConfig()
    if getattr(args, "preset", None):
        cfg = apply_preset(cfg, args.preset)
    elif getattr(args, "parameterization", None) == "pixels" and getattr(args, "objective", "mtt") == "mtt":
        cfg = apply_pixel_reference(cfg)  # MTT's distill.py defaults (--Iteration 5000, --lr_img 1000, ...)
    # A preset's IPC stays under an objective's defaults (its name says it); its HaBa/MTT learning rates do not.
    if hasattr(args, "objective"):  # its public code's lr_img etc.; explicit flags override. A preset's IPC (its
        # name says it) stays; its HaBa/MTT learning rates do not.
        cfg = apply_objective(cfg, args.objective, keep=("ipc",) if getattr(args, "preset", None) else ())
    cfg = _main_py_method(cfg, args)
    if hasattr(args, "method") and not hasattr(args, "parameterization"):
        dist.print_main(  # main.py / main_DM.py distill images; this library distills HaBa sets unless told otherwise
            f"haba-fast distill: note: --method {args.method} distills a HaBa set here (bases x hallucinators, "
            "the default --parameterization haba) with its objective; main.py / main_DM.py distill images: add "
            "--parameterization pixels for theirs",
            file=sys.stderr,
        )
    usable = [d for d in CONFIG_DESTS if d not in REFUSED or d in OBJECTIVE_FLAGS]
    given = {d: getattr(args, d) for d in usable if hasattr(args, d)}
    if "ipc" in given and "budget_ipc" in given:
        raise ValueError(
            "give --ipc or --budget-ipc, not both: --budget-ipc chooses the bases (images) per class itself"
        )
    if "dataset" in given:
        given["dataset"] = _canonical_dataset(given["dataset"])
    if "dsa_strategy" in given:
        augment.parse_strategy(given["dsa_strategy"])  # a clear error naming an unknown family
    cfg = dataclasses.replace(cfg, **given).validate()
    cfg = _sized_by_objective(cfg, given, getattr(args, "iterations_spelling", None))
    cfg.refuse_unused(list(given))  # a flag given explicitly that this configuration never reads (distill.SCOPES)
    for dest, why in reference_no_ops(cfg, given):
        if cfg.objective != "mtt":  # our own modes: an error, as for SCOPES
            raise ValueError(f"{flag_name(dest)} has no effect here: {why}; drop it")
        dist.print_main(  # under torchrun: once per job
            f"haba-fast distill: warning: {flag_name(dest)} has no effect here: {why} (the reference ignores it too)",
            file=sys.stderr,
        )
    if cfg.parameterization == "haba" and cfg.n_hallucinators == 1 and cfg.lambda_club_content != 0:
        dist.print_main(  # distill_fac.py draws two different hallucinators and fails with one (randperm(1)[1])
            "haba-fast distill: warning: --n_style 1: the adversarial term contrasts two different hallucinators; "
            "with one it compares the hallucinator with itself (HaBa's distill_fac.py stops with an IndexError "
            "here); --lambda_club_content 0 turns the term off",
            file=sys.stderr,
        )
    return cfg


def _method_as_objective(args: argparse.Namespace) -> None:
    """DC/DSA/DM's ``--method`` given: set ``args.objective`` from it (ValueError for an unknown one or a clash)."""
    if not hasattr(args, "method"):
        return
    method = str(args.method).strip()
    objective = METHODS.get(method.lower())
    if objective is None:
        raise ValueError(f"unknown --method {args.method!r}: DC, DSA or DM (the same as --objective dc, dsa or dm)")
    if objective == "dsa" and method != "DSA":
        raise ValueError(
            f"--method {args.method!r}: DatasetCondensation's main.py compares --method with 'DSA' exactly, so "
            f"{args.method!r} runs DC there; write --method DSA (or --method DC), or use --objective dsa"
        )
    if getattr(args, "objective", objective) != objective:
        raise ValueError(f"--method {args.method} means --objective {objective}, not --objective {args.objective}: "
                         "give one of them")
    args.objective = objective


def _main_py_method(cfg, args: argparse.Namespace):
    """``cfg`` as DatasetCondensation's main.py runs for ``--method DC|DSA`` (a reference command line), with a
    warning where that differs from ``--objective``:

    - ``--method DSA`` without ``--dsa_strategy``: main.py's default strategy 'None', which augments nothing, neither
      while matching nor in the evaluation (which still trains 1000 epochs);
    - ``--epoch_eval_train`` other than the default with ``--method DC|DSA``: main.py overwrites it before every
      evaluation (300 epochs without augmentation, 1000 with); this run uses the value given.
    """
    from haba_fast import dist

    method = str(getattr(args, "method", "")).strip().upper()
    if method not in ("DC", "DSA"):
        return cfg
    # (--dsa False / --no_aug: the strategy is never read, and the objective says so)
    if method == "DSA" and not hasattr(args, "dsa_strategy") and getattr(args, "dsa", True) is not False \
            and not getattr(args, "no_aug", False):
        dist.print_main(
            "haba-fast distill: warning: --method DSA without --dsa_strategy runs main.py's default strategy 'None', "
            "which augments nothing (matching and evaluation unaugmented, as there); for DSA as the paper runs it "
            "give --dsa_strategy color_crop_cutout_flip_scale_rotate (or use --objective dsa)",
            file=sys.stderr,
        )
        cfg = dataclasses.replace(cfg, dsa_strategy=MAIN_PY_DSA_STRATEGY)
    # (with --num_eval 0 nothing is evaluated, and reference_no_ops says so instead)
    if hasattr(args, "epoch_eval_train") and args.epoch_eval_train != cfg.epoch_eval_train \
            and getattr(args, "num_eval", cfg.num_eval) != 0:
        dist.print_main(
            "haba-fast distill: warning: main.py overwrites --epoch_eval_train before every evaluation (300 "
            f"epochs without augmentation, 1000 with); this run trains {args.epoch_eval_train} as given",
            file=sys.stderr,
        )
    return cfg


def _sized_by_objective(cfg, given: Dict[str, Any], iterations_spelling: Optional[str]):
    """``cfg`` with the objective's public run length for its final IPC where ``--Iteration`` / ``--eval_it`` were
    not given (``distill.objective_schedule``), and DC/DSA's ``--Iteration N`` as N main.py iterations: N x the outer
    loop synthetic updates."""
    from haba_fast.distill import DistillConfig, objective_schedule
    from haba_fast.objectives.base import get_objective

    changes = {k: v for k, v in objective_schedule(cfg).items() if k not in given}
    if "budget_ipc" in given and "ipc" not in given:  # unread beside --budget-ipc: not DM's 50 in the run's record
        changes["ipc"] = DistillConfig.ipc
    if "iterations" in given and iterations_spelling == "--Iteration":
        changes["iterations"] = given["iterations"] * get_objective(cfg.objective).updates_per_iteration(cfg)
    return dataclasses.replace(cfg, **changes).validate() if changes else cfg


def reference_no_ops(cfg, given) -> List[tuple]:
    """(dest, why) for each flag in ``given`` that ``cfg`` never reads although the reference scripts accept it in
    the same combination and ignore it there too (``--dsa False --dsa_strategy color``): with ``--objective mtt``
    the CLI warns, so that reference command lines keep running; with the other objectives it refuses them."""
    from haba_fast.distill import eval_iterations
    from haba_fast.objectives.base import get_objective

    # Who reads the distillation's augmentation strategy (Distiller.strategy): every objective but dc (which matches
    # unaugmented gradients), and HaBa's adversarial term.
    reader = cfg.objective != "dc" or (cfg.parameterization == "haba" and cfg.lambda_club_content != 0)
    evaluates = bool(eval_iterations(cfg))
    found = []
    no_dsa = "--dsa False turns augmentation off"
    if "dsa" not in given:  # --objective dc's default, not the command line's
        no_dsa = f"--objective {cfg.objective} turns augmentation off (its default --dsa False; --dsa True evaluates)"
    if "dsa_strategy" in given and not (cfg.dsa and ((reader and not cfg.no_aug) or evaluates)):
        if not cfg.dsa:
            why = no_dsa
        else:
            off = "--no_aug turns augmentation off while distilling"
            if not reader:
                off = "--objective dc distills without augmentation"
            why = f"{off} and this run evaluates nothing (--num_eval 0)"
        found.append(("dsa_strategy", why))
    if "no_aug" in given and cfg.no_aug and not (cfg.dsa and reader):
        why = no_dsa if not cfg.dsa else "--objective dc distills without augmentation"
        found.append(("no_aug", why))
    if not evaluates:  # the evaluation's own settings (batch_train also sizes DC/DSA's inner-loop batches, which
        # train the network between the outer steps of one iteration: none with an outer loop of 1, none elsewhere)
        inner_batches = get_objective(cfg.objective).updates_per_iteration(cfg) > 1
        for dest in ("epoch_eval_train", "eval_mode", "batch_train"):
            if dest in given and not (dest == "batch_train" and inner_batches):
                found.append((dest, "--num_eval 0 evaluates nothing"))
    if cfg.parameterization == "haba" and cfg.lambda_club_content == 0:
        for dest in ("lambda_likeli_content", "lambda_cls_content", "lambda_contrast_content"):
            if dest in given:
                why = "--lambda_club_content 0 cuts the adversary off from the synthetic set, so it is not trained"
                found.append((dest, why))
    return found


def _canonical_dataset(name: str) -> str:
    from haba_fast.data import DATASETS, REFERENCE_NAMES, canonical_name

    try:
        return canonical_name(name)
    except ValueError:
        raise ValueError(
            f"unknown --dataset {name!r}: choose one of {', '.join(DATASETS)} (or the reference's spellings "
            f"{', '.join(REFERENCE_NAMES.values())})"
        ) from None


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
    from haba_fast.distill import check_fits, check_out_dir, distill, resolve_device
    from haba_fast.io import check_writable

    cfg = config_from_args(args)
    tag = "" if cfg.objective == "mtt" else f"_{cfg.objective}"
    out = args.out or f"runs/{cfg.dataset}_{cfg.parameterization}{tag}_ipc{cfg.budget_ipc or cfg.ipc}"
    allow = [f.strip() for f in args.allow_changed.split(",") if f.strip()]
    if allow and not args.resume:
        raise ValueError("--allow-changed needs --resume")
    check_out_dir(out, resume=args.resume, overwrite=args.overwrite)  # distill() checks again; this is before loading
    check_writable(out, what="--out folder")  # before loading anything: a read-only or full disk fails now
    # CIFAR-100 is normalized as the objective's public code does (MTT/HaBa: CIFAR-10's statistics; DC/DSA/DM: its own)
    dataset = data.load(cfg.dataset, cfg.data_path, zca=cfg.zca, statistics=data.statistics_for(cfg.objective))
    check_fits(cfg, dataset, resolve_device(cfg.device))  # before the buffer (the Distiller checks again)
    from haba_fast.objectives.base import get_objective

    # Only trajectory matching reads expert trajectories.
    buffer = experts.load_buffer(_buffer_location(cfg)) if get_objective(cfg.objective).needs_buffer else None
    result = distill(
        cfg,
        dataset,
        buffer,
        out,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_changed=allow,
        progress=args.progress,
    )
    lr_text = f"learned lr {result.syn_lr:.4g}" if cfg.objective == "mtt" else f"evaluation lr {result.syn_lr:.4g}"
    from haba_fast.dist import print_main  # under torchrun: one report, from rank 0

    print_main(
        f"done: {result.iterations} iterations in {result.seconds:.0f} s; {lr_text}; "
        f"synthetic set: {result.out_dir}/synthetic.pt (reference files in {result.out_dir}/reference)"
    )
    for ev in result.evaluations[-1:]:
        for model, v in ev.items():
            if isinstance(v, dict):
                print_main(f"final evaluation {model}: {100 * v['mean']:.2f}% ± {100 * v['std']:.2f}")
    return 0


# The demo's flags that distill_fac.py does not have (no CIFAR10 note for them).
_OURS_IN_THE_DEMO = ("seed", "device", "engine", "budget_ipc")


def _run_demo(args: argparse.Namespace) -> int:
    from haba_fast.demo import DemoConfig, run_demo

    refuse_unsupported(args)
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
    if args.allow_changed:
        raise ValueError("--allow-changed needs --dataset and --resume (the digits demo always starts over)")
    from haba_fast.checkpoint import flag_name
    from haba_fast.dist import print_main

    ignored = [d for d in (*CONFIG_DESTS, "method") if hasattr(args, d) and d not in mapping]
    if ignored:
        raise ValueError(
            f"{flag_name(ignored[0])} needs --dataset (without it, `haba-fast distill` runs the digits demo, which "
            f"takes only {', '.join(flag_name(k) for k in mapping)})"
        )
    given = [dest for dest in mapping if hasattr(args, dest)]
    # A reference command line that lost its --dataset would mean CIFAR10 there (our own flags are not its).
    reference = [getattr(args, f"{d}_spelling", None) or flag_name(d) for d in given if d not in _OURS_IN_THE_DEMO]
    if reference:
        print_main(
            f"haba-fast distill: note: no --dataset, so this runs the digits demo with {', '.join(reference)}; "
            "distill_fac.py's default dataset is CIFAR10 (give --dataset CIFAR10 --data_path DIR for that)",
            file=sys.stderr,
        )
    for dest in given:
        setattr(demo, mapping[dest], getattr(args, dest))
    demo.progress = args.progress
    if demo.engine != "auto":
        from haba_fast.engines import get_engine

        get_engine(demo.engine)  # a clear error now rather than after the experts
    run_demo(demo)
    return 0
