"""What fresh memory costs on this machine: CPU seconds to allocate and first write one block, as the process grows.

    python bench/first_touch.py [--block-mb 488] [--blocks 30] [--passes 3] [--json bench/results/first_touch.json]

A kept step of the exact engine at bpc 50 / batch 500 holds ~488 MB of fresh tensors, so keeping all 30 steps
touches ~15 GB of pages the process never had. Each pass allocates ``--blocks`` blocks of ``--block-mb`` MB with
``torch.empty`` and zero-fills them (the first write faults every page in), keeping them all until the pass ends,
then frees them. Per block: CPU seconds (the kernel's page faults and zeroing count as this process's system
time). On bare metal first touch is a roughly constant cost per GB; on a virtual machine whose host backs guest
memory lazily (or takes freed pages back) it can grow with the footprint -- which is what the exact engine's
retained blocks (``buffer_cache_retain``) avoid after the first iteration.
"""

from __future__ import annotations

import argparse
import time


def touch_pass(block_bytes: int, blocks: int) -> list[float]:
    """CPU seconds of each block's allocation + first write, all blocks alive until the end of the pass."""
    import torch

    held, seconds = [], []
    for _ in range(blocks):
        t0 = time.process_time()
        held.append(torch.empty(block_bytes, dtype=torch.uint8).zero_())
        seconds.append(time.process_time() - t0)
    del held
    return seconds


def main() -> None:
    import torch

    from haba_fast.timing import write_bench_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-mb", type=int, default=488)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--json", default="bench/results/first_touch.json")
    args = ap.parse_args()
    if args.block_mb < 1 or args.blocks < 1 or args.passes < 1:
        raise SystemExit("--block-mb, --blocks and --passes must be >= 1")
    torch.set_num_threads(1)
    passes = []
    for p in range(args.passes):
        s = touch_pass(args.block_mb << 20, args.blocks)
        gb_s = [args.block_mb / 1024 / max(x, 1e-9) for x in s]
        passes.append({"cpu_s": s, "total_cpu_s": sum(s), "gb_per_cpu_s": gb_s})
        print(
            f"pass {p}: {sum(s):.1f} CPU s for {args.blocks * args.block_mb / 1024:.1f} GB; first block "
            f"{s[0]:.2f} s, last {s[-1]:.2f} s ({gb_s[0]:.2f} -> {gb_s[-1]:.2f} GB per CPU s)",
            flush=True,
        )
    command = f"python bench/first_touch.py --block-mb {args.block_mb} --blocks {args.blocks} --passes {args.passes}"
    write_bench_json(args.json, command, passes=passes)


if __name__ == "__main__":
    main()
