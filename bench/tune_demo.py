"""Choose the digits demo's HaBa setting on a validation split; every trial goes to bench/results/demo_tuning.json.

    python bench/tune_demo.py    # every trial below; those already in the JSON (same split and settings) are reused

25 train images per class are held out (seed 0) as validation; the experts are trained and every trial distilled on
the other train images, and evaluated on the held-out ones (haba_fast.demo.tune). The test set is never read.
The trials were run in stages, each chosen after the previous one's validation figures (see docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys

from haba_fast.demo import DemoConfig, tune
from haba_fast.timing import environment

TRIALS = [
    # stage 1: pixel MTT at its demo setting, HaBa at the previous demo setting and with fewer hallucinators
    {"method": "pixels"},
    {"method": "haba", "n_hallucinators": 5, "haba_lr_img": 3.0, "haba_lr_style": 0.3},
    {"method": "haba", "n_hallucinators": 2, "haba_lr_img": 3.0, "haba_lr_style": 0.3},
    {"method": "haba", "n_hallucinators": 1, "haba_lr_img": 3.0, "haba_lr_style": 0.3},
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo_tune", help="experts and trial runs (default runs/demo_tune)")
    p.add_argument("--json", default="bench/results/demo_tuning.json", help="the trial log")
    p.add_argument("--val-per-class", type=int, default=25)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--num-eval", type=int, default=DemoConfig.num_eval)
    p.add_argument("--eval-epochs", type=int, default=DemoConfig.eval_epochs)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    demo = DemoConfig(out=a.out, num_eval=a.num_eval, eval_epochs=a.eval_epochs, progress=not a.no_progress)
    meta = {**environment(), "command": "python bench/tune_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rec = tune(TRIALS, demo, val_per_class=a.val_per_class, split_seed=a.split_seed, log_path=a.json, meta=meta)
    for i, t in enumerate(rec["trials"]):
        print(f"{i:2d} {t['method']:6s} {t['values']} val {100 * t['mean']:.2f} ± {100 * t['std']:.2f}")
    print("best:", {m: rec["trials"][i]["values"] for m, i in rec["best"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
