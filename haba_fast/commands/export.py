"""``haba-fast export CHECKPOINT --out DIR``: pictures and plain arrays of a synthetic set.

Writes into DIR:
  grid.png      HaBa: a row block of bases, then one block per hallucinator; pixels: the images by class
  samples.pt    {"images" [N, C, H, W] float32, "labels" [N] int64, ...} in network space
                (HaBa: all basis x hallucinator pairs, row b*Hn + h; plus "base_idx", "hall_idx")
  samples.npz   the same images and labels as numpy arrays (+ "pixels" in [0, 1] when the
                normalization is known)

CHECKPOINT is our .pt file, a reference run directory (images_<it>.pt with weights_best.pt /
styles_<it>.pt, or labels_<it>.pt for pixels), or a reference images_<it>.pt file; or give the
reference files explicitly with --reference-images/--reference-styles.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser("export", help="PNG grid + samples.pt/.npz of a synthetic set", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="our .pt checkpoint, or a reference directory / images_<it>.pt")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--reference-images", help="reference images_<it>.pt (bases, or MTT pixels)")
    parser.add_argument("--reference-styles", help="reference styles_<it>.pt / weights_best.pt (HaBa hallucinators)")
    parser.add_argument("--reference-labels", help="MTT labels_<it>.pt (pixels)")
    parser.add_argument("--it", default=None, help="iteration to read from a reference directory (default: best)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes of a reference checkpoint (not stored there; default 10)")
    parser.add_argument("--denormalize-dataset", metavar="NAME", default=None,
                        help="undo this dataset's normalization for the PNG (mnist, fashion-mnist, cifar10, cifar100, "
                             "svhn, or any haba_fast.data name; after the inverse of a recorded ZCA, its mean/std); "
                             "default: the checkpoint's recorded ZCA, mean/std or dataset, else per-image min-max")
    parser.add_argument("--ncol", type=int, default=None, help="images per row of the PNG")
    parser.set_defaults(func=run)


def _load(args):
    from haba_fast.commands.eval import check_num_classes_used, refuse_reference_flags
    from haba_fast.factorization import HaBa, Pixels, load_synthetic

    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
    given = [a for a in ("reference_images", "reference_styles", "reference_labels") if getattr(args, a)]
    if given:
        if args.checkpoint:
            raise ValueError("give either CHECKPOINT or --reference-images/--reference-styles, not both")
        if not args.reference_images:
            raise ValueError("--reference-styles/--reference-labels need --reference-images")
        if args.it is not None:
            raise ValueError("--it picks the iteration in a reference run folder; --reference-images names the files "
                             "of one iteration: drop --it")
        if args.reference_styles:
            return HaBa.from_reference(args.reference_images, args.reference_styles,
                                       10 if args.num_classes is None else args.num_classes)
        if args.reference_labels or args.num_classes is not None:
            return Pixels.from_reference(args.reference_images, args.reference_labels, num_classes=args.num_classes)
        raise ValueError("--reference-images alone is ambiguous: add --reference-styles (HaBa), "
                         "--reference-labels or --num-classes (pixels)")
    if not args.checkpoint:
        raise ValueError("give a CHECKPOINT (our .pt file or a reference directory) or --reference-images")
    refuse_reference_flags(args.checkpoint, it=args.it, num_classes=args.num_classes)
    it = args.it or "best"
    syn = load_synthetic(args.checkpoint, it=int(it) if it.isdigit() else it, num_classes=args.num_classes)
    check_num_classes_used(args.checkpoint, args.num_classes, syn)
    return syn


def _dataset_stats(name: str):
    """(mean, std) the dataset ``name`` is normalized with: the reference's constants, else haba_fast.data's."""
    from haba_fast import data

    key = str(name).strip().lower().replace("-", "").replace("_", "")
    for known, stats in data.REFERENCE_STATS.items():
        if key == known.replace("-", ""):
            return stats
    ds = data.load(name)  # e.g. digits: its normalization is ours, read it from the loaded dataset
    return tuple(ds.mean), tuple(ds.std)


def _denormalizer(syn, dataset_name):
    """A callable network-space -> [0, 1], or None (per-image min-max) when the normalization is unknown.

    Order: a recorded ZCA (inverted, then --denormalize-dataset's or else the recorded mean/std);
    --denormalize-dataset; the recorded mean/std; the recorded dataset name.
    """
    from haba_fast import visualize

    meta = getattr(syn, "meta", {}) or {}
    if meta.get("zca") is not None:
        # The inverse ZCA, then the recorded mean/std: identity except for MNIST / Fashion-MNIST, which the
        # reference normalizes before its ZCA (files without a recorded mean/std were whitened from [0, 1] pixels).
        try:
            from haba_fast.data import ZCA

            inverse = ZCA.from_state_dict(meta["zca"]).inverse
        except Exception as exc:  # noqa: BLE001 - a state we cannot read must not stop the export
            print(f"note: cannot undo the recorded ZCA whitening ({type(exc).__name__}: {exc}); "
                  "the PNG uses per-image min-max")
            return None
        if dataset_name:
            stats = visualize.denormalizer(*_dataset_stats(dataset_name))
        elif meta.get("mean") is None or meta.get("std") is None:
            return inverse
        else:
            stats = visualize.denormalizer(list(meta["mean"]), list(meta["std"]))
        return lambda x: stats(inverse(x))
    if dataset_name:
        return visualize.denormalizer(*_dataset_stats(dataset_name))
    if meta.get("mean") is not None and meta.get("std") is not None:
        return visualize.denormalizer(list(meta["mean"]), list(meta["std"]))
    if meta.get("dataset"):
        try:
            return visualize.denormalizer(*_dataset_stats(meta["dataset"]))
        except (ValueError, FileNotFoundError) as exc:
            print(f"note: normalization of dataset {meta['dataset']!r} unknown ({exc}); the PNG uses per-image min-max")
    return None


def run(args) -> int:
    import numpy as np
    import torch

    from haba_fast import io as hio
    from haba_fast import visualize
    from haba_fast.factorization import HaBa

    if args.ncol is not None and args.ncol <= 0:
        raise ValueError(f"--ncol must be a positive int, got {args.ncol}")
    syn = _load(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    hio.check_writable(out, what="--out folder")
    denorm = _denormalizer(syn, args.denormalize_dataset)

    with torch.no_grad():
        samples = {}
        if isinstance(syn, HaBa):
            images, labels = syn.all_pairs()
            b, h = syn.pair_indices()
            samples.update(base_idx=b.cpu(), hall_idx=h.cpu())
            visualize.haba_grid(syn, out / "grid.png", denormalize=denorm, ncol=args.ncol)
        else:
            images, labels = syn.materialize()
            ncol = args.ncol or min(syn.ipc * syn.num_classes, max(syn.ipc, 10))
            visualize.save_grid(visualize.to_unit(images, denorm), out / "grid.png", nrow=ncol)
    images = images.detach().float().cpu()
    labels = labels.cpu().long()
    samples.update(images=images, labels=labels, kind=syn.kind, meta=getattr(syn, "meta", {}))

    from haba_fast.factorization import _check_meta, _to_cpu

    try:
        _check_meta(samples["meta"])
    except TypeError:
        samples["meta"] = {}
    hio.atomic_torch_save(_to_cpu(samples), out / "samples.pt")
    arrays = {"images": images.numpy(), "labels": labels.numpy()}
    if denorm is not None:
        arrays["pixels"] = visualize.to_unit(images, denorm).numpy()
    with hio.atomic_path(out / "samples.npz") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, **arrays)

    print(f"{type(syn).__name__}: {syn.storage()}")
    print(f"wrote {out / 'grid.png'}, {out / 'samples.pt'}, {out / 'samples.npz'} ({images.shape[0]} samples)")
    return 0
