"""Pixel distillation with more iterations, on the validation split: the control for a HaBa trial that ran longer.

    python bench/fashion_pixel_iterations.py [--objective dm] [--iterations 1000] [--ipc 10]
                                             [--out runs/pixel-iterations]

A HaBa trial of ``haba-fast table --eval-split val`` may change its iterations (``--haba-set dm:iterations=1000``),
while the pixel row keeps the protocol's. Whether HaBa's gain then comes from the factorization or only from the
longer run is answered by giving the pixel row the same iterations: this runs that pixel cell under the quick
protocol with only the objective's iterations changed (protocol ``quick-<objective><iterations>``, stored apart).
``--eval-split val`` (default) evaluates on the validation split like every tuning trial and writes the record to
the tuning log ``--json``; ``--eval-split test`` evaluates the same set on the test split (the control for the test
figure of the chosen HaBa setting; nothing is chosen from it) and writes the cell JSON ``--json``. Resumable like
the table: a finished cell under ``--out`` is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from haba_fast import table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--objective", default="dm", choices=["dc", "dsa", "dm", "mtt"])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--out", default="runs/pixel-iterations")
    p.add_argument("--eval-split", choices=["val", "test"], default="val")
    p.add_argument("--json", default=None, help="default: bench/results/<dataset>_pixel_iterations.json (val), "
                   "bench/results/<dataset>_pixel_iterations_test.json (test), '-' in the name written '_'")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    try:
        protocol = table.PROTOCOLS["quick"].with_iterations(args.objective, args.iterations)
    except ValueError as e:
        p.error(str(e))
    suffix = "" if args.eval_split == "val" else "_test"
    out_json = Path(args.json or f"bench/results/{args.dataset.replace('-', '_')}_pixel_iterations{suffix}.json")
    written = {"tuning_json": out_json} if args.eval_split == "val" else {"cells_json": out_json}
    table.run_table(args.dataset, Path(args.out), protocol=protocol, ipcs=[args.ipc], rows=[args.objective],
                    eval_split=args.eval_split, cross=False, longer_check=False, threads=args.threads, **written)

if __name__ == "__main__":
    main()
