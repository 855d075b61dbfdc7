"""HaBa against its pixel baseline over table replicates (``haba-fast table --seed N``): is the difference real?

Reads the committed cell JSONs of the quick protocol (seed 0: ``bench/results/<dataset>_cells.json``; seed N:
``bench/results/<dataset>-quick-seedN_cells.json``), pairs each HaBa cell with its pixel cell of the same seed and
IPC, and writes every seed's figures and the mean ± sample std of the paired differences over the seeds to
``bench/results/<dataset>_replicates.json`` (and prints a markdown table). A seed changes the experts, the
distillations and the evaluation networks; the train/validation split stays.

``--haba-set TAG`` takes the HaBa cells from the table's runs with those HaBa settings instead (``haba-fast table
--haba-set dc:lr_style=0.1`` writes ``<dataset>-quick-dc.lr_style=0.1_cells.json`` and, per replicate,
``<dataset>-quick-seedN-dc.lr_style=0.1_cells.json``; TAG is the part after ``quick[-seedN]-``), still paired with
the protocol's pixel cells of the same seed, and writes ``<dataset>_replicates-<TAG>.json``.

    python bench/seed_replicates.py [--dataset fashion_mnist] [--pairs mtt:haba-mtt dm:haba-dm ...] [--ipc 10]
                                    [--haba-set dc.lr_style=0.1]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from haba_fast.table import mean_and_sample_std

RESULTS = Path(__file__).resolve().parent / "results"


def seed_files(dataset: str, tag: str | None = None) -> dict[int, Path]:
    """Seed -> the cell JSON holding that seed's quick-protocol cells (with HaBa settings ``tag``, if given)."""
    files = {0: RESULTS / (f"{dataset}_cells.json" if tag is None else f"{dataset}-quick-{tag}_cells.json")}
    suffix = "" if tag is None else f"-{tag}"
    for path in sorted(RESULTS.glob(f"{dataset}-quick-seed*_cells.json")):
        match = re.fullmatch(rf"{re.escape(dataset)}-quick-seed(\d+){re.escape(suffix)}_cells\.json", path.name)
        if match:
            files[int(match.group(1))] = path
    return {s: p for s, p in sorted(files.items()) if p.exists()}


def cells_of(path: Path) -> dict[str, dict]:
    return {c["key"]: c for c in json.loads(path.read_text())["cells"] if c.get("mean") is not None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist", help="the cell JSONs' dataset prefix (default fashion_mnist)")
    p.add_argument("--pairs", nargs="+", default=[f"{o}:haba-{o}" for o in ("mtt", "dm", "dc", "dsa")],
                   help="PIXEL_ROW:HABA_ROW pairs (default: every objective)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--haba-set", dest="tag", default=None,
                   help="HaBa cells from the table runs with these settings, e.g. dc.lr_style=0.1 (see above)")
    p.add_argument("--out", default=None, help="JSON to write (default bench/results/<dataset>_replicates.json, "
                                               "with --haba-set <dataset>_replicates-<TAG>.json)")
    args = p.parse_args(argv)
    files = seed_files(args.dataset)
    haba_files = files if args.tag is None else seed_files(args.dataset, args.tag)
    if not files or not haba_files:
        what = args.dataset if args.tag is None else f"{args.dataset} with HaBa settings {args.tag}"
        print(f"no cell JSONs for {what} in {RESULTS}", file=sys.stderr)
        return 2

    def names(group: dict[int, Path]) -> dict[int, str]:
        return {s: str(f.relative_to(RESULTS.parent.parent)) for s, f in group.items()}

    report = {"dataset": args.dataset, "ipc": args.ipc, "haba_settings": args.tag, "files": names(files),
              "haba_files": names(haba_files), "pairs": []}
    lines = ["| pixels vs HaBa | seed | pixels (%) | HaBa (%) | HaBa − pixels |", "|---|---|---|---|---|"]
    # Each file read once: (pixel cells, HaBa cells) per seed that has both files.
    by_seed = {}
    for seed in files.keys() & haba_files.keys():
        pixel_cells = cells_of(files[seed])
        by_seed[seed] = (pixel_cells, pixel_cells if args.tag is None else cells_of(haba_files[seed]))
    for pair in args.pairs:
        pixel_row, haba_row = pair.split(":")
        seeds = []
        for seed, (pixel_cells, haba_cells) in sorted(by_seed.items()):
            a = pixel_cells.get(f"ipc{args.ipc}-{pixel_row}")
            b = haba_cells.get(f"ipc{args.ipc}-{haba_row}")
            if a is None or b is None:
                continue
            seeds.append({"seed": seed, "pixels": a["mean"], "haba": b["mean"], "difference": b["mean"] - a["mean"],
                          "pixels_networks": a["accuracies"], "haba_networks": b["accuracies"]})
            lines.append(f"| {pixel_row} vs {haba_row} | {seed} | {100 * a['mean']:.2f} | {100 * b['mean']:.2f} | "
                         f"{100 * (b['mean'] - a['mean']):+.2f} |")
        if not seeds:
            continue
        spread = len(seeds) > 1  # one seed has no spread (a sample std needs two): its stds are null
        diff_m, diff_s = mean_and_sample_std([s["difference"] for s in seeds])
        pix_m, pix_s = mean_and_sample_std([s["pixels"] for s in seeds])
        hab_m, hab_s = mean_and_sample_std([s["haba"] for s in seeds])
        summary = {"pixel_row": pixel_row, "haba_row": haba_row, "seeds": seeds, "n": len(seeds),
                   "pixels_mean": pix_m, "pixels_std": pix_s if spread else None, "haba_mean": hab_m,
                   "haba_std": hab_s if spread else None, "difference_mean": diff_m,
                   "difference_std": diff_s if spread else None,
                   "difference_sem": diff_s / math.sqrt(len(seeds)) if spread else None,
                   "haba_ahead": sum(s["difference"] > 0 for s in seeds)}
        report["pairs"].append(summary)
        if not spread:
            lines.append(f"| {pixel_row} vs {haba_row} | one seed only: no mean ± std | | | |")
            continue
        lines.append(f"| {pixel_row} vs {haba_row} | mean ± std over {len(seeds)} | {100 * pix_m:.2f} ± "
                     f"{100 * pix_s:.2f} | {100 * hab_m:.2f} ± {100 * hab_s:.2f} | {100 * diff_m:+.2f} ± "
                     f"{100 * diff_s:.2f} (HaBa ahead in {summary['haba_ahead']} of {len(seeds)}) |")
    tag = "" if args.tag is None else f"-{args.tag}"
    out = Path(args.out) if args.out else RESULTS / f"{args.dataset}_replicates{tag}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
