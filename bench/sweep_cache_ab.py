"""A/B: the C++ buffer cache held for a whole sweep of per-step ops, against one scope per op call.

    python bench/sweep_cache_ab.py [--rounds 3] [--budgets 0 unlimited] [--json bench/results/sweep_cache_ab.json]

HaBa's streamed batches run the exact engine's C++ per-step ops (``trajectory_step_grad`` / ``_adjoint`` and their
kept variants). Each op call used to open and close the buffer cache's scope (csrc/buffer_cache.h), so every step
started with an empty cache and paid fresh pages' faults for its ~10 large activations; the engine now holds one
scope for the whole forward or backward sweep (``haba_fast.engines.adjoint._sweep_buffers``). Each row is one full
HaBa iteration (``haba-fast bench iteration``: bpc 10, batch 100, syn_steps 20, ConvNet-128, 5 hallucinators,
one torch thread) in a fresh process with ``HABA_FAST_BUFFER_CACHE=1`` (what the ``haba-fast`` program sets);
"per call" replaces ``_sweep_buffers`` with a null context in that process. Rows are interleaved round by round,
so both arms see the same machine load; the report takes medians of CPU seconds (the steadier figure on a shared
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import contextlib, sys
from haba_fast import cli
from haba_fast.engines import adjoint
if sys.argv[1] == "per-call":
    adjoint._sweep_buffers = lambda run: contextlib.nullcontext()
sys.exit(cli.main(sys.argv[2:]))
"""


def one(arm: str, budget: str, steps: int) -> dict:
    args = ["bench", "iteration", "--engine", "exact", "--ipc", "10", "--n-hallucinators", "5", "--syn-steps",
            str(steps), "--batch-syn", "100", "--warmup", "0", "--repeats", "1", "--memory-budget", budget,
            "--threads", "1", "--json"]
    env = dict(os.environ, HABA_FAST_BUFFER_CACHE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, arm, *args], env=env, capture_output=True, text=True,
                         check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"arm": arm, "memory_budget": budget, "cpu_s": row["cpu_s_per_iter"], "wall_s": row["s_per_iter"],
            "peak_rss_mb": row["peak_rss_mb"], "env": row["env"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budgets", nargs="+", default=["0", "unlimited"])
    ap.add_argument("--syn-steps", type=int, default=20)
    ap.add_argument("--json", default="bench/results/sweep_cache_ab.json")
    args = ap.parse_args()
    from haba_fast.timing import write_bench_json

    rows = []
    for r in range(args.rounds):
        for budget in args.budgets:
            for arm in ("held", "per-call") if r % 2 == 0 else ("per-call", "held"):
                rows.append(dict(one(arm, budget, args.syn_steps), round=r))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "env"}), flush=True)
    summary = {}
    for budget in args.budgets:
        med = {arm: statistics.median(x["cpu_s"] for x in rows if x["arm"] == arm and x["memory_budget"] == budget)
               for arm in ("held", "per-call")}
        summary[budget] = {"held_cpu_s": med["held"], "per_call_cpu_s": med["per-call"],
                           "held_over_per_call": med["held"] / med["per-call"]}
    if len(args.budgets) > 1 and "0" in args.budgets:
        for arm in ("held", "per-call"):
            key = "held_cpu_s" if arm == "held" else "per_call_cpu_s"
            for budget in args.budgets:
                if budget != "0":
                    summary[budget][f"over_budget_0_{arm}"] = summary[budget][key] / summary["0"][key]
    command = "python bench/sweep_cache_ab.py " + " ".join(
        [f"--rounds {args.rounds}", "--budgets", *args.budgets, f"--syn-steps {args.syn_steps}"])
    write_bench_json(args.json, command, summary=summary, rows=rows)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
