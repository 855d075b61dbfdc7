"""What the C++ buffer cache saves a network's training on the CPU (train_network and its test pass).

    python bench/train_buffers.py [--rounds 3] [--epochs 30] [--threads 1] [--json bench/results/train_buffers.json]

``haba_fast.training.train_network`` and ``evaluate_loss_accuracy`` hold ``haba_fast._ext.BatchBuffers`` over their
batches: with the cache switched on (``HABA_FAST_BUFFER_CACHE=1``, the CLI's default) every batch's large blocks
(activations, their gradients, the augmented batch) come back from the cache instead of as fresh pages, which glibc
maps and unmaps for every block this large (a page fault and a zeroing per 4 KiB). Each row is one fresh process: a
ConvNet-128 trained with DSA on a synthetic set (``WORKLOADS``: 100 or 500 random images for ``--epochs`` epochs or
a fifth of them; the evaluation protocol's inner loop), then tested on 2,000 images; cache on and off alternate
round by round so that they see the same machine load. Reported per row: CPU seconds of the training + test (one
torch thread), minor page faults, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# (name, channels, image size, samples per epoch, epochs as a fraction of --epochs): the Fashion-MNIST and CIFAR
# shapes of the evaluation protocol with 10 images per class (one batch an epoch), and CIFAR with 500 samples (a HaBa
# set of 10 bases per class x 5 hallucinators: a full batch of 256 and a ragged one of 244 each epoch).
WORKLOADS = [("fashion_mnist", 1, 28, 100, 1.0), ("cifar", 3, 32, 100, 1.0), ("cifar_500", 3, 32, 500, 0.2)]

_CHILD = r"""
import json, sys, time, warnings
import torch
from haba_fast import timing
from haba_fast._ext import extension_available
from haba_fast.models import get_network
from haba_fast.training import train_network

warnings.filterwarnings("ignore")
channels, size, n, epochs, threads = (int(a) for a in sys.argv[1:6])
torch.set_num_threads(threads)
ok = extension_available()
g = torch.Generator().manual_seed(0)
x = torch.randn(n, channels, size, size, generator=g)
y = torch.arange(n) % 10
xt = torch.randn(2000, channels, size, size, generator=g)
yt = torch.randint(0, 10, (2000,), generator=g)
net = get_network("ConvNet", channels, 10, (size, size), generator=torch.Generator().manual_seed(0))
f0, c0, t0 = timing.minor_faults(), time.process_time(), time.perf_counter()
h = train_network(net, x, y, epochs=epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, generator=g, test_data=(xt, yt),
                  test_every=0)
print(json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
                  "minor_faults": timing.minor_faults() - f0, "peak_rss_mb": timing.peak_rss_mb(),
                  "extension": ok, "final_loss": h.epochs[-1].loss, "test_accuracy": h.epochs[-1].test_accuracy}))
"""


def run_row(name: str, channels: int, size: int, n: int, epochs: int, threads: int, cache: str) -> dict:
    env = dict(os.environ, HABA_FAST_BUFFER_CACHE=cache)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(channels), str(size), str(n), str(epochs), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(workload=name, cache=cache == "1", samples=n, epochs=epochs, threads=threads)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows and the summary here (haba_fast.timing)")
    args = p.parse_args()
    rows = []
    for r in range(args.rounds):
        for name, channels, size, n, share in WORKLOADS:
            epochs = max(1, round(args.epochs * share))
            for cache in ("0", "1") if r % 2 == 0 else ("1", "0"):
                row = run_row(name, channels, size, n, epochs, args.threads, cache)
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for name, *_ in WORKLOADS:
        on = [r for r in rows if r["workload"] == name and r["cache"]]
        off = [r for r in rows if r["workload"] == name and not r["cache"]]
        med = {
            k: (statistics.median(r[k] for r in on), statistics.median(r[k] for r in off))
            for k in ("cpu_s", "minor_faults", "peak_rss_mb")
        }
        same = all(a["final_loss"] == b["final_loss"] for a, b in zip(on, off))
        summary[name] = {
            "cpu_s_on": med["cpu_s"][0],
            "cpu_s_off": med["cpu_s"][1],
            "cpu_ratio_on_off": med["cpu_s"][0] / med["cpu_s"][1],
            "minor_faults_on": med["minor_faults"][0],
            "minor_faults_off": med["minor_faults"][1],
            "peak_rss_mb_on": med["peak_rss_mb"][0],
            "peak_rss_mb_off": med["peak_rss_mb"][1],
            "same_final_loss": same,
        }
        print(
            f"{name}: CPU s on / off (medians of {len(on)} / {len(off)}) {med['cpu_s'][0]:.2f} / {med['cpu_s'][1]:.2f}"
            f" = {med['cpu_s'][0] / med['cpu_s'][1]:.3f}x; faults {med['minor_faults'][0]:.0f} / "
            f"{med['minor_faults'][1]:.0f}; peak RSS {med['peak_rss_mb'][0]:.0f} / {med['peak_rss_mb'][1]:.0f} MB; "
            f"same final loss: {same}"
        )
    if args.json:
        from haba_fast.timing import write_bench_json

        command = "python bench/train_buffers.py " + " ".join(sys.argv[1:])
        write_bench_json(args.json, command, rows=rows, summary=summary)


if __name__ == "__main__":
    main()
