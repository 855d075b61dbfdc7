"""``haba-fast bench iteration``: seconds and peak memory of one full HaBa distillation iteration, per engine.

One iteration is ``haba_fast.distill.Distiller.step()``: generate + augment the N unrolled batches, run the
trajectory engine (``naive`` | ``exact`` | ``first-order``), the adversarial club term, the backward pass to the
bases, hallucinators and learned lr, the optimizer steps, and the adversary's own step. It runs on random
CIFAR-shaped data (10 classes, 3x32x32) and a synthetic expert buffer (the student's initial weights plus small
random drifts per epoch, the right P): no files.

Prints ONE JSON line: ``s_per_iter`` (median over ``--repeats`` timed iterations after ``--warmup``; the warm-up
iterations' wall and CPU seconds in ``warmup_s`` / ``warmup_cpu_s``),
``peak_rss_mb`` (peak resident set of this process: run one configuration per process so the peak is its own;
``bench/run_iteration.sh`` does), the configuration and ``haba_fast.timing.environment()``. ``--engine-only`` times
the engine call alone (forward + backward of the matching loss on fixed inputs) instead of the full step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from haba_fast._ext import buffer_cache_is_held, extension_available
from haba_fast.backend import BackendUnavailableError, OpInputs, requested_backend, select_backend
from haba_fast.benchmarks import SEED_BOUNDS, check_flags
from haba_fast.devices import resolve_device
from haba_fast.engines.memory import RunBuffers
from haba_fast.ops import (
    BLOCK_KERNELS,
    BLOCK_KERNELS_ENV,
    block_kernels,
    block_kernels_in_use,
    trajectory_block_kernel_devices,
)
from haba_fast.timing import add_network_timing_arguments

ENGINES = ("exact", "naive", "first-order")


def add_arguments(parser) -> None:
    parser.add_argument("--engine", default="exact", choices=ENGINES, help="trajectory engine (default exact)")
    parser.add_argument("--ipc", type=int, default=10, help="bases per class (default 10)")
    parser.add_argument("--n-hallucinators", type=int, default=5, help="hallucinators (default 5)")
    parser.add_argument("--syn-steps", type=int, default=20, help="unrolled student steps N (default 20)")
    parser.add_argument("--batch-syn", type=int, default=100, help="synthetic samples per step B (default 100)")
    add_network_timing_arguments(parser)
    parser.add_argument("--max-seconds", type=float, default=None, help="stop repeating after this many seconds")
    parser.add_argument("--engine-only", action="store_true", help="time the engine call alone, not the full step")
    parser.add_argument("--backend", default=None, help="adjoint backend auto | cpu | torch (exact/first-order)")
    parser.add_argument(
        "--memory-budget",
        default="0",
        help="exact/first-order: memory for stored per-step tensors (0 | 2GB | auto | unlimited | min; default 0; "
        "min also checkpoints the weight trajectory)",
    )
    parser.add_argument(
        "--offload-weights",
        action="store_true",
        help="exact/first-order: keep the weight trajectory in a temporary file in $TMPDIR (CPU) or pinned host "
        "memory (CUDA) instead of in memory",
    )
    parser.add_argument(
        "--compile-step",
        action="store_true",
        help="exact/first-order: the torch backend's step compiled with torch.compile (budget 0 or min; the "
        "warm-up iterations include the compile)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="exact/first-order, CUDA: the C++ op's steps replayed from CUDA graphs (each step op captured at its "
        "second call, for one called once per iteration in the second iteration: give --warmup 2 for the steady "
        "state)",
    )
    parser.add_argument(
        "--inputs",
        default="streamed",
        choices=INPUTS,
        help="exact/first-order, a diagnostic: how the unroll gets its batches. streamed (the default: each step's "
        "batch built on demand from the plan, checked once on the host), streamed-step-checks (the same, with the "
        "per-step checks that read values back from the device, as before 2026-12-04), stacked (all N batches "
        "built in one call, as the naive engine gets them; budget 0 then runs the C++ op's whole unroll)",
    )
    parser.add_argument(
        "--block-kernels",
        default=None,
        choices=BLOCK_KERNELS,
        help="exact/first-order with the C++ op, a diagnostic: who runs each block's norm/activation/pooling "
        "(HABA_FAST_TRAJECTORY_FUSED for this run). default (the fused CPU loops on a CPU, ATen ops on CUDA), aten "
        "(ATen ops everywhere), triton (the Triton block kernels: CUDA, or a CPU under TRITON_INTERPRET=1). Unset: "
        "the environment's choice",
    )
    parser.add_argument(
        "--baseline-rss-mb",
        type=float,
        default=None,
        help="peak RSS of the same configuration at budget 0 (from an earlier row): predicted_peak_rss_mb = it + "
        "the stored steps' bytes",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output anyway)")


class SyntheticBuffer:
    """An in-memory expert buffer: ``snapshot(t, e) = w0 + e * drift_t`` (flat float32 [P], CPU)."""

    def __init__(self, w0: torch.Tensor, num_epochs: int, num_trajectories: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_trajectories = num_trajectories
        self.num_epochs = num_epochs
        self.num_params = w0.numel()
        self._w0 = w0.detach().float().cpu()
        # Drift per epoch ~1% of the weights' scale: targets nearby, as after an epoch of expert SGD.
        scale = float(self._w0.abs().mean()) * 0.01
        self._drift = [torch.randn(self.num_params, generator=g) * scale for _ in range(num_trajectories)]

    def snapshot(self, traj: int, epoch: int) -> torch.Tensor:
        return self._w0 + float(epoch) * self._drift[int(traj)]


def arguments(**overrides):
    """The row's settings as the CLI parses them with no flag, then ``overrides`` (field -> value): for calling
    :func:`run`, :func:`build_distiller` or :func:`engine_only_fn` from Python."""
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise ValueError(f"bench iteration has no setting {name!r}")
        setattr(args, name, value)
    return args


def random_cifar(per_class: int, seed: int = 0):
    """A ``haba_fast.data.Dataset`` of random CIFAR-shaped images: 10 classes x ``per_class``, 3x32x32."""
    from haba_fast.data import Dataset

    g = torch.Generator().manual_seed(seed)
    n = 10 * per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    return Dataset(
        name="cifar10",
        train_images=torch.randn(n, 3, 32, 32, generator=g),
        train_labels=labels,
        test_images=torch.randn(10, 3, 32, 32, generator=g),
        test_labels=torch.arange(10),
        class_names=[f"class{i}" for i in range(10)],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def model_name(width: int, depth: int) -> str:
    """The reference network name of a ConvNet of this width and depth (ConvNet, ConvNetW<w>, ConvNetD<d>)."""
    if (width, depth) == (128, 3):
        return "ConvNet"
    if depth == 3 and width in (32, 64, 256, 512, 1024):
        return f"ConvNetW{width}"
    if width == 128 and 1 <= depth <= 8:
        return f"ConvNetD{depth}"
    raise ValueError(
        f"no reference ConvNet of width {width} and depth {depth}: use --width 32..1024 with depth 3, "
        "or width 128 with --depth 1..8"
    )


def build_distiller(args):
    """A Distiller for the benchmark configuration (random data, synthetic buffer)."""
    from haba_fast.distill import DistillConfig, Distiller
    from haba_fast.models import flatten_params, get_network

    model = model_name(args.width, args.depth)
    dataset = random_cifar(max(args.ipc, 2), seed=args.seed)
    expert_epochs, max_start = 2, 2
    student = get_network(model, 3, 10, (32, 32), generator=torch.Generator().manual_seed(args.seed))
    buffer = SyntheticBuffer(flatten_params(student), num_epochs=max_start + expert_epochs, seed=args.seed)
    cfg = DistillConfig(
        dataset="cifar10",
        model=model,
        ipc=args.ipc,
        n_hallucinators=args.n_hallucinators,
        syn_steps=args.syn_steps,
        batch_syn=args.batch_syn,
        engine=args.engine,
        memory_budget=args.memory_budget,
        offload_weights=args.offload_weights,
        cuda_graphs=args.cuda_graphs,
        expert_epochs=expert_epochs,
        max_start_epoch=max_start,
        lr_teacher=0.01,
        lr_img=100.0,
        lr_style=100.0,
        lr_lr=1e-5,
        device=args.device,
        seed=args.seed,
        iterations=1,
        num_eval=0,
        pix_init="real",
    )
    distiller = Distiller(cfg, dataset, buffer, device=args.device)
    if (args.backend is not None or args.compile_step or args.cuda_graphs) and args.engine != "naive":
        distiller.engine = _adjoint_engine(args)
    if args.inputs != "streamed":
        distiller.engine = _InputsVariant(distiller.engine, args.inputs)
    return distiller


INPUTS = ("streamed", "streamed-step-checks", "stacked")


class _InputsVariant:
    """An adjoint engine seen through ``--inputs``: ``stacked`` hides ``stream`` (``trajectory_loss`` then builds X
    [N, B, C, H, W] in one call), ``streamed-step-checks`` streams with ``values_checked=False``. Every other
    attribute is the engine's."""

    def __init__(self, engine, inputs: str):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_inputs", inputs)

    def __getattr__(self, name):  # only for names not found on the wrapper itself
        if name.startswith("_"):  # (copy/pickle look up dunders before __init__ ran)
            raise AttributeError(name)
        if name == "stream" and self._inputs == "stacked":
            raise AttributeError(name)
        if name == "stream":
            return self._stream_with_step_checks
        return getattr(self._engine, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._engine, name, value)

    def __repr__(self) -> str:
        return f"{self._engine!r} with --inputs {self._inputs}"

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def _stream_with_step_checks(self, *args, values_checked: bool = False, **kwargs):
        return self._engine.stream(*args, values_checked=False, **kwargs)


