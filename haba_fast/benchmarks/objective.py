"""``haba-fast bench objective``: seconds per distillation iteration for every objective x parameterization.

One iteration is ``haba_fast.distill.Distiller.step()`` with ``--objective`` mtt | dc | dsa | dm over Pixels or HaBa:
the objective's loss, HaBa's adversarial club term, the backward pass, the optimizer steps, the objective's own
update (DC/DSA: the network's inner-loop epochs) and the adversary's step. Random CIFAR-shaped data (10 classes,
3x32x32) and, for MTT, a synthetic expert buffer (as ``haba-fast bench iteration``): no files.

DC and DSA are timed three times: per-class weight gradients ``auto`` (the default: vmap on the synthetic side,
and on the real side on CUDA), ``vmap`` on both sides, and ``loop`` (the public code's loop over classes), so the
table shows what batching buys.

Prints one JSON line per row: ``s_per_iter`` (median of ``--repeats`` timed iterations after ``--warmup``),
``cpu_s_per_iter`` (process CPU time), the configuration and ``haba_fast.timing.environment()``. ``peak_rss_mb`` is
the process's peak so far (rows run in one process: it only grows).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch

from haba_fast.benchmarks import SEED_BOUNDS, check_flags
from haba_fast.devices import resolve_device
from haba_fast.objectives.base import OBJECTIVES
from haba_fast.timing import add_network_timing_arguments

PARAMETERIZATIONS = ("pixels", "haba")


def add_arguments(parser) -> None:
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated (default: all)")
    parser.add_argument("--parameterizations", default="pixels,haba", help="comma-separated (default: both)")
    parser.add_argument("--ipc", type=int, default=1, help="images (pixels) / bases (HaBa) per class (default 1)")
    parser.add_argument("--n-hallucinators", type=int, default=5, help="hallucinators (default 5)")
    parser.add_argument("--batch-real", type=int, default=64, help="real images per class (DC/DSA/DM; default 64)")
    parser.add_argument("--outer-loop", type=int, default=None, help="DC/DSA outer loop (default: per IPC)")
    parser.add_argument("--inner-loop", type=int, default=None, help="DC/DSA inner loop (default: per IPC)")
    parser.add_argument("--syn-steps", type=int, default=10, help="MTT unrolled steps (default 10)")
    parser.add_argument("--engine", default="exact", help="MTT engine (default exact)")
    add_network_timing_arguments(parser)
    parser.add_argument("--no-loop", action="store_true", help="DC/DSA: only the default (auto) gradient batching")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON lines (the default output anyway)")


def build_distiller(args, objective: str, parameterization: str):
    """A Distiller for one row (random CIFAR-shaped data; a synthetic buffer for MTT)."""
    from haba_fast.benchmarks.iteration import SyntheticBuffer, model_name, random_cifar
    from haba_fast.distill import DistillConfig, Distiller, apply_objective
    from haba_fast.models import flatten_params, get_network

    model = model_name(args.width, args.depth)
    dataset = random_cifar(max(args.ipc, args.batch_real, 2), seed=args.seed)
    buffer = None
    if objective == "mtt":
        student = get_network(model, 3, 10, (32, 32), generator=torch.Generator().manual_seed(args.seed))
        buffer = SyntheticBuffer(flatten_params(student), num_epochs=4, seed=args.seed)
    cfg = apply_objective(DistillConfig(), objective)
    cfg = cfg.__class__(
        **{
            **cfg.to_dict(),
            "eval_models": (),
            "dataset": "cifar10",
            "model": model,
            "parameterization": parameterization,
            "ipc": args.ipc,
            "n_hallucinators": args.n_hallucinators,
            "batch_real": args.batch_real,
            # DC/DSA only (DistillConfig refuses them with another objective)
            "outer_loop": args.outer_loop if objective in ("dc", "dsa") else None,
            "inner_loop": args.inner_loop if objective in ("dc", "dsa") else None,
            "syn_steps": args.syn_steps,
            "engine": args.engine,
            "expert_epochs": 2,
            "max_start_epoch": 2,
            "device": args.device,
            "seed": args.seed,
            "num_eval": 0,
            "iterations": 1,
        }
    )
    return Distiller(cfg, dataset, buffer, device=args.device)


def _time(fn, args, device) -> Dict[str, Any]:
    from haba_fast import timing

    cpu: List[float] = []

    def timed():
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)

    t = timing.measure(timed, warmup=args.warmup, repeats=args.repeats, device=device)
    cpu = cpu[args.warmup :]
    return {"s_per_iter": t.median, "s_per_iter_min": t.min, "cpu_s_per_iter": statistics.median(cpu), "times": t.times}


def check_args(args) -> Tuple[List[str], List[str]]:
    """Raise ValueError for bad flags, before any row runs: counts below 1 (warm-up below 0), an unknown engine, no
    or unknown objectives and parameterizations, DC/DSA loops without DC or DSA.

    Returns:
        (objectives, parameterizations) to run, in the order given.
    """
    from haba_fast.engines import ENGINES

    check_flags(args, ipc=1, n_hallucinators=1, batch_real=1, syn_steps=1, width=1, depth=1, warmup=0, repeats=1)
    check_flags(args, outer_loop=1, inner_loop=1, seed=SEED_BOUNDS)
    if args.engine not in ENGINES + ("auto",):
        raise ValueError(f"unknown engine {args.engine!r}: choose one of {', '.join(ENGINES)} (or auto)")
    objectives = _names("objective", args.objectives, OBJECTIVES)
    pars = _names("parameterization", args.parameterizations, PARAMETERIZATIONS)
    if (args.outer_loop is not None or args.inner_loop is not None) and not {"dc", "dsa"} & set(objectives):
        raise ValueError("--outer-loop / --inner-loop apply to the dc and dsa objectives, and --objectives has neither")
    return objectives, pars


def _names(what: str, text: str, known) -> List[str]:
    """The comma-separated names of ``--{what}s``, each one of ``known``; at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--{what}s {text!r} names no {what}: choose among {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}: choose among {', '.join(known)}")
    return names


