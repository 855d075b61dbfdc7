"""Where the time of one fused generate+augment step goes on a GPU: torch.profiler tables and launch/sync counts.

    python bench/profile_genaug.py [--batch 4096] [--family color] [--device cuda]

Prints the median wall time of the step with the hallucinator-gradient reduction done both ways (one-hot GEMM,
the default for few segments, and the sorted two-stage Triton reduction), then one profiled run: the kernels by
GPU time, the host-side ops by CPU time, and how many kernel launches, host<->device copies and synchronizations
one step makes. Not a benchmark of record (bench/run_genaug.sh is): a map for the next optimization.
"""

from __future__ import annotations

import argparse
import collections

import haba_fast.kernels.generate as kgen
import torch
from torch.profiler import ProfilerActivity, profile

from haba_fast.augment import sample
from haba_fast.benchmarks.genaug import _PARAM_NAMES, fused_step, make_problem
from haba_fast.timing import measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--family", default="color")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    problem = make_problem(args.batch, 32, 3, 3, 3, 5, 100, device, torch.float32)
    leaves = [problem[k].clone().requires_grad_(True) for k in _PARAM_NAMES]
    gen = torch.Generator().manual_seed(1)
    aug = sample(args.family, args.batch, (32, 32), generator=gen).to(device)
    grad_out = torch.randn((args.batch, 3, 32, 32), generator=gen).to(device)

    def step():
        return fused_step(problem, leaves, aug, grad_out, args.backend)

    for label, cap in (("onehot reduction", kgen.ONEHOT_MAX_SEGMENTS), ("sorted reduction", 0)):
        kgen.ONEHOT_MAX_SEGMENTS = cap
        t = measure(step, warmup=3, repeats=20, device=device)
        print(f"{label}: median {t.median * 1e3:.3f} ms, min {t.min * 1e3:.3f} ms per fwd+bwd step")
    kgen.ONEHOT_MAX_SEGMENTS = 64

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ka = prof.key_averages()
    sort_gpu = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n== {args.steps} steps, by GPU time ==")
    print(ka.table(sort_by=sort_gpu, row_limit=25, max_name_column_width=60))
    print(f"\n== {args.steps} steps, by CPU time ==")
    print(ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    counts = collections.Counter()
    for e in ka:
        name = e.key
        for key in ("LaunchKernel", "Synchronize", "Memcpy", "cuModuleLoad", "Malloc"):
            if key in name:
                counts[name] += e.count
    print(f"\n== runtime calls per step (of {args.steps}) ==")
    for name, c in sorted(counts.items()):
        print(f"{name}: {c / args.steps:.1f}")


if __name__ == "__main__":
    main()