def _adjoint_engine(args):
    """The adjoint engine of ``--engine`` with ``--backend``, ``--memory-budget``, ``--offload-weights``,
    ``--compile-step`` and ``--cuda-graphs``."""
    from haba_fast.engines import get_adjoint_engine

    return get_adjoint_engine(
        args.engine,
        backend=args.backend,
        memory_budget=args.memory_budget,
        offload_weights=args.offload_weights,
        compile_step=args.compile_step,
        cuda_graphs=args.cuda_graphs,
    )


def engine_only_fn(args):
    """A closure running the engine forward + backward on fixed random inputs of the benchmark's shapes."""
    from haba_fast.engines import get_engine
    from haba_fast.models import flatten_params, get_network

    net = get_network(
        model_name(args.width, args.depth),
        3,
        10,
        (32, 32),
        generator=torch.Generator().manual_seed(args.seed),
        device=args.device,
    )

    g = torch.Generator().manual_seed(args.seed)
    w0 = flatten_params(net).cpu()
    wt = w0 + 0.01 * torch.randn(w0.shape, generator=g)
    X = torch.randn(args.syn_steps, args.batch_syn, 3, 32, 32, generator=g).to(args.device).requires_grad_(True)
    Y = torch.randint(0, 10, (args.syn_steps, args.batch_syn), generator=g).to(args.device)
    lr = torch.tensor(0.01, device=args.device, requires_grad=True)
    if (args.backend is not None or args.compile_step or args.cuda_graphs) and args.engine != "naive":
        engine = _adjoint_engine(args)
    else:
        engine = get_engine(args.engine, memory_budget=args.memory_budget, offload_weights=args.offload_weights)

    def fn():
        X.grad = None
        lr.grad = None
        loss = engine(net, X, Y, w0.to(args.device), wt.to(args.device), lr)
        loss.backward()
        return float(loss)

    return fn, engine


def budget_fields(memory_budget: str, stats: dict, baseline_rss_mb: float | None) -> dict:
    """The memory-budget columns of a row, from the engine's ``last_stats`` (``haba_fast.engines.adjoint``).

    ``memory_budget_mb``: the resolved budget (None = unlimited); ``stored_steps`` / ``recomputed_steps``;
    ``per_step_mb``: one stored step, measured on step 0; ``predicted_stored_mb`` = stored_steps x per_step_mb;
    ``predicted_peak_rss_mb`` = ``baseline_rss_mb`` (budget 0's peak) + predicted_stored_mb, when given.
    """
    budget = stats.get("memory_budget_bytes", 0)
    per_step = stats.get("per_step_bytes", 0) / 2**20
    stored = int(stats.get("stored_steps", 0))
    out = {
        "memory_budget": str(memory_budget),
        "memory_budget_mb": None if budget is None else budget / 2**20,
        "stored_steps": stored,
        "recomputed_steps": stats.get("recomputed_steps"),
        "per_step_mb": per_step,
        "predicted_stored_mb": stored * per_step,
        "stored_weights": stats.get("stored_weights"),
        "offloaded_weights": stats.get("offloaded_weights", 0),
        "offloaded_mb": stats.get("offloaded_bytes", 0) / 2**20,
    }
    if baseline_rss_mb is not None:
        out["predicted_peak_rss_mb"] = float(baseline_rss_mb) + stored * per_step
    return out


