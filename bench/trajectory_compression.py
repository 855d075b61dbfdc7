"""How far lossless compression of the stored weight trajectory could flatten budget 0's memory in syn_steps.

    python bench/trajectory_compression.py [--steps 10] [--lrs 0.01 0.03 0.1] [--json PATH]

At ``--memory-budget 0`` the exact engine stores every w_t (N + 1 flat float32 vectors): that, and nothing else, is
what grows with ``--syn_steps`` (bench/results/MEMORY_BUDGET.md). Exact reversal needs each w_t bit for bit, so the
only way to store less without recomputing is lossless coding. This estimates what such coding could do on the
benchmark's network: SGD steps of ConvNet-128 on a CIFAR-shaped batch of 100 (random images, as
``haba-fast bench iteration``), and for each step the XOR of w_{t+1}'s and w_t's float32 bit patterns (what a
reversible store would keep), split into its four byte planes. Per plane: the empirical (order-0) byte entropy,
bits per byte, the rate of a coder that sees each byte alone (an estimate, not a bound: context across bytes could
do somewhat better), and zlib's level-1 size. Printed and written: bits per weight, the ideal and the zlib
compression ratios, and the peak-RSS ratio at syn_steps 80 / 10 each would give, from the budget-0 peaks measured
in MEMORY_BUDGET.md (912 MB at 10 steps, 1.22 MB per w_t).
"""

from __future__ import annotations

import argparse
import json
import zlib

import torch
from torch.func import functional_call

PEAK_AT_10_MB = 912.0  # budget 0, bpc 10, batch 100, syn_steps 10 (MEMORY_BUDGET.md)
VECTOR_MB = 1.22  # one flat ConvNet-128 weight vector at 32x32, float32


def byte_entropy(plane: torch.Tensor) -> float:
    """Empirical entropy of a uint8 tensor, bits per byte."""
    counts = torch.bincount(plane.flatten().long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def rss_ratio(bits_per_weight: float) -> float:
    """Peak RSS at syn_steps 80 over syn_steps 10 if every w_t but w_0 were stored at ``bits_per_weight``."""
    v = VECTOR_MB * bits_per_weight / 32.0
    fixed = PEAK_AT_10_MB - 11 * VECTOR_MB
    return (fixed + VECTOR_MB + 80 * v) / (fixed + VECTOR_MB + 10 * v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    ap.add_argument("--json", default="bench/results/trajectory_compression.json")
    args = ap.parse_args()

    from haba_fast.models import get_network
    from haba_fast.timing import write_bench_json

    torch.manual_seed(0)
    net = get_network("ConvNet", 3, 10, (32, 32))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    w0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))

    def grad(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_(True)
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = w[i:i + s.numel()].view(s)
            i += s.numel()
        loss = torch.nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
        return torch.autograd.grad(loss, w)[0]

    rows = []
    for lr in args.lrs:
        w, ent, zsize = w0.clone(), [0.0] * 4, 0
        for _ in range(args.steps):
            nxt = (w - lr * grad(w)).detach()
            planes = (nxt.view(torch.int32) ^ w.view(torch.int32)).view(torch.uint8).view(-1, 4)
            for b in range(4):
                ent[b] += byte_entropy(planes[:, b]) / args.steps
            zsize += len(zlib.compress(planes.t().contiguous().numpy().tobytes(), 1))
            w = nxt
        bits = sum(ent)
        zbits = 8.0 * zsize / (args.steps * w0.numel())
        rows.append({"lr": lr, "entropy_bits_per_byte_plane": [round(e, 3) for e in ent],
                     "ideal_bits_per_weight": round(bits, 2), "ideal_ratio": round(32 / bits, 3),
                     "zlib_bits_per_weight": round(zbits, 2), "zlib_ratio": round(32 / zbits, 3),
                     "rss_ratio_80_over_10_ideal": round(rss_ratio(bits), 4),
                     "rss_ratio_80_over_10_zlib": round(rss_ratio(zbits), 4)})
        print(json.dumps(rows[-1]))
    command = "python bench/trajectory_compression.py " + " ".join(
        [f"--steps {args.steps}", "--lrs", *map(str, args.lrs)])
    out = write_bench_json(args.json, command, params=int(w0.numel()),
                           uncompressed_rss_ratio_80_over_10=round(rss_ratio(32.0), 4), rows=rows)
    print(f"uncompressed: {out['uncompressed_rss_ratio_80_over_10']}; written {args.json}")


if __name__ == "__main__":
    main()
