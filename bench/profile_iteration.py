"""Where the time of one full HaBa iteration goes, per trajectory engine variant: torch.profiler kernel tables.

    python bench/profile_iteration.py --device cuda --ipc 50 --batch-syn 500 --syn-steps 30 \\
        --variants naive exact:0 exact:auto exact:auto:torch [--cudnn-benchmark]

A variant is ``ENGINE[:BUDGET[:BACKEND[:BLOCKS[:STEPS]]]]`` (budget 0 | auto | unlimited | 2GB, backend auto |
cpu | torch, blocks default | aten | triton: who runs the C++ op's norm/activation/pooling, ``--block-kernels``;
steps eager | graphs: the C++ op's steps replayed from CUDA graphs, ``--cuda-graphs``). For
each, in one process one after the other: the median wall time of ``Distiller.step()`` (after a warm-up), then
one profiled step: the kernels by GPU time (self time, top 20), the GPU time summed into convolution kernels and
the rest, and the GPU's busy fraction (summed kernel time / wall time: well below 1 means the host's launches are
the limit). Peak memory differs from the fresh-process rows of bench/run_iteration.sh (variants share the
process); this script is a map for the next optimization, not a benchmark of record.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from haba_fast.benchmarks.iteration import add_arguments, build_distiller
from haba_fast.ops import block_kernels
from haba_fast.timing import measure

# Kernel names of convolutions (cuDNN / CUTLASS implicit GEMM, im2col GEMMs on CPU).
_CONV_MARKERS = ("conv", "cudnn", "implicit", "xmma", "wgrad", "dgrad", "fprop", "sm90_", "sm80_", "cutlass", "gemm")


def _is_conv(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in _CONV_MARKERS)


def _variant_args(base: list[str], variant: str) -> argparse.Namespace:
    parts = variant.split(":")
    argv = list(base) + ["--engine", parts[0]]
    if len(parts) > 1:
        argv += ["--memory-budget", parts[1]]
    if len(parts) > 2:
        argv += ["--backend", parts[2]]
    if len(parts) > 3:
        argv += ["--block-kernels", parts[3]]
    if len(parts) > 4:
        if parts[4] not in ("eager", "graphs"):
            raise ValueError(f"variant {variant!r}: its fifth part is eager or graphs, got {parts[4]!r}")
        argv += ["--cuda-graphs"] if parts[4] == "graphs" else []
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def profile_variant(variant: str, base: list[str], repeats: int) -> None:
    args = _variant_args(base, variant)
    device = torch.device(args.device)
    try:
        with block_kernels(args.block_kernels):
            _profile(variant, build_distiller(args), device, repeats)
    finally:  # also after a failure (out of memory): the next variant starts from an empty cache and peak
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def _profile(variant: str, distiller, device: torch.device, repeats: int) -> None:
    t = measure(distiller.step, warmup=1, repeats=repeats, device=device)
    engine = distiller.engine
    stats = getattr(engine, "last_stats", {})
    backend = getattr(engine, "last_backend", None)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    print(
        f"\n===== {variant}: median {t.median:.4f} s, min {t.min:.4f} s per iteration; backend {backend}; "
        f"stored_steps {stats.get('stored_steps')}, recomputed {stats.get('recomputed_steps')}; "
        f"peak CUDA allocated (process so far) {peak:.0f} MB"
    )
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        distiller.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    if device.type != "cuda":
        print(ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
        return
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    conv_us = sum(e.time_range.elapsed_us() for e in kernels if _is_conv(e.name))
    print(
        f"profiled step: wall {wall:.4f} s; {len(kernels)} kernel launches; kernel time {total_us / 1e6:.4f} s "
        f"(GPU busy {total_us / 1e6 / wall:.2f}); convolution/GEMM kernels {conv_us / 1e6:.4f} s, "
        f"other kernels {(total_us - conv_us) / 1e6:.4f} s"
    )
    print(ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["naive", "exact:0", "exact:auto", "exact:auto:torch"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--batch-syn", type=int, default=500)
    p.add_argument("--syn-steps", type=int, default=30)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    base = [
        "--device",
        args.device,
        "--ipc",
        str(args.ipc),
        "--batch-syn",
        str(args.batch_syn),
        "--syn-steps",
        str(args.syn_steps),
        "--width",
        str(args.width),
        "--n-hallucinators",
        "5",
    ]
    print(
        f"profile_iteration: ipc {args.ipc}, batch {args.batch_syn}, syn_steps {args.syn_steps}, width "
        f"{args.width}, device {args.device}, cudnn.benchmark {torch.backends.cudnn.benchmark}, torch "
        f"{torch.__version__}"
    )
    for variant in args.variants:
        try:
            profile_variant(variant, base, args.repeats)
        except Exception as exc:  # one failing variant (out of memory) must not cost the others
            print(f"\n===== {variant}: FAILED: {type(exc).__name__}: {str(exc)[:300]}")


if __name__ == "__main__":
    main()