def run(args) -> int:
    """One row: the iteration timed as ``args`` asks, printed as a JSON line. ``--block-kernels`` sets the C++ op's
    variable for the call (restored after it)."""
    check_args(args)
    with block_kernels(args.block_kernels):
        return _run(args)


def check_args(args) -> None:
    """Raise ValueError for flags that are bad on their own or together, before any work (the device's checks come
    once it is resolved: ``_check_triton_blocks``)."""
    check_flags(args, ipc=1, n_hallucinators=1, syn_steps=1, batch_syn=1, width=1, depth=1, warmup=0, repeats=1)
    check_flags(args, max_seconds=0.0, baseline_rss_mb=0.0, seed=SEED_BOUNDS)
    if args.batch_syn > 10 * args.ipc:
        raise ValueError(f"--batch-syn {args.batch_syn} exceeds the {10 * args.ipc} bases (10 classes x --ipc)")
    if args.engine == "naive" and (
        args.compile_step or args.cuda_graphs or args.backend is not None or args.inputs != "streamed"
    ):
        raise ValueError(
            "--compile-step, --cuda-graphs, --backend and --inputs choose how the adjoint engines run; naive takes none"
        )
    if args.engine == "naive" and args.block_kernels is not None:
        raise ValueError("--block-kernels chooses how the C++ op runs its blocks; naive runs autograd")
    if args.engine_only and args.inputs != "streamed":
        raise ValueError("--inputs chooses how a full iteration builds its batches; --engine-only has fixed inputs")
    if args.backend is not None:
        requested_backend(args.backend)  # an unknown name: a clear error now
    if args.block_kernels is not None and _torch_step(args):
        raise ValueError(
            "--block-kernels chooses how the C++ op runs its blocks; --backend torch and --compile-step run the "
            "torch step"
        )


def _torch_step(args) -> bool:
    """Whether the adjoint engine runs the torch backend's step (not the C++ op) as ``args`` asks."""
    return bool(args.compile_step) or requested_backend(args.backend, legacy_env="HABA_FAST_ADJOINT") == "torch"


def _check_triton_blocks(args, device: torch.device) -> None:
    """Triton block kernels asked for (``--block-kernels triton`` or the environment) where the C++ op has none for
    ``device``: the op would raise in the first iteration; a one-line error now instead."""
    if block_kernels_in_use() != "triton" or args.engine == "naive" or _torch_step(args):
        return
    extension_available()  # loads the extension, which registers the Triton block kernels it can
    if device.type.upper() not in trajectory_block_kernel_devices():
        asked = "--block-kernels triton" if args.block_kernels else f"{BLOCK_KERNELS_ENV}=triton"
        raise ValueError(
            f"{asked} --device {device}: no Triton block kernel for {device.type} tensors (Triton runs on CUDA, or "
            "on the CPU when TRITON_INTERPRET=1 is set before haba_fast's extension loads; "
            "haba_fast.ops.register_trajectory_block_kernels registers them, and needs triton)"
        )


