"""``haba-fast eval``: evaluate a synthetic set (ours or a reference checkpoint) or a coreset baseline.

    haba-fast eval runs/demo/haba/synthetic.pt --models ConvNet,AlexNet --num-eval 5
    haba-fast eval path/to/reference/run --dataset CIFAR10 --batch-standardize
    haba-fast eval --baseline kcenter --ipc 10 --dataset digits --eval_mode M

Trains fresh networks on the set (the reference protocol: SGD momentum 0.9, weight decay 5e-4, the
learned lr, DSA, batch 256, --epochs E trained as E + 1 epochs with lr x0.1 after epoch E // 2 + 1) and
prints test accuracy mean ± std per architecture. ``--eval_mode`` picks the architectures as the
reference's ``get_eval_pool`` does (S, M, W, D, A, P, N, C); ``--models`` names them instead.

A set that ``haba-fast distill`` wrote records its run's settings. If that run evaluated (``--num_eval`` > 0) the
set is evaluated as it was (:func:`haba_fast.distill.eval_config`: its pool, repeats, epochs, batch, augmentation
and batch standardization; a DC set as DC's main.py, without DSA, 20 networks of 300 epochs), flags given
winning; other sets (reference files, coresets, runs that evaluated apart such as the demo's and the table's) take
:data:`COMMAND_DEFAULTS`. Its dataset is read from the folder its run read it from. The reference saves no
learned lr: a set without one is evaluated at 0.01, with a warning, unless ``--lr`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from haba_fast.commands.distill import _bool_value
from haba_fast.evaluate import CORESET_METHODS, eval_modes
from haba_fast.training import DEFAULT_DSA_STRATEGY

# The protocol of a set that records no run (the reference's evaluate_synset defaults): flags left unset take these.
COMMAND_DEFAULTS = {"num_eval": 5, "epochs": 1000, "batch_size": 256, "dsa": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        default=None,
        help="our synthetic-set .pt, or a reference checkpoint directory / images_<it>.pt",
    )
    p.add_argument(
        "--baseline",
        choices=CORESET_METHODS,
        default=None,
        help="evaluate a real-image coreset instead of a checkpoint (needs --ipc)",
    )
    p.add_argument("--ipc", type=int, default=None, help="images per class of the --baseline coreset")
    p.add_argument(
        "--herding-features",
        dest="herding_features",
        choices=("embedding", "pixels"),
        default=None,
        help="feature space of a --baseline herding / kcenter coreset: a random ConvNet's embedding (default) or "
        "the pixels",
    )
    p.add_argument("--dataset", default=None, help="dataset to test on (default: the checkpoint's, else digits)")
    p.add_argument(
        "--data-path",
        "--data_path",
        dest="data_path",
        default=None,
        help="folder with the dataset files (default: the folder a set's run read its dataset from)",
    )
    p.add_argument("--zca", action="store_true", default=None, help="ZCA-whiten (default: as the checkpoint records)")
    p.add_argument(
        "--subset-per-class",
        "--subset_per_class",
        dest="subset_per_class",
        type=int,
        default=None,
        help="real training images per class to keep (coreset baselines draw from them)",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated architectures, e.g. ConvNet,AlexNet,VGG11,ResNet18 (default: the --eval_mode pool)",
    )
    p.add_argument(
        "--eval_mode",
        "--eval-mode",
        dest="eval_mode",
        choices=tuple(dict.fromkeys(eval_modes("haba") + eval_modes("dc"))),
        default=None,
        help="the reference's evaluation pool: S the training model (default), M architectures, W widths, "
        "D depths, A activations, P poolings, N norms, C the training model and ConvNet; pixel DC/DSA/DM sets "
        "take the DC/DSA/DM code's pools (no C; B BatchNorm networks, SS the training model with its BN)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the training model that --eval_mode S/C refer to (default: the checkpoint's, else ConvNet)",
    )
    p.add_argument(
        "--num-eval",
        "--num_eval",
        dest="num_eval",
        type=int,
        default=None,
        help=f"repeats per model (default: the run's, else {COMMAND_DEFAULTS['num_eval']})",
    )
    p.add_argument(
        "--epochs",
        "--epoch_eval_train",
        "--epoch-eval-train",
        dest="epochs",
        type=int,
        default=None,
        help="the reference's Epoch: each network trains Epoch + 1 epochs, lr x0.1 after epoch Epoch // 2 + 1 "
        f"(default: the run's, else {COMMAND_DEFAULTS['epochs']})",
    )
    p.add_argument(
        "--lr",
        "--lr_net",
        dest="lr",
        type=float,
        default=None,
        help="training lr (default: the checkpoint's learned lr, else 0.01)",
    )
    p.add_argument(
        "--batch-size",
        "--batch_train",
        "--batch-train",
        dest="batch_size",
        type=int,
        default=None,
        help=f"training batch (default: the run's, else {COMMAND_DEFAULTS['batch_size']})",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=5e-4, help="SGD weight decay (5e-4)")
    p.add_argument(
        "--dsa-strategy",
        "--dsa_strategy",
        dest="dsa_strategy",
        default=None,
        help=f"DSA families (default: the run's, else all six, {DEFAULT_DSA_STRATEGY}); 'none' turns DSA off",
    )
    p.add_argument(
        "--no-dsa",
        dest="dsa",
        action="store_false",
        default=None,
        help="train without augmentation (default: as the run evaluated, else with DSA)",
    )
    p.add_argument(
        "--dsa",
        dest="dsa",
        type=_bool_value,
        default=None,
        metavar="{True,False}",
        help="the reference's spelling: --dsa False = --no-dsa",
    )
    p.add_argument(
        "--dc-aug",
        "--dc_aug",
        dest="dc_aug",
        action="store_true",
        help="with --no-dsa: DC's evaluation augmentation, as DC's main.py evaluates without DSA (get_daparam: "
        "MNIST crop/scale/rotate, ConvNetBN crop/noise; those networks train 1000 epochs)",
    )
    p.add_argument(
        "--lr-schedule",
        dest="lr_schedule",
        choices=("half", "none"),
        default="half",
        help="half: the reference's lr x0.1 after epoch --epochs // 2 + 1 (default)",
    )
    p.add_argument(
        "--batch-standardize",
        "--batch_standardize",
        dest="batch_standardize",
        type=_bool_value,
        nargs="?",
        const=True,
        default=None,
        metavar="{True,False}",
        help="standardize every train and test batch by its mean/std, as HaBa's evaluation (default: on for a "
        "HaBa set, off for pixel sets and coresets, as `haba-fast distill` evaluates)",
    )
    p.add_argument(
        "--bases-only",
        "--bases_only",
        dest="bases_only",
        action="store_true",
        help="an ablation: train on a HaBa set's bases alone (one image per basis, no hallucinator), with the lr and "
        "batch standardization the whole set would get",
    )
    p.add_argument("--it", default=None, help="iteration to read from a reference checkpoint directory (best)")
    p.add_argument(
        "--num-classes",
        dest="num_classes",
        type=int,
        default=None,
        help="classes of a reference checkpoint, which does not record them (default: the dataset's)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of network inits, shuffling and augmentation (0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def checkpoint_kind(path) -> str:
    """What a CHECKPOINT path is, for the flags that mean something for one kind only.

    Returns ``"directory"`` (a reference run folder), ``"ours"`` (our ``.pt``: it records its classes and its one
    iteration), ``"reference"`` (a reference ``images_<it>.pt``: its name gives the iteration) or ``"other"``
    (missing or unknown: ``load_synthetic`` names the problem). Reads the file memory-mapped: cheap.
    """
    from collections.abc import Mapping

    import torch

    from haba_fast import io as hio

    p = Path(path)
    if p.is_dir():
        return "directory"
    if not p.is_file():
        return "other"
    obj = hio.torch_load(p, what="synthetic-set checkpoint", mmap=True)
    if isinstance(obj, Mapping) and "format" in obj:
        return "ours"
    return "reference" if isinstance(obj, torch.Tensor) else "other"


def refuse_reference_flags(checkpoint, *, it, num_classes) -> None:
    """Refuse ``--it`` / ``--num-classes`` where they do nothing (ValueError naming the flag and the reason).

    ``--it`` picks an iteration in a reference run folder; ``--num-classes`` gives reference files the number of
    classes they do not record. Our ``.pt`` records both (one iteration), and a reference ``images_<it>.pt`` names its
    iteration. ``--num-classes`` must be >= 1 wherever it is given.
    """
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {num_classes}")
    if it is None and num_classes is None:
        return
    kind = checkpoint_kind(checkpoint)
    if it is not None and kind in ("ours", "reference"):
        why = "a haba-fast synthetic set holds one iteration" if kind == "ours" else "its name gives the iteration"
        raise ValueError(f"--it picks the iteration in a reference run folder, and {checkpoint} is a file ({why}): "
                         "drop --it, or pass the folder")
    if num_classes is not None and kind == "ours":
        raise ValueError(f"--num-classes is for reference checkpoints, which do not record their classes; {checkpoint} "
                         "is a haba-fast synthetic set, which does: drop --num-classes")


def check_num_classes_used(checkpoint, num_classes, syn) -> None:
    """After loading: refuse a ``--num-classes`` the checkpoint overrode (a reference labels file gives K)."""
    if num_classes is not None and syn.num_classes != num_classes:
        raise ValueError(f"--num-classes {num_classes} does not apply: {checkpoint} records {syn.num_classes} classes "
                         "(its labels file): drop --num-classes")


def check_bases_only(syn, checkpoint) -> None:
    """ValueError unless ``syn``'s bases can train on their own (:func:`bases_only`): a set without hallucinators,
    with soft labels, or with bases that are not images (fewer channels than the samples) is refused."""
    if not getattr(syn, "n_hallucinators", 0):
        raise ValueError(f"--bases-only: {checkpoint} is a {type(syn).__name__} set, not a HaBa set: it has no bases "
                         "apart from its images; drop --bases-only")
    if getattr(syn, "label_logits", None) is not None:
        raise ValueError(f"--bases-only: {checkpoint} learns soft labels, which its bases alone would not train on; "
                         "drop --bases-only")
    if syn.bases.shape[1] != syn.channels:
        raise ValueError(f"--bases-only: {checkpoint} has {syn.bases.shape[1]}-channel bases for {syn.channels}-"
                         "channel samples; only its hallucinators make images of them")


def bases_only(syn, checkpoint):
    """``(images [K*bpc, C, H, W], labels [K*bpc])``: a HaBa set's bases as a training set of their own, one image
    per basis (an ablation: what the hallucinators add); refused as :func:`check_bases_only` says."""
    check_bases_only(syn, checkpoint)
    return syn.bases.detach().clone(), syn.base_labels.clone()


def _refuse_idle_flags(args: argparse.Namespace) -> None:
    """Refuse the flags that would do nothing with the rest of the command line, each with the reason."""
    if args.checkpoint is not None:
        if args.ipc is not None:
            raise ValueError("--ipc sizes a --baseline coreset; a CHECKPOINT has its own size: drop --ipc")
        if args.herding_features is not None:
            raise ValueError("--herding-features chooses how a --baseline herding / kcenter coreset is picked; it does "
                             "nothing for a CHECKPOINT: drop it")
        refuse_reference_flags(args.checkpoint, it=args.it, num_classes=args.num_classes)
    else:
        if args.herding_features is not None and args.baseline == "random":
            raise ValueError("--herding-features chooses how a herding / kcenter coreset is picked; --baseline random "
                             "uses no features: drop it")
        for flag, value in (("--it", args.it), ("--num-classes", args.num_classes)):
            if value is not None:
                raise ValueError(f"{flag} reads a reference checkpoint; --baseline evaluates a coreset: drop {flag}")
        if args.bases_only:
            raise ValueError("--bases-only takes a HaBa set's bases; a --baseline coreset has none: drop --bases-only")
    if args.dsa is False and args.dsa_strategy not in (None, "none"):
        raise ValueError(f"--dsa-strategy {args.dsa_strategy} chooses the augmentation that --no-dsa (--dsa False) "
                         "turns off: drop one of them")


def warn_unknown_lr(checkpoint) -> None:
    """Say that ``checkpoint`` records no learned lr, so its networks train at the default 0.01 (the reference's
    distill.py / distill_fac.py save none: wandb logs it as Synthetic_LR)."""
    from haba_fast.dist import print_main
    from haba_fast.evaluate import DEFAULT_EVAL_LR

    print_main(f"haba-fast eval: warning: {checkpoint} records no learned lr (the reference's scripts save none; "
               f"wandb logs it as Synthetic_LR): training at {DEFAULT_EVAL_LR:g}; give --lr to evaluate as the run "
               "did", file=sys.stderr)


def recorded_run(recorded: dict):
    """The DistillConfig a set of ours records (``meta["config"]``), validated; None, with a warning, where it cannot
    be read (a later version's setting, a corrupt value)."""
    from haba_fast.dist import print_main
    from haba_fast.distill import DistillConfig

    try:
        return DistillConfig.from_dict(recorded).validate()
    except (TypeError, ValueError, AttributeError) as e:
        print_main(f"haba-fast eval: warning: the run's settings could not be read ({e}); evaluating with the "
                   "command's defaults", file=sys.stderr)
        return None


def adopt_run_protocol(cfg, run, given: dict, *, dsa_strategy, batch_standardize) -> None:
    """Set ``cfg``'s protocol to ``run`` (the EvalConfig the set's run evaluated with: ``distill.eval_config``)
    wherever no flag was given: ``given`` (the :data:`COMMAND_DEFAULTS` keys given), ``dsa_strategy`` and
    ``batch_standardize`` (None: not given). DC's augmentation (MNIST / ConvNetBN networks, their epochs) is taken
    where DSA is not given; its epochs unless ``--epochs`` is."""
    for key in COMMAND_DEFAULTS:
        if key not in given:
            setattr(cfg, key, getattr(run, key))
    if dsa_strategy is None:
        cfg.dsa_strategy = run.dsa_strategy
    if "dsa" not in given:
        cfg.dc_aug_dataset = run.dc_aug_dataset
    if "epochs" not in given:
        cfg.dc_aug_epochs = run.dc_aug_epochs
    if batch_standardize is None:
        cfg.batch_standardize = run.batch_standardize


def protocol_text(cfg) -> str:
    """``cfg``'s protocol in words: networks x epochs (per architecture where DC's augmentation changes them),
    batch, augmentation, standardization."""
    from haba_fast.training import dsa_enabled

    epochs = {m: cfg.epochs_for(m) for m in cfg.models}
    odd = {m: e for m, e in epochs.items() if e != cfg.epochs}
    epochs_text = f"{cfg.epochs} epochs" + (f" ({', '.join(f'{m} {e}' for m, e in odd.items())})" if odd else "")
    augmented = [m for m in cfg.models if cfg.dc_aug_for(m) != "none"]
    augmentation = (f"DSA {cfg.dsa_strategy}" if dsa_enabled(cfg.dsa, cfg.dsa_strategy)
                    else f"DC's augmentation ({', '.join(augmented)})" if augmented else "no augmentation")
    return (f"{cfg.num_eval} networks x {epochs_text} per model, batch {cfg.batch_size}, {augmentation}"
            + (", batches standardized" if cfg.batch_standardize else ""))

def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a synthetic set or a coreset baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from haba_fast import data, dist
    from haba_fast.distill import eval_config
    from haba_fast.evaluate import (
        EvalConfig,
        coreset,
        eval_pool,
        evaluate_synthetic,
        pool_reference,
        resolve_lr,
        split_models,
    )

    dist.init_from_env(args.device)  # under torchrun: the runs are spread over the processes

    if (args.checkpoint is None) == (args.baseline is None):
        raise ValueError(
            f"give a CHECKPOINT to evaluate, or --baseline {'|'.join(CORESET_METHODS)} with --ipc N (not both)"
        )
    if args.baseline is not None and (args.ipc is None or args.ipc < 1):
        raise ValueError("--baseline needs --ipc N (images per class, N >= 1)")
    if args.models is not None and args.eval_mode is not None:
        raise ValueError("give --models or --eval_mode, not both")
    _refuse_idle_flags(args)
    given = {key: getattr(args, key) for key in COMMAND_DEFAULTS if getattr(args, key) is not None}
    if args.dsa_strategy not in (None, "none"):
        given.setdefault("dsa", True)  # a strategy asks for DSA, whatever the run did
    settings = {**COMMAND_DEFAULTS, **given}  # the run's protocol replaces the defaults below, where recorded
    cfg = EvalConfig(
        models=("ConvNet",),  # replaced below, once the checkpoint's training model is known
        num_eval=settings["num_eval"],
        epochs=settings["epochs"],
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=settings["batch_size"],
        dsa=settings["dsa"],
        dsa_strategy=args.dsa_strategy or DEFAULT_DSA_STRATEGY,
        lr_schedule=args.lr_schedule,
        batch_standardize=bool(args.batch_standardize),
        device=args.device,
    )
    cfg.validate()  # the settings, before anything is loaded (the models are checked again once chosen)
    g = torch.Generator().manual_seed(args.seed)

    syn, meta, label = None, {}, None
    if args.checkpoint is not None:
        from haba_fast.factorization import load_synthetic

        it = args.it or "best"
        it = int(it) if it.isdigit() else it
        kwargs = {"it": it}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        syn = load_synthetic(args.checkpoint, **kwargs)
        check_num_classes_used(args.checkpoint, args.num_classes, syn)
        if args.bases_only:
            check_bases_only(syn, args.checkpoint)  # refused now, before the data is read
        meta = dict(getattr(syn, "meta", None) or {})
        label = type(syn).__name__
        if args.lr is None and meta.get("lr") is None:
            warn_unknown_lr(args.checkpoint)
    if args.batch_standardize is None:  # HaBa's evaluation standardizes; MTT's (pixels) and the coresets' do not
        cfg.batch_standardize = syn is not None and bool(getattr(syn, "n_hallucinators", 0))
    recorded = meta.get("config") if isinstance(meta.get("config"), dict) else {}  # the distillation's settings
    dataset_name = args.dataset or meta.get("dataset") or "digits"
    run_cfg = recorded_run(recorded) if recorded else None
    # The protocol the run evaluated with; a run that evaluated nothing (the demo, the table's cells: evaluated
    # apart) has none.
    run_eval = eval_config(run_cfg, dataset_name=dataset_name) if run_cfg is not None and run_cfg.num_eval > 0 else None
    if run_eval is not None:
        adopt_run_protocol(cfg, run_eval, given, dsa_strategy=args.dsa_strategy,
                           batch_standardize=args.batch_standardize)
    if args.models is not None:
        cfg.models = split_models(args.models)
    elif run_eval is not None and args.eval_mode is None and args.model is None:
        cfg.models = run_eval.models
    else:
        # The pools of the code that distills such a set: a pixel set takes MTT's (trajectory matching, and MTT's
        # images_*.pt, which record no objective) or the DC/DSA/DM code's; HaBa sets and coresets HaBa's.
        pixels = syn is not None and not getattr(syn, "n_hallucinators", 0)
        cfg.models = eval_pool(args.eval_mode or "S", args.model or recorded.get("model") or "ConvNet",
                               pool_reference("pixels" if pixels else "haba", recorded.get("objective", "mtt")))
    cfg.validate()
    if args.dc_aug:
        cfg.dc_aug_dataset = dataset_name
        cfg.validate()  # DC's augmentation needs --no-dsa
        if all(cfg.dc_aug_for(m) == "none" for m in cfg.models):
            raise ValueError(f"--dc-aug does nothing for {', '.join(cfg.models)} on {dataset_name}: DC's get_daparam "
                             "augments MNIST and ConvNetBN evaluations only; drop it")
    if run_eval is not None:
        dist.print_main(f"haba-fast eval: as its run evaluated it: {protocol_text(cfg)} (flags given win)",
                        file=sys.stderr)
    zca = args.zca if args.zca is not None else bool(meta.get("zca"))
    data_path = args.data_path
    if data_path is None and run_cfg is not None and run_cfg.data_path is not None and (
        args.dataset is None
        or data.canonical_name(args.dataset) == data.canonical_name(meta.get("dataset") or run_cfg.dataset)
    ):
        data_path = run_cfg.data_path  # the folder the run read this dataset from
    try:
        ds = data.load(
            dataset_name,
            data_path,
            zca=zca,
            subset_per_class=args.subset_per_class,
            generator=torch.Generator().manual_seed(args.seed),
            statistics=data.statistics_for(recorded.get("objective", "mtt")),  # the statistics it was distilled in
        )
    except FileNotFoundError as e:
        if args.data_path is None and data_path is not None:
            raise FileNotFoundError(f"{e} (the folder its run read {dataset_name} from, as the set records: give "
                                    "--data_path)") from None
        raise
    if meta.get("zca") is not None and "mean" not in meta and data.zca_of_normalized(ds):
        # Our files record mean/std since MNIST / Fashion-MNIST ZCA whitens normalized images (the reference's
        # order, 2026-12-03); one without them was whitened from [0, 1] pixels: another space than this data's.
        raise ValueError(
            f"{args.checkpoint} was distilled on {dataset_name} whitened from [0, 1] pixels (before 2026-12-03); "
            "its ZCA now whitens the normalized images, as the reference does: distill it again"
        )
    # A reference checkpoint does not record K (load_synthetic assumed 10): use the dataset's.
    if (
        syn is not None
        and args.num_classes is None
        and "dataset" not in meta
        and getattr(syn, "num_classes", ds.num_classes) != ds.num_classes
    ):
        syn = load_synthetic(args.checkpoint, it=kwargs["it"], num_classes=ds.num_classes)
    if args.bases_only:
        cfg.lr = resolve_lr(syn, cfg.lr, None)  # the rate the whole set would train at (its learned lr)
        syn, label = bases_only(syn, args.checkpoint), f"{label} bases only"
    if syn is None:
        syn = coreset(ds, args.ipc, args.baseline, generator=g, features=args.herding_features or "embedding")
        label = f"{args.baseline} coreset ipc {args.ipc}"
    progress = not args.quiet and not args.json and dist.is_main()
    result = evaluate_synthetic(syn, ds, cfg, generator=g, progress=progress, label=label)
    if args.json:
        out = result.to_dict()
        out["dataset"] = ds.name
        out["checkpoint"] = args.checkpoint
        out["processes"] = dist.world_size()
        dist.print_main(json.dumps(out, indent=1))
    else:
        dist.print_main(f"dataset {ds.name}: {protocol_text(cfg)}, lr {result.lr:g}"
                        + (f" ({dist.world_size()} processes)" if dist.world_size() > 1 else ""))
        dist.print_main(result.table())
    return 0
