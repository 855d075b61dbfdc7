"""Pixel distillation with more iterations, on the validation split: the control for a HaBa trial that ran longer.

    python bench/fashion_pixel_iterations.py [--objective dm] [--iterations 1000] [--ipc 10]
                                             [--out runs/pixel-iterations]

A HaBa trial of ``haba-fast table --eval-split val`` may change its iterations (``--haba-set dm:iterations=1000``),
while the pixel row keeps the protocol's. Whether HaBa's gain then comes from the factorization or only from the
longer run is answered by giving the pixel row the same iterations: this runs that pixel cell under the quick
protocol with only the objective's iterations changed (protocol ``quick-<objective><iterations>``, stored apart),
evaluated on the validation split like every tuning trial, and writes its record (accuracies, seconds, protocol,
machine) to ``--json``. Resumable like the table: a finished cell under ``--out`` is reused.
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
    p.add_argument("--json", default="bench/results/fashion_mnist_pixel_iterations.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    try:
        protocol = table.PROTOCOLS["quick"].with_iterations(args.objective, args.iterations)
    except ValueError as e:
        p.error(str(e))
    table.run_table(args.dataset, Path(args.out), protocol=protocol, ipcs=[args.ipc], rows=[args.objective],
                    eval_split="val", tuning_json=Path(args.json), cross=False, longer_check=False,
                    threads=args.threads)


if __name__ == "__main__":
    main()