def _run(args) -> int:
    import warnings

    from haba_fast import dist, timing

    # Under torchrun (``torchrun --nproc-per-node K -m haba_fast.cli bench iteration ...``): the data-parallel step,
    # every unrolled batch split over the K processes; rank 0 prints the row.
    dist.init_from_env(args.device)
    if dist.world_size() > 1 and args.max_seconds is not None:
        raise ValueError("--max-seconds would let the processes stop after different counts; give --repeats only")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    device = resolve_device(args.device)
    if args.backend is not None:  # one that cannot run here: a one-line error now, not in the first iteration
        # the data-parallel step's engine sees a reducer (the C++ op has no per-step all-reduce)
        inputs = OpInputs(device, torch.float32, extra={"distributed": dist.world_size() > 1 and not args.engine_only})
        try:
            select_backend("trajectory_match", inputs, args.backend)
        except BackendUnavailableError as exc:
            raise ValueError(f"--backend {args.backend} --device {device}: {exc}") from exc
    _check_triton_blocks(args, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first-order engine's one-time notice would break the JSON line
        if args.engine_only:
            fn, engine = engine_only_fn(args)
        else:
            distiller = build_distiller(args)
            engine = distiller.engine
            fn = distiller.step
        cpu_times, faults = [], []

        def timed():
            # CPU seconds of this process (all threads) next to the wall time: on a shared machine the wall time
            # depends on other users' load, the CPU time much less. Minor page faults: fresh pages touched (on a
            # VM that hands freed pages back to its host, each costs several microseconds: bench/first_touch.py).
            c0, f0 = time.process_time(), timing.minor_faults()
            with buffers.step():  # as distill() runs a step
                out = fn()
            cpu_times.append(time.process_time() - c0)
            faults.append(timing.minor_faults() - f0)
            buffers.after_step(engine)
            return out

        def progress(kind: str, i: int, seconds: float) -> None:  # stderr: a row cut short still says how far it got
            print(f"bench iteration: {kind} iteration {i + 1}: {seconds:.3f} s", file=sys.stderr, flush=True)

        sent = dist.payload_bytes()
        with RunBuffers(args.memory_budget) as buffers:  # as distill() runs its iterations
            t = timing.measure(
                timed,
                warmup=args.warmup,
                repeats=args.repeats,
                device=device,
                max_seconds=args.max_seconds,
                on_call=progress,
            )
            held = buffer_cache_is_held()
        warmup_cpu_times, cpu_times = cpu_times[: args.warmup], cpu_times[args.warmup :]
        warmup_faults, faults = faults[: args.warmup], faults[args.warmup :]
        sent = (dist.payload_bytes() - sent) / max(1, len(cpu_times) + args.warmup)
    row: dict[str, Any] = {
        "bench": "iteration",
        "engine": args.engine,
        "engine_backend": getattr(engine, "last_backend", None),
        "backend_requested": args.backend,  # --backend (None: the engine's own choice)
        "compile_step": bool(args.compile_step),
        "cuda_graphs": bool(args.cuda_graphs),  # --cuda-graphs
        "inputs": args.inputs,  # streamed | streamed-step-checks | stacked (--inputs)
        "block_kernels": block_kernels_in_use(),  # default | aten | triton (--block-kernels / the environment)
        "approximate": bool(getattr(engine, "approximate", False)),
        "what": "engine" if args.engine_only else "full HaBa step (incl. adversarial term)",
        "ipc": args.ipc,
        "n_hallucinators": args.n_hallucinators,
        "syn_steps": args.syn_steps,
        "batch_syn": args.batch_syn,
        "width": args.width,
        "depth": args.depth,
        "device": str(device),
        "processes": dist.world_size(),
        "threads": torch.get_num_threads(),
        "comm_payload_bytes_per_iter": sent,  # tensors handed to all-reduce/broadcast by one rank per iteration
        "s_per_iter": t.median,
        "s_per_iter_min": t.min,
        "cpu_s_per_iter": statistics.median(cpu_times),
        "times": t.times,
        "warmup": int(args.warmup),  # untimed iterations first (the steady state a long run sees, when >= 1)
        "warmup_cpu_s": warmup_cpu_times,  # their CPU seconds: the first is a fresh process's first iteration
        "warmup_s": t.warmup_times,  # their wall seconds (a compiled step's first one includes its compile)
        "minor_faults_per_iter": statistics.median(faults),
        # distill()'s hold on the C++ buffer cache over its iterations (budget unlimited; a no-op with the cache off)
        "buffer_cache_held": held,
        "warmup_minor_faults": warmup_faults,
        "peak_rss_mb": timing.peak_rss_mb(),
        "env": timing.environment(device),
        # glibc allocator settings of the process (they move the RSS peak by ~200 MB between identical runs)
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }
    row.update(budget_fields(args.memory_budget, getattr(engine, "last_stats", {}), args.baseline_rss_mb))
    row["offload_weights"] = bool(args.offload_weights)
    graphs = getattr(engine, "step_graphs", None)
    if graphs is not None:  # --cuda-graphs: the engine's counts since it was made (warm-up iterations included)
        row["cuda_graph_captures"], row["cuda_graph_replays"] = graphs.captures, graphs.replays
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        # a captured graph's working set stays in its private pool, reserved but not allocated between replays
        row["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    if dist.is_main():
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Results document (bench/run_iteration.sh calls write_report).

_DOC_HEAD = """# One HaBa iteration per trajectory engine

Generated by `bench/run_iteration.sh` (do not edit by hand: rerun it). Each row is one configuration of
`haba-fast bench iteration` run in a fresh process: one full `Distiller.step()` (generate + augment the N batches,
the trajectory engine, the adversarial club term, the backward pass to bases / hallucinators / lr, the optimizer
steps, the adversary's step) on random CIFAR-shaped data (10 classes, 3x32x32), ConvNet-128 student, 5
hallucinators, a synthetic expert buffer. `s/iter` is wall time per iteration (no warm-up: at tens of seconds per
iteration the first-call overheads are noise); `CPU s/iter` is the process's CPU time (all threads) per iteration,
less sensitive than wall time to other users of a shared machine; `peak RSS` is the process's peak resident set
(`ru_maxrss`), so it includes the Python/torch baseline of a few hundred MB.
Rows of the same configuration (rounds of the timed comparison, interleaved across engines so that all engines see
the same machine load) are merged: median time over rounds, largest peak RSS.

Engines: `naive` = create-graph unroll (autograd through all N steps); `exact` = constant-memory adjoint
(csrc/trajectory.cpp: stores only w_t, analytic forward-over-reverse Hessian-vector products with fused CPU loops
for norm/activation/pooling); `first-order` = the same without the Hessian term in w: an APPROXIMATION
(TESLA-style), shown for reference only.

Reading the numbers: on a machine shared with other busy processes, wall times swing by tens of percent between
rounds (the engines are interleaved round by round, and the median is shown); the CPU-time ratio is the more
conservative comparison there. Rerun `bench/run_iteration.sh` on a quiet machine for clean numbers. The exact
engine's peak RSS still grows a little with syn_steps: the stored w_t (N+1 flat vectors, 1.3 MB each) and the
upstream generate/augment graph for the N*B samples scale with N; its activations do not.

Commands: `bench/run_iteration.sh` (CPU) and `DEVICE=cuda bench/run_iteration.sh` (GPU); a single row, e.g.
`haba-fast bench iteration --engine exact --ipc 10 --n-hallucinators 5 --syn-steps 20 --batch-syn 100 --json`.
"""


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _budget(row) -> str:
    """A row's memory budget as given (``0`` for rows written before the budget existed)."""
    return str(row.get("memory_budget", "0"))


def _variant_parts(row) -> list[str]:
    """What makes a row a diagnostic beside the engine's own rows, as label parts: a compiled step, CUDA graphs,
    ``--inputs`` other than streamed, ``--block-kernels`` other than the default."""
    parts = []
    if row.get("compile_step"):
        parts.append("compiled step")
    if row.get("cuda_graphs"):
        parts.append("CUDA graphs")
    if row.get("inputs", "streamed") != "streamed":
        parts.append(f"{row['inputs']} inputs")
    if row.get("block_kernels", "default") != "default":
        parts.append(f"{row['block_kernels']} blocks")
    return parts


def _label(row) -> str:
    """Engine name for the tables: ``exact`` (budget 0), ``exact (budget auto)``, and a forced ``--backend`` beside
    the budget: ``exact (budget auto, backend cpu)``; then the variant's parts (``_variant_parts``)."""
    budget = _budget(row)
    parts = [] if budget == "0" else [f"budget {budget}"]
    if row.get("backend_requested") not in (None, "auto"):
        parts.append(f"backend {row['backend_requested']}")
    parts += _variant_parts(row)
    return f"{row.get('engine', '?')} ({', '.join(parts)})" if parts else row.get("engine", "?")


def _is_variant(row) -> bool:
    """A diagnostic row (``_variant_parts``), kept beside the engine's rows and out of their comparisons."""
    return bool(_variant_parts(row))


def _find(rows, engine, ipc, steps, batch, timed=None, budget="0"):
    """The first row of ``engine`` at this configuration and budget (not a variant: ``_is_variant``)."""
    for r in rows:
        if r.get("failed") or r.get("engine") != engine or _budget(r) != budget or _is_variant(r):
            continue
        if (r.get("ipc"), r.get("syn_steps"), r.get("batch_syn")) != (ipc, steps, batch):
            continue
        if timed is not None and (len(r.get("times", [])) > 1) != timed:
            continue
        return r
    return None


def _merge(rows):
    """One row per (engine and budget, ipc, syn_steps, batch_syn): median time over rounds, max peak RSS, rounds
    counted."""
    import statistics

    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((_label(r), r.get("ipc"), r.get("syn_steps"), r.get("batch_syn")), []).append(r)
    merged = []
    for rs in groups.values():
        ok = [r for r in rs if not r.get("failed")]
        if not ok:
            merged.append(dict(rs[0]))
            continue
        m = dict(ok[0])
        times = [t for r in ok for t in r.get("times", [r.get("s_per_iter")])]
        m["times"] = times
        m["s_per_iter"] = statistics.median(times)
        cpu = [r["cpu_s_per_iter"] for r in ok if r.get("cpu_s_per_iter") is not None]
        m["cpu_s_per_iter"] = statistics.median(cpu) if cpu else None
        m["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
        for key in ("peak_cuda_mb", "peak_cuda_reserved_mb"):
            if any(r.get(key) is not None for r in ok):
                m[key] = max(r.get(key) or 0 for r in ok)
        merged.append(m)
    return merged


def _section(rows, title) -> str:
    """One device's table and target checks. On CUDA the memory column is the peak CUDA memory
    (``torch.cuda.max_memory_allocated``: the tensors the iteration holds on the card), with peak RSS beside it."""
    rows = _merge(rows)
    lines = [f"## {title}", ""]
    if not rows:
        return "\n".join(lines + ["(no results)", ""])
    env = next((r["env"] for r in rows if "env" in r), {})
    cuda = any(r.get("peak_cuda_mb") is not None for r in rows)
    mem_key, mem_name = ("peak_cuda_mb", "peak CUDA memory") if cuda else ("peak_rss_mb", "peak RSS")
    lines.append(
        f"Machine `{env.get('machine')}` ({env.get('cpus')} CPUs, torch threads {env.get('torch_threads')}"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "")
        + f"), torch {env.get('torch')}, commit `{env.get('commit')}`."
    )
    if cuda:
        lines.append(
            f"Card **{env.get('gpu')}**; triton {env.get('triton')}. Each row: warm-up iterations first (Triton "
            "compiles, cuDNN autotuning), then the median of the timed ones; memory = peak CUDA memory allocated "
            "(the note gives the peak reserved where recorded: CUDA graphs' pools are reserved, not allocated, "
            "between replays)."
        )
    tf = ".3f" if cuda else ".2f"  # GPU iterations take tens of milliseconds
    lines += [
        "",
        f"| engine | bpc | syn_steps | batch_syn | s/iter (median) | CPU s/iter | runs | {mem_name} (MB) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(
                f"| {_label(r)} | {r['ipc']} | {r['syn_steps']} | {r['batch_syn']} | failed | | | | "
                "did not complete (out of memory or error) |"
            )
            continue
        notes = ["approximation"] if r.get("approximate") else []
        if cuda and r.get("peak_rss_mb") is not None:
            notes.append(f"peak RSS {r['peak_rss_mb']:.0f} MB")
        if r.get("peak_cuda_reserved_mb") is not None:
            notes.append(f"{r['peak_cuda_reserved_mb']:.0f} MB reserved")
        if r.get("cuda_graph_replays") is not None:
            notes.append(f"{r['cuda_graph_captures']} graphs, {r['cuda_graph_replays']} replays (warm-up included)")
        if r.get("compile_step") and r.get("warmup_s"):
            notes.append(f"first iteration {r['warmup_s'][0]:.1f} s (the compile)")
        note = "; ".join(notes)
        lines.append(
            f"| {_label(r)} | {r['ipc']} | {r['syn_steps']} | {r['batch_syn']} | {_fmt(r.get('s_per_iter'), tf)} "
            f"| {_fmt(r.get('cpu_s_per_iter'), tf)} | {len(r.get('times', []))} "
            f"| {_fmt(r.get(mem_key), '.0f')} | {note} |"
        )
    steps = sorted({r.get("syn_steps") for r in rows if r.get("batch_syn") == 100 and not r.get("failed")})
    lo, hi = (steps[0], steps[-1]) if steps else (None, None)
    mid = sorted(
        {
            r.get("syn_steps")
            for r in rows
            if r.get("engine") == "naive" and r.get("batch_syn") == 100 and not r.get("failed")
        }
    )
    checks = []
    e_lo, e_hi = _find(rows, "exact", 10, lo, 100), _find(rows, "exact", 10, hi, 100)
    if e_lo and e_hi and lo != hi:
        ratio = e_hi[mem_key] / e_lo[mem_key]
        checks.append(
            f"- exact {mem_name} at syn_steps {hi} / at {lo}: **{ratio:.2f}x** (target <= 1.15x) "
            f"-> {'met' if ratio <= 1.15 else 'NOT met'}"
        )
    n_lo, n_hi = _find(rows, "naive", 10, lo, 100), _find(rows, "naive", 10, hi, 100)
    if n_lo and n_hi and lo != hi:
        checks.append(f"- naive {mem_name} at syn_steps {hi} / at {lo}: {n_hi[mem_key] / n_lo[mem_key]:.2f}x")
    elif n_lo and e_lo:
        checks.append(f"- naive {mem_name} at syn_steps {lo}: {n_lo[mem_key]:.0f} MB vs exact {e_lo[mem_key]:.0f} MB")
    for s in mid:
        e, n = _find(rows, "exact", 10, s, 100), _find(rows, "naive", 10, s, 100)
        f = _find(rows, "first-order", 10, s, 100)
        if e and n:
            ratio = e["s_per_iter"] / n["s_per_iter"]
            target = s == 20  # the issue's time target is at syn_steps 20
            line = f"- wall time per iteration at syn_steps {s}: exact / naive = **{ratio:.2f}**"
            if target:
                line += f" (target <= 0.6) -> {'met' if ratio <= 0.6 else 'NOT met'}"
            if f:
                line += f"; first-order / naive = {f['s_per_iter'] / n['s_per_iter']:.2f}"
            if e.get("runs", len(e.get("times", []))) < 2:
                line += " (single run each)"
            checks.append(line)
            if e.get("cpu_s_per_iter") and n.get("cpu_s_per_iter"):
                checks.append(
                    f"- CPU time per iteration at syn_steps {s}: exact / naive = "
                    f"{e['cpu_s_per_iter'] / n['cpu_s_per_iter']:.2f}"
                )
    checks += _auto_budget_checks(rows, mem_key, mem_name)
    big = [
        r
        for r in rows
        if r.get("ipc") == 50 and r.get("batch_syn") == 500 and _budget(r) == "0" and not _is_variant(r)
    ]
    for r in big:
        if r.get("failed"):
            checks.append(f"- bpc 50, batch 500, syn_steps {r['syn_steps']}: {r['engine']} did NOT complete")
        elif r.get("engine") == "exact":
            verdict = (
                "(the 6 GB target is the CPU machine's peak RSS; shown for comparison)"
                if cuda
                else f"(target <= 6 GB) -> {'met' if r[mem_key] <= 6 * 1024 else 'NOT met'}"
            )
            checks.append(
                f"- bpc 50, batch 500, syn_steps {r['syn_steps']}: exact completes, {mem_name} "
                f"**{r[mem_key] / 1024:.2f} GB** {verdict}"
            )
        else:
            checks.append(
                f"- bpc 50, batch 500, syn_steps {r['syn_steps']}: {r['engine']} completes, {mem_name} "
                f"{r[mem_key] / 1024:.2f} GB"
            )
    head = (
        "Ratios from the same run (the issue states its targets for the CPU machine; on the GPU they are shown "
        "for comparison):"
        if cuda
        else "Targets (ratios from the same run):"
    )
    lines += ["", head, ""] + (checks or ["- (not enough rows)"]) + [""]
    return "\n".join(lines)


def _auto_budget_checks(rows, mem_key: str, mem_name: str) -> list:
    """The memory-budget targets against naive: exact with ``--memory-budget auto`` (and exact with
    ``--compile-step``, ``--cuda-graphs`` or ``--block-kernels triton``, at any budget) at (a) bpc 10 / batch 100 /
    syn_steps 20 (time <= 0.4x naive's) and (b) bpc 50 / batch 500 / syn_steps 30 (<= 0.8x), in memory no larger
    than naive's. Rows from the same run (merged rows)."""
    out = []
    for name, (ipc, batch), target in (("(a)", (10, 100), 0.4), ("(b)", (50, 500), 0.8)):
        autos = [
            r
            for r in rows
            if not r.get("failed")
            and (
                _budget(r) == "auto"
                or r.get("compile_step")
                or r.get("cuda_graphs")
                or r.get("block_kernels") == "triton"
            )
            and r.get("engine") == "exact"
            and (r.get("ipc"), r.get("batch_syn")) == (ipc, batch)
        ]
        for a in autos:
            n = _find(rows, "naive", ipc, a.get("syn_steps"), batch)
            where = f"{name} bpc {ipc}, batch {batch}, syn_steps {a.get('syn_steps')}"
            if n is None:
                failed = any(
                    r.get("failed")
                    and r.get("engine") == "naive"
                    and (r.get("ipc"), r.get("syn_steps"), r.get("batch_syn")) == (ipc, a.get("syn_steps"), batch)
                    for r in rows
                )
                out.append(
                    f"- {where}: {_label(a)} completes; naive "
                    + ("did not (out of memory or error)" if failed else "was not run")
                )
                continue
            ratio = a["s_per_iter"] / n["s_per_iter"]
            key, name_mem = mem_key, mem_name
            if a.get("cuda_graphs") and "peak_cuda_reserved_mb" in a and "peak_cuda_reserved_mb" in n:
                # the graphs' pools are reserved, not allocated, between replays: compare what both reserved
                key, name_mem = "peak_cuda_reserved_mb", "peak CUDA memory reserved"
            mem_ok = a[key] <= n[key]
            out.append(
                f"- {where}: {_label(a)} / naive time = **{ratio:.2f}** (target <= {target}) -> "
                f"{'met' if ratio <= target else 'NOT met'}; {name_mem} {a[key]:.0f} vs {n[key]:.0f} MB "
                f"(target: no larger) -> {'met' if mem_ok else 'NOT met'}"
            )
    return out


def write_report(rows, json_path) -> None:
    """Write ``rows`` to ``json_path`` and regenerate bench/results/ITERATION.md from every iteration*.json there."""
    import os

    from haba_fast.io import atomic_write_text

    atomic_write_text(json.dumps(rows, indent=1) + "\n", json_path)
    folder = os.path.dirname(os.path.abspath(json_path))
    parts = [_DOC_HEAD]
    for name, title in (("iteration.json", "CPU"), ("iteration_cuda.json", "GPU")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as fh:
                parts.append(_section(json.load(fh), title))
    atomic_write_text("\n".join(parts), os.path.join(folder, "ITERATION.md"))


# ----------------------------------------------------------------------------------------------------------------------
# Memory-budget results (bench/run_memory_budget.sh calls write_budget_report).

_BUDGET_HEAD = """# One HaBa iteration per memory budget

Generated by `bench/run_memory_budget.sh` (do not edit by hand: rerun it). Each row is `haba-fast bench iteration
--engine exact --memory-budget B` in a fresh process: one full `Distiller.step()` on random CIFAR-shaped data
(10 classes, 3x32x32), ConvNet-128 student, 5 hallucinators, synthetic expert buffer, one iteration, no warm-up
(the first iteration of a run); the *steady state* sections time the iteration after one warm-up iteration in the
same process (`WARMUP=1`), which is what the iterations of a long run cost: from the second iteration on, the
engine works in blocks the previous iteration left in its buffer cache (csrc/buffer_cache.h). Rows noted *held*
ran their timed iterations held (`engines.memory.RunBuffers`, each step in a scope: the whole step's working set
and the kept steps stay resident between iterations), which `distill()` does at budget `unlimited` from the first
iteration, and at a size or `auto` from the iteration after the first unroll has shown that the budget holds the
cache's free cap (`HABA_FAST_BUFFER_CACHE_MB`, 4096 MiB) beside its kept steps (`holds_step_buffers`; such a row's
steady state needs `WARMUP=2`); commit `6388e1a` held at every budget unconditionally: its rows at other budgets
are superseded. The other steady-state rows retain only the kept steps' blocks (`buffer_cache_retain`).
`faults/iter (k)`: minor page faults of the timed iteration, in thousands (fresh 4 KiB pages: on this VM, which
hands freed guest pages back to its host, each costs up to ~30 us; `bench/first_touch.py`).
Every budget runs the default engine (backend auto: the C++ op on CPU tensors, streamed batches); a budget above 0
keeps the last k steps' forward-sweep tensors (the C++ op's conv outputs, block outputs and input gradients, and the
step's generate/augment graph), k = budget // per step - 1. Rows marked *superseded* are kept for comparison
and left out of the verdicts: rows of older commits (a budget above 0 then ran the torch backend, autograd
graphs), and runs replaced by later ones (the note says why). `stored` / `recomputed`: steps whose forward-sweep
tensors the backward sweep reused / recomputed; `per step`: one stored step, measured on step 0; `predicted
peak` = budget 0's peak RSS + stored steps x per step. `peak RSS` is `ru_maxrss` of the process. Budget `min`
keeps no step and checkpoints the weight trajectory (every ceil(sqrt(N))-th w_t stored, the others recomputed per
segment in the backward sweep); `w_t held`: the most weight vectors the engine held at once (N + 1 at other budgets).
Rows with `--offload-weights` keep every w_t in a temporary file instead of in memory (`w_t held` 2); they have
their own syn_steps section and stay out of the others.

The machine is shared with other jobs (2 cores): wall times swing by tens of percent between runs; CPU time (all
threads of the process) is the steadier comparison and the one the verdicts use, with one torch thread per
process (`THREADS=1`): with 2 threads on 2 busy cores the OpenMP threads spin at barriers while their sibling is
descheduled, and the spinning counts as CPU time. With `PASSES=2` every budget ran twice (one pass after the
other); the verdicts take medians.
"""


def _first_cpu_s(row):
    """CPU seconds of a row's first (warm-up) iteration: a fresh process's first iteration; None without one."""
    return (row.get("warmup_cpu_s") or [None])[0]


def _pairs_by_commit(bigs, bases) -> list[tuple[str, float]]:
    """(commit, CPU-time ratio of the medians) for every commit with rows on both sides, in the rows' order: the
    comparisons that ran the same code (the pooled ratio mixes commits and the machine's load over days)."""

    def by_commit(rows_):
        out: dict[str, list[float]] = {}
        for r in rows_:
            commit = (r.get("env") or {}).get("commit")
            if commit:
                out.setdefault(commit, []).append(r["cpu_s_per_iter"])
        return out

    big, base = by_commit(bigs), by_commit(bases)
    return [(c, statistics.median(big[c]) / statistics.median(base[c])) for c in big if c in base]


def _budget_section(rows, title, ipc, steps, batch, warm: bool = False) -> list[str]:
    """One configuration's rows of one kind: the first iteration of a fresh process (``warm`` False: rows without
    warm-up, as every row before the key existed), or an iteration after warm-up ones (the steady state)."""
    rs = [
        r
        for r in rows
        if (r.get("ipc"), r.get("syn_steps"), r.get("batch_syn")) == (ipc, steps, batch)
        and not r.get("offload_weights")
        and bool(r.get("warmup", 0)) == warm
    ]
    if warm and not rs:
        return []
    lines = [f"## {title}", ""]
    if not rs:
        return lines + ["(not run)", ""]
    first = " first iteration CPU s | faults/iter (k) |" if warm else ""
    lines += [
        "| budget | backend | threads | stored | recomputed | per step (MB) | s/iter | CPU s/iter |"
        f"{first} peak RSS (MB) | predicted peak (MB) | note |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if warm else "") + "---|---|---|",
    ]
    for r in rs:
        if r.get("failed"):
            blank = " | |" if warm else ""
            lines.append(f"| {r.get('memory_budget')} | | | | | | failed | |{blank} | | {r.get('note', '')} |")
            continue
        note = "; ".join(
            n
            for n in (
                "*superseded*: " + (r.get("note") or "") if r.get("superseded") else r.get("note"),
                "*held*" if r.get("buffer_cache_held") else "",
            )
            if n
        )
        faults = r.get("minor_faults_per_iter")
        first_cpu = (
            f" {_fmt(_first_cpu_s(r), '.1f')} | {_fmt(None if faults is None else faults / 1000, '.0f')} |"
            if warm
            else ""
        )
        lines.append(
            f"| {r.get('memory_budget')} | {r.get('engine_backend')} | {r.get('threads', '-')} | "
            f"{r.get('stored_steps')} | "
            f"{r.get('recomputed_steps')} | {_fmt(r.get('per_step_mb'), '.0f')} | {_fmt(r.get('s_per_iter'), '.1f')} | "
            f"{_fmt(r.get('cpu_s_per_iter'), '.1f')} |{first_cpu} {_fmt(r.get('peak_rss_mb'), '.0f')} | "
            f"{_fmt(r.get('predicted_peak_rss_mb'), '.0f')} | {note} |"
        )
    ok = [r for r in rs if not r.get("failed") and not r.get("superseded")]
    bases = [r for r in ok if str(r.get("memory_budget")) == "0"]
    lines.append("")
    if not bases:
        return lines + ["- (no current budget 0 row: not rerun since the rows above)", ""]
    others = [r for r in ok if str(r.get("memory_budget")) not in ("0", "min")]
    mins = [r for r in ok if str(r.get("memory_budget")) == "min"]
    # Budget 0 rows run beside the min rows (``paired_with: "min"``, same load) are min's reference only.
    min_bases = [r for r in bases if r.get("paired_with") == "min"] or bases
    bases = [r for r in bases if r.get("paired_with") != "min"] or bases

    def med(rows_, key):
        return statistics.median(r[key] for r in rows_)

    if mins:
        cpu = med(mins, "cpu_s_per_iter") / med(min_bases, "cpu_s_per_iter")
        lines.append(
            f"- budget min (checkpointed weight trajectory) / budget 0 (medians of {len(mins)} and {len(min_bases)} "
            f"runs): CPU **{cpu:.2f}x**, wall {med(mins, 's_per_iter') / med(min_bases, 's_per_iter'):.2f}x, peak "
            f"RSS {med(mins, 'peak_rss_mb'):.0f} MB against {med(min_bases, 'peak_rss_mb'):.0f} MB (the price of one "
            "more forward gradient per step)"
        )

    if others:
        big = max(others, key=lambda r: r.get("memory_budget_mb") or float("inf"))
        bigs = [r for r in others if r.get("memory_budget") == big["memory_budget"]]
        ratio = med(bigs, "s_per_iter") / med(bases, "s_per_iter")
        cpu = med(bigs, "cpu_s_per_iter") / med(bases, "cpu_s_per_iter")
        lines.append(
            f"- largest budget run ({big['memory_budget']}) / budget 0 (medians of {len(bigs)} and {len(bases)} "
            f"runs): CPU **{cpu:.3f}x**, wall {ratio:.3f}x (target <= 0.75x in CPU time) -> "
            f"{'met' if cpu <= 0.75 else 'NOT met'}"
        )
        pairs = _pairs_by_commit(bigs, bases)
        if pairs:
            lines.append(
                "- the same code's pairs (the largest budget and budget 0 rows of one commit, CPU medians): "
                + ", ".join(f"{ratio_:.2f}x ({commit})" for commit, ratio_ in pairs)
            )
        firsts = [[_first_cpu_s(r) for r in rs_] for rs_ in (bigs, bases)]
        if warm and all(None not in f for f in firsts):
            lines.append(
                f"- the same processes' first iterations (nothing retained yet): CPU "
                f"{statistics.median(firsts[0]) / statistics.median(firsts[1]):.2f}x"
            )
    fixed = max(r["peak_rss_mb"] for r in bases)
    for r in others:
        cap = r.get("memory_budget_mb")
        if cap is None:
            continue
        limit = cap + fixed
        lines.append(
            f"- budget {r['memory_budget']}: peak RSS {r['peak_rss_mb']:.0f} MB <= budget + budget 0's peak "
            f"({limit:.0f} MB) -> {'met' if r['peak_rss_mb'] <= limit else 'NOT met'}"
        )
    return lines + [""]


def _flat_rows(rows, budget: str, offload: bool) -> list:
    """The syn_steps rows (bpc 10, batch 100, syn_steps 10 or 80) of one budget, offloaded or not, that ran."""
    return [
        r
        for r in rows
        if (r.get("ipc"), r.get("batch_syn")) == (10, 100)
        and str(r.get("memory_budget")) == budget
        and bool(r.get("offload_weights")) == offload
        and r.get("syn_steps") in (10, 80)
        and not r.get("failed")
    ]


def _flat_section(rows, budget: str = "0", offload: bool = False) -> list[str]:
    """One budget (offloaded or not) at syn_steps 10 and 80: the peak RSS ratio, medians of the current runs (one
    malloc setting)."""
    flat = _flat_rows(rows, budget, offload)
    if not flat:
        return []
    if offload:
        what = f"budget {budget}, weight trajectory offloaded to a file (`--offload-weights`)"
    else:
        what = "budget 0" if budget == "0" else "budget min: checkpointed weight trajectory"
    lines = [
        f"## Memory flat in syn_steps ({what}, bpc 10, batch 100)",
        "",
        "| syn_steps | s/iter | CPU s/iter | peak RSS (MB) | w_t held | malloc env | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(flat, key=lambda r: (not r.get("superseded"), r["syn_steps"])):
        env = " ".join(f"{k}={v}" for k, v in (r.get("malloc_env") or {}).items()) or "default"
        note = ("superseded (older commit); " if r.get("superseded") else "") + (r.get("note") or "")
        held = r.get("stored_weights")
        lines.append(
            f"| {r['syn_steps']} | {r['s_per_iter']:.1f} | {r['cpu_s_per_iter']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{'-' if held is None else held} | {env} | {note} |"
        )
    cur = [r for r in flat if not r.get("superseded")]
    lo = [r["peak_rss_mb"] for r in cur if r["syn_steps"] == 10]
    hi = [r["peak_rss_mb"] for r in cur if r["syn_steps"] == 80]
    lines.append("")
    if lo and hi:
        ratio = statistics.median(hi) / statistics.median(lo)
        lines.append(
            f"- peak RSS at syn_steps 80 / at 10 (medians of {len(hi)} and {len(lo)} runs): **{ratio:.3f}x** "
            f"(target <= 1.05x) -> {'met' if ratio <= 1.05 else 'NOT met'}; spread of the runs: "
            f"{max(lo) - min(lo):.0f} MB at 10 steps, {max(hi) - min(hi):.0f} MB at 80 steps."
        )
        from haba_fast.models import get_network, num_params

        per_w = num_params(get_network("ConvNet", 3, 10, (32, 32))) * 4 / 2**20
        if offload:
            mb = [r.get("offloaded_mb") for r in cur if r["syn_steps"] == 80]
            lines.append(
                f"- what grows: {statistics.median(hi) - statistics.median(lo):.0f} MB from 10 to 80 steps; the "
                f"engine holds 2 w_t at a time and writes the others to its file ({max(mb or [0]):.0f} MB at 80 "
                "steps, read back once each; the page cache is not the process's memory)."
            )
            commits = {(r.get("env") or {}).get("commit") for r in cur}
            for n in (10, 80):  # the in-memory rows of the same commits (the same run) as the time reference
                off = [r["cpu_s_per_iter"] for r in cur if r["syn_steps"] == n]
                mem = [
                    r["cpu_s_per_iter"]
                    for r in _flat_rows(rows, budget, offload=False)
                    if r["syn_steps"] == n and (r.get("env") or {}).get("commit") in commits
                ]
                if off and mem:
                    lines.append(
                        f"- CPU time at syn_steps {n}, offloaded / in memory (same commit; medians of {len(off)} and "
                        f"{len(mem)} runs): {statistics.median(off) / statistics.median(mem):.3f}x"
                    )
        elif budget == "0":
            lines.append(
                f"- what grows: {statistics.median(hi) - statistics.median(lo):.0f} MB from 10 to 80 steps; budget 0 "
                f"keeps one flat weight vector w_t per step (ConvNet-128, float32: {per_w:.2f} MB), "
                f"{70 * per_w:.0f} MB for 70 steps: the weight trajectory, no activation."
            )
        else:
            held = {n: [r.get("stored_weights") for r in cur if r["syn_steps"] == n] for n in (10, 80)}
            if all(held.values()) and all(None not in v for v in held.values()):
                h10, h80 = max(held[10]), max(held[80])
                lines.append(
                    f"- what grows: {statistics.median(hi) - statistics.median(lo):.0f} MB from 10 to 80 steps; the "
                    f"engine holds at most {h10} w_t at 10 steps and {h80} at 80 (~2 sqrt(N) + 2, against N + 1 at "
                    f"budget 0; {per_w:.2f} MB each): {(h80 - h10) * per_w:.0f} MB of weight vectors."
                )
    return lines + [""]


def write_budget_report(rows, json_path) -> None:
    """Write ``rows`` to ``json_path`` and bench/results/MEMORY_BUDGET.md beside it."""
    import os

    from haba_fast.io import atomic_write_text

    atomic_write_text(json.dumps(rows, indent=1) + "\n", json_path)
    env = next((r["env"] for r in rows if "env" in r), {})
    parts = [
        _BUDGET_HEAD,
        f"Machine `{env.get('machine')}` ({env.get('cpus')} CPUs, torch threads {env.get('torch_threads')}), "
        f"torch {env.get('torch')}, commits "
        f"{', '.join(sorted({'`' + str(r['env'].get('commit')) + '`' for r in rows if 'env' in r}))} (rows ran as "
        "the branch moved on; each row's `env.commit` is in the JSON). Command: `bench/run_memory_budget.sh` "
        "(`FLAT=1` for the syn_steps rows).",
        "",
    ]
    for name, (ipc, steps, batch) in (("a", (10, 20, 100)), ("b", (50, 30, 500))):
        what = f"({name}) bpc {ipc}, batch {batch}, syn_steps {steps}"
        parts += _budget_section(rows, what, ipc, steps, batch)
        parts += _budget_section(rows, f"{what}: steady state (one warm-up iteration first)", ipc, steps, batch, True)
    parts += _flat_section(rows)
    parts += _flat_section(rows, "min")
    parts += _flat_section(rows, "0", offload=True)
    atomic_write_text("\n".join(parts), os.path.join(os.path.dirname(os.path.abspath(json_path)), "MEMORY_BUDGET.md"))
