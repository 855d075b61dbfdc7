"""``haba-fast buffer``: train expert trajectories (the reference ``buffer.py``, same flags).

Every flag of mtt-distillation's ``buffer.py`` means what it means there (``--decay``: lr x0.1 after
epoch ``train_epochs // 2 + 1``; ``--mom``/``--l2``: SGD momentum and weight decay from the start) or is
refused with the reason (:data:`REFUSED`: ``--subset``, ``--batch_real``, and ``--dsa False``, which
there means DC augmentation).

Writes ``<buffer_path>/<DATASET>[_NO_ZCA]/<model>/`` in our memory-mapped format (``--format haba``,
default) or the reference's ``replay_buffer_<n>.pt`` files (``--format reference``). A killed run
continues from its last finished expert when rerun with the same flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from haba_fast.training import DEFAULT_DSA_STRATEGY


def _bool_flag(value: str) -> bool:
    # The reference spells it --dsa True/False.
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The reference ``buffer.py`` flags (underscore spelling) plus dash spellings and our own options."""
    p.add_argument("--dataset", default="CIFAR10", help="dataset name (ours or the reference's spelling; default "
                   "CIFAR10 under --data_path, as the reference's buffer.py; digits: the embedded set)")
    p.add_argument("--model", default="ConvNet", help="network to train (default ConvNet)")
    p.add_argument(
        "--num_experts",
        "--num-experts",
        dest="num_experts",
        type=int,
        default=100,
        help="expert trajectories to train (default 100)",
    )
    p.add_argument(
        "--lr_teacher",
        "--lr-teacher",
        dest="lr_teacher",
        type=float,
        default=0.01,
        help="expert SGD learning rate (default 0.01)",
    )
    p.add_argument(
        "--train_epochs",
        "--train-epochs",
        dest="train_epochs",
        type=int,
        default=50,
        help="epochs per expert; a snapshot at init and after every epoch (default 50)",
    )
    p.add_argument(
        "--batch_train",
        "--batch-train",
        "--batch_size",
        "--batch-size",
        dest="batch_train",
        type=int,
        default=256,
        help="training batch size (default 256)",
    )
    p.add_argument(
        "--batch_real",
        "--batch-real",
        dest="batch_real",
        type=int,
        default=None,
        help=f"refused: {REFUSED['batch_real']}",
    )
    p.add_argument(
        "--dsa",
        type=_bool_flag,
        default=True,
        help="DSA augmentation while training: True (the default; False is refused: " + REFUSED["dsa"] + ")",
    )
    p.add_argument(
        "--dsa_strategy",
        "--dsa-strategy",
        dest="dsa_strategy",
        default=DEFAULT_DSA_STRATEGY,
        help=f"DSA families joined by '_' (default {DEFAULT_DSA_STRATEGY})",
    )
    p.add_argument(
        "--data_path",
        "--data-path",
        dest="data_path",
        default=None,
        help="folder with the dataset files (digits needs none)",
    )
    p.add_argument(
        "--buffer_path",
        "--buffer-path",
        dest="buffer_path",
        default="./buffers",
        help="root of the buffers (default ./buffers)",
    )
    p.add_argument("--zca", action="store_true", help="ZCA-whiten the data (as the reference's --zca)")
    p.add_argument(
        "--decay",
        action="store_true",
        help="lr x0.1 (new SGD) after epoch train_epochs // 2 + 1, as the reference's --decay",
    )
    p.add_argument("--mom", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--l2", type=float, default=0.0, help="SGD weight decay (default 0)")
    p.add_argument(
        "--save_interval",
        "--save-interval",
        dest="save_interval",
        type=int,
        default=10,
        help="experts per replay_buffer_<n>.pt file (--format reference); --format haba writes one file per expert "
        "and records it as the size of the groups that distill's --max_files counts as files (default 10)",
    )
    p.add_argument("--subset", default=None, help=f"refused: {REFUSED['subset']}")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("haba", "reference"),
        default="haba",
        help="haba: memory-mapped [epochs+1, P] per expert (default); reference: replay_buffer_<n>.pt",
    )
    p.add_argument("--bf16", action="store_true", help="store snapshots in bfloat16 (haba format; half the size)")
    p.add_argument(
        "--batch-standardize",
        "--batch_standardize",
        dest="batch_standardize",
        action="store_true",
        help="standardize every batch by its own mean/std (HaBa's expert training)",
    )
    p.add_argument(
        "--test-every",
        "--test_every",
        dest="test_every",
        type=int,
        default=1,
        help="test accuracy every N epochs (0: only after the last; default 1)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="base seed; expert i is seeded from (seed, i) (default 0)")
    p.add_argument(
        "--subset-per-class",
        "--subset_per_class",
        dest="subset_per_class",
        type=int,
        default=None,
        help="train on only N images per class",
    )
    p.add_argument("--out", default=None, help="write here instead of <buffer_path>/<DATASET>[_NO_ZCA]/<model>")
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", help="do not continue a run found in the output directory"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# Reference flags that would not mean here what they mean there: parsed only to refuse them with the reason.
REFUSED = {
    "subset": "it picks an ImageNet subset in the reference, and haba_fast has no ImageNet loader; put the "
    "subset's images in class folders and use --dataset folder --data_path",
    "batch_real": "the reference uses it only for its ImageNet per-class loaders, which haba_fast does not have; "
    "drop it",
    "dsa": "--dsa False makes the reference train experts with DC augmentation (crop_scale_rotate), which "
    "haba_fast does not implement; use --dsa True, or --dsa_strategy none for no augmentation",
}


def expert_config_from_args(args: argparse.Namespace):
    """The ExpertConfig of parsed ``buffer`` arguments; ValueError for a refused flag (:data:`REFUSED`)."""
    from haba_fast.experts import ExpertConfig

    if args.subset is not None:
        raise ValueError(f"--subset is not supported: {REFUSED['subset']}")
    if args.batch_real is not None:
        raise ValueError(f"--batch_real is not supported: {REFUSED['batch_real']}")
    if not args.dsa:
        raise ValueError(f"--dsa False is not supported: {REFUSED['dsa']}")
    if args.bf16 and args.fmt == "reference":
        raise ValueError("--bf16 needs --format haba (the reference format stores float32)")
    cfg = ExpertConfig(
        model=args.model,
        num_experts=args.num_experts,
        epochs=args.train_epochs,
        lr=args.lr_teacher,
        momentum=args.mom,
        weight_decay=args.l2,
        batch_size=args.batch_train,
        dsa=args.dsa,
        dsa_strategy=args.dsa_strategy,
        decay=args.decay,
        batch_standardize=args.batch_standardize,
        save_interval=args.save_interval,
        seed=args.seed,
        test_every=args.test_every,
        device=args.device,
    )
    cfg.validate()
    return cfg


def register(sub) -> None:
    p = sub.add_parser("buffer", help="train expert trajectories (reference buffer.py flags)", description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost of ``path`` and its parents that does not exist yet (None: ``path`` exists)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[-1] if missing else None


def _remove_empty(path: Path, top: Optional[Path]) -> None:
    """Remove ``path`` and its parents up to ``top`` while they are empty folders (``top`` None: nothing)."""
    if top is None:
        return
    for p in (path, *path.parents):
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def run(args: argparse.Namespace) -> int:
    import torch

    from haba_fast import data, dist
    from haba_fast.experts import expert_dir
    from haba_fast.io import check_writable

    cfg = expert_config_from_args(args)
    dist.init_from_env(args.device)  # under torchrun: expert i is trained by rank i mod K
    g = torch.Generator().manual_seed(args.seed)
    out = args.out or expert_dir(args.buffer_path, data.canonical_name(args.dataset), args.model, zca=args.zca)
    created = _first_missing(Path(out))  # the folder check_writable creates, so that a failed load leaves none
    if dist.is_main():  # a read-only or full --out fails now, before the data are loaded (and ZCA fitted)
        check_writable(out, what="--out folder")
    try:
        _train(args, cfg, g, out)
    except BaseException:  # a failure before anything was written leaves no folder behind (a written one stays)
        _remove_empty(Path(out), created)
        raise
    return 0


def _train(args: argparse.Namespace, cfg, g, out) -> None:
    """Load the data, train the experts into ``out`` and report the buffer."""
    import torch

    from haba_fast import data, dist
    from haba_fast.experts import load_buffer, train_experts

    ds = data.load(args.dataset, args.data_path, zca=args.zca, subset_per_class=args.subset_per_class, generator=g)
    dist.print_main(
        f"experts: {cfg.num_experts} x {cfg.epochs} epochs of {cfg.model} on {ds!r} -> {out} ({args.fmt})"
        + (f", {dist.world_size()} processes" if dist.world_size() > 1 else "")
    )
    if cfg.num_experts % cfg.save_interval:  # said, not silent: the reference would have lost the last group
        dist.print_main(
            f"note: --num_experts {cfg.num_experts} is not a multiple of --save_interval {cfg.save_interval}: the last "
            f"{cfg.num_experts % cfg.save_interval} expert(s) are kept here as a smaller group (the reference's "
            "buffer.py saves only full groups and drops them)"
        )
    train_experts(
        ds,
        cfg,
        out,
        fmt=args.fmt,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        resume=args.resume,
        progress=not args.quiet,
        log=dist.print_main,
    )
    buf = load_buffer(out)
    dist.print_main(
        f"buffer: {buf.num_trajectories} trajectories x {buf.num_epochs + 1} snapshots x {buf.num_params} "
        f"parameters at {out}"
    )