def rows(args):
    """Yield one result dict per (objective, parameterization[, gradient batching])."""
    import warnings

    from haba_fast import timing

    objectives, pars = check_args(args)
    device = resolve_device(args.device)
    env = timing.environment(device)
    for objective in objectives:
        for par in pars:
            modes = [None]
            if objective in ("dc", "dsa"):
                modes = ["auto"] if args.no_loop else ["auto", "vmap", "loop"]
            for mode in modes:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    d = build_distiller(args, objective, par)
                    if mode is not None:
                        d.objective.batched = {"auto": "auto", "vmap": True, "loop": False}[mode]
                    timing_row = _time(d.step, args, device)
                obj = d.objective
                row: Dict[str, Any] = {
                    "bench": "objective",
                    "objective": objective,
                    "parameterization": par,
                    "gradient_batching": mode,
                    "ipc": args.ipc,
                    "n_hallucinators": args.n_hallucinators if par == "haba" else None,
                    "batch_real": args.batch_real if objective != "mtt" else None,
                    "outer_loop": getattr(obj, "outer_loop", None),
                    "inner_loop": getattr(obj, "inner_loop", None),
                    "syn_steps": args.syn_steps if objective == "mtt" else None,
                    "engine": getattr(getattr(obj, "engine", None), "name", None),
                    "width": args.width,
                    "depth": args.depth,
                    "device": str(device),
                    **timing_row,
                    "peak_rss_mb": timing.peak_rss_mb(),
                    "env": env,
                }
                if device.type == "cuda":
                    row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                yield row


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(int(args.threads))
    for row in rows(args):  # its flags checked before the first row
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Results document


def write_report(jsonl_path, md_path, command: str) -> None:
    """Write ``md_path``: a table of the rows in ``jsonl_path`` (one JSON line each) with the command that made them."""
    from haba_fast.io import atomic_write_text

    with open(jsonl_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        raise ValueError(f"{jsonl_path} holds no rows")
    env = rows[0]["env"]
    lines = [
        "# One distillation iteration per objective",
        "",
        "Each row is `Distiller.step()` with that `--objective` over that parameterization (HaBa: with its",
        "adversarial term), on random CIFAR-shaped data (10 classes, 3x32x32); see",
        "`haba_fast/benchmarks/objective.py`.",
        "DC/DSA rows compare the per-class weight gradients: `auto` (default: vmap on the synthetic side, loop on the",
        "real side on a CPU), `vmap` (both sides), `loop` (the public code's loop over classes).",
        "",
        f"Command: `{command}`",
        "",
        f"Machine `{env.get('machine')}` ({env.get('cpus')} CPUs, torch threads {env.get('torch_threads')}), torch "
        f"{env.get('torch')}, commit `{env.get('commit')}`. The machine was shared with other busy processes: wall",
        "times swing; the CPU-time column is the steadier comparison.",
        "",
        "| objective | parameterization | per-class grads | s/iter (median) | CPU s/iter | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = []
        if r.get("engine"):
            note.append(f"engine {r['engine']}, syn_steps {r['syn_steps']}")
        if r.get("batch_real"):
            note.append(f"batch_real {r['batch_real']}")
        if r.get("outer_loop"):
            note.append(f"outer {r['outer_loop']} / inner {r['inner_loop']}")
        lines.append(
            f"| {r['objective']} | {r['parameterization']} | {r.get('gradient_batching') or '-'} | "
            f"{r['s_per_iter']:.3f} | {r['cpu_s_per_iter']:.3f} | {'; '.join(note)} |"
        )
    speed = []
    for obj in ("dc", "dsa"):
        for par in ("pixels", "haba"):
            by = {r.get("gradient_batching"): r for r in rows if r["objective"] == obj and r["parameterization"] == par}
            if "loop" in by and "auto" in by:
                loop = by["loop"]["cpu_s_per_iter"]
                text = f"- {obj} {par}: loop / auto = {loop / by['auto']['cpu_s_per_iter']:.2f}x CPU time"
                if "vmap" in by:
                    text += f", loop / vmap = {loop / by['vmap']['cpu_s_per_iter']:.2f}x"
                speed.append(text)
    if speed:
        lines += ["", "Per-class gradient batching (CPU-time ratios, > 1: batching is faster):", ""] + speed
    atomic_write_text("\n".join(lines) + "\n", md_path)
