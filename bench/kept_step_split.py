"""Where a HaBa iteration's engine time goes at budget 0 and with every step kept: the C++ per-step ops, timed.

    python bench/kept_step_split.py [--rounds 3] [--steps 20] [--batch 100] [--repeats 1] [--hold]
                                    [--json bench/results/kept_step_split.json]

The exact engine's two sweeps on CPU tensors are N calls of one forward op and N calls of one backward op: budget 0
runs ``trajectory_step_grad`` then ``trajectory_step_adjoint`` (which recomputes the step's primal pass), a kept
step runs ``trajectory_step_grad_keep`` then ``trajectory_step_adjoint_kept`` (which reuses it). Each arm replays
both sweeps on fixed random inputs (ConvNet-128, CIFAR-shaped batch, one torch thread) in a fresh process (after one
untimed step of each op) with the buffer cache held per sweep, as the engine does (``HABA_FAST_BUFFER_CACHE=1``):
the kept arm holds all N kept lists until its backward sweep consumes them, newest first. Per op: CPU seconds summed
over the sweep and minor page faults. Arms are interleaved round by round; the summary takes medians.

With ``--repeats R`` each process replays the sweep pair R times and the summary times the last one (the steady
state of a long run): before each backward sweep the kept arm retains its kept steps' blocks for the next pair
(``buffer_cache_retain``, one kept step's storages x N), as the engine does, and with ``--hold`` the repeats run
held (``BufferCacheRun(hold=True)``, as ``distill()`` runs its iterations), so from the second pair on both arms' sweeps
find their working set resident too. The first pair of a fresh process faults every block in; on a virtual machine
that hands freed pages back to its host (``bench/first_touch.py``) that costs several CPU seconds per GB.

What the engine ratio can reach: per width x width block, the forward sweep's step costs 3 convolutions, the
recomputing backward step 8 and the kept one 6 (docs/ARCHITECTURE.md), so a kept sweep pair does 9 where budget 0
does 11: ``conv_floor`` = 9/11. ``kept_if_conv_bound`` = (grad + adjoint x 6/8) / (grad + adjoint), from budget
0's own op times: the ratio a kept step would give if the backward op's time scaled with its convolutions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONV_FLOOR = 9 / 11  # convolutions per block: (3 + 6) kept against (3 + 8) recomputed


def child(arm: str, steps: int, batch: int, repeats: int = 1, hold: bool = False) -> dict:
    """One arm in this process: both sweeps ``repeats`` times, per-op CPU seconds and minor faults of the last pair
    (``ops``) and of every pair (``per_repeat``)."""
    import torch

    from haba_fast._ext import (
        BufferCacheRun,
        buffer_cache_retain,
        buffer_cache_scope,
        extension_available,
        extension_error,
    )
    from haba_fast.engines.adjoint import _CppStep, cpp_spec
    from haba_fast.models import flatten_params, get_network
    from haba_fast.timing import minor_faults

    if not extension_available():
        raise SystemExit(f"the C++ extension is not loaded: {extension_error()}")
    torch.set_num_threads(1)
    ops = torch.ops.haba_fast
    model = get_network("ConvNet", 3, 10, (32, 32), generator=torch.Generator().manual_seed(0))
    spec = cpp_spec(model)
    gen = torch.Generator().manual_seed(1)
    w = flatten_params(model).detach()
    xs = [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(steps)]
    ys = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(steps)]
    lam = torch.randn(w.shape, generator=gen) * 1e-3
    acc: dict = {}

    def timed(name, op, *args):  # adds to the current pair's ``acc``
        r0, t0 = minor_faults(), time.process_time()
        out = op(*args)
        a = acc.setdefault(name, {"calls": 0, "cpu_s": 0.0, "minor_faults": 0})
        a["calls"] += 1
        a["cpu_s"] += time.process_time() - t0
        a["minor_faults"] += minor_faults() - r0
        return out

    if arm == "kept":  # one untimed step of each op first: oneDNN builds its kernels on first use
        ops.trajectory_step_adjoint_kept(
            w, xs[0], ys[0], lam, ops.trajectory_step_grad_keep(w, xs[0], ys[0], spec)[1], spec, True
        )
    else:
        ops.trajectory_step_grad(w, xs[0], ys[0], spec)
        ops.trajectory_step_adjoint(w, xs[0], ys[0], lam, spec, True)
    per_repeat = []
    with BufferCacheRun(hold):  # handing every retained block back at the end, held or not
        for _ in range(repeats):
            acc = {}
            kept = [None] * steps
            with buffer_cache_scope():  # the forward sweep
                for t in range(steps):
                    if arm == "kept":
                        _, kept[t] = timed("grad_keep", ops.trajectory_step_grad_keep, w, xs[t], ys[t], spec)
                    else:
                        timed("grad", ops.trajectory_step_grad, w, xs[t], ys[t], spec)
            if arm == "kept":  # what the engine retains before its backward sweep (engines/adjoint.py)
                buffer_cache_retain(_CppStep.kept_sizes(kept[0]) * steps)
            with buffer_cache_scope():  # the backward sweep, newest step first
                for t in reversed(range(steps)):
                    if arm == "kept":
                        k = kept[t]
                        kept[t] = None
                        timed("adjoint_kept", ops.trajectory_step_adjoint_kept, w, xs[t], ys[t], lam, k, spec, True)
                        del k
                    else:
                        timed("adjoint", ops.trajectory_step_adjoint, w, xs[t], ys[t], lam, spec, True)
            per_repeat.append(acc)
    return {
        "arm": arm,
        "repeats": repeats,
        "hold": hold,
        "ops": acc,
        "engine_cpu_s": sum(a["cpu_s"] for a in acc.values()),
        "per_repeat": per_repeat,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def one(arm: str, steps: int, batch: int, repeats: int, hold: bool) -> dict:
    env = dict(os.environ, HABA_FAST_BUFFER_CACHE="1")
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            arm,
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            "--repeats",
            str(repeats),
            *(["--hold"] if hold else []),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(rows: list) -> dict:
    def med(arm, op=None):
        xs = [r["ops"][op]["cpu_s"] if op else r["engine_cpu_s"] for r in rows if r["arm"] == arm]
        return statistics.median(xs)

    grad, adjoint = med("budget0", "grad"), med("budget0", "adjoint")
    keep, adjoint_kept = med("kept", "grad_keep"), med("kept", "adjoint_kept")
    return {
        "budget0_engine_cpu_s": med("budget0"),
        "kept_engine_cpu_s": med("kept"),
        "kept_over_budget0": med("kept") / med("budget0"),
        "grad_keep_over_grad": keep / grad,
        "adjoint_kept_over_adjoint": adjoint_kept / adjoint,
        "kept_if_conv_bound": (grad + adjoint * 6 / 8) / (grad + adjoint),
        "conv_floor": CONV_FLOOR,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1, help="sweep pairs per process; the last one is timed")
    ap.add_argument("--hold", action="store_true", help="hold the buffer cache across the repeats, as distill()")
    ap.add_argument("--json", default="bench/results/kept_step_split.json")
    ap.add_argument("--child", choices=["budget0", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.rounds, args.steps, args.batch, args.repeats) < 1:
        raise SystemExit("--rounds, --steps, --batch and --repeats must be >= 1")
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.repeats, args.hold)))
        return
    from haba_fast.timing import write_bench_json

    rows = []
    for r in range(args.rounds):
        for arm in ("budget0", "kept") if r % 2 == 0 else ("kept", "budget0"):
            rows.append(dict(one(arm, args.steps, args.batch, args.repeats, args.hold), round=r))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows)
    command = (
        f"python bench/kept_step_split.py --rounds {args.rounds} --steps {args.steps} --batch {args.batch} "
        f"--repeats {args.repeats}{' --hold' if args.hold else ''} --json {args.json}"
    )
    write_bench_json(args.json, command, summary=summary, rows=rows)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
