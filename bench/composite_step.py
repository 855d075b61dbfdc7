"""One step of the C++ trajectory op's ATen-only path (what CUDA tensors run), on this CPU: ATen ops per call and
CPU seconds, for the forward sweep's ``trajectory_step_grad`` and the backward sweep's ``trajectory_step_adjoint``,
and their kept pair (``trajectory_step_grad_keep``, ``trajectory_step_adjoint_kept``), each called as the streamed
engine calls it (``check_values=False``; rows before commit the kept pair came in ran the forward step with its
value checks).

A proxy for the GPU, where each ATen op of this path is a kernel launch and a pass over memory: the op count carries
over, the seconds only roughly (this CPU's memory bandwidth, one thread). ``HABA_FAST_TRAJECTORY_FUSED=0`` is set
here, so the fused CPU loops do not run. With ``--block-kernels triton`` (``HABA_FAST_TRAJECTORY_FUSED=triton``) the
blocks run in the Triton kernels under the interpreter: the ATen ops left (convolutions, the classifier) are counted
as before, and each kernel call adds its arguments' elements (read and written); no seconds.

    python bench/composite_step.py [--batch 100] [--width 128] [--repeats 5] [--block-kernels aten|triton]
                                   [--label NAME] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from haba_fast._ext import extension_available  # noqa: E402
from haba_fast.engines.adjoint import cpp_spec  # noqa: E402
from haba_fast.models import flatten_params, get_network  # noqa: E402

# ATen ops that only make views or allocate (no pass over memory, no kernel on a GPU): left out of ``compute_ops``.
METADATA_OPS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::slice",
    "aten::select",
    "aten::narrow",
    "aten::expand",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::flatten",
    "aten::unflatten",
    "aten::resize_",
    "aten::as_strided_",
    "aten::split",
    "aten::chunk",
    "aten::unbind",
    "aten::contiguous",
    "aten::to",
    "aten::_unsafe_view",
    "aten::numpy_T",
    "aten::expand_as",
    "aten::view_as",
}


# The step ops measured: the forward and backward sweeps' steps, recomputing (budget 0) and kept.
STEP_OPS = (
    "trajectory_step_grad",
    "trajectory_step_adjoint",
    "trajectory_step_grad_keep",
    "trajectory_step_adjoint_kept",
)


# Tensor arguments of the Triton block kernels that they read (the rest they write), by position.
_KERNEL_READS = {"forward": range(0, 6), "backward": range(0, 10)}


def _count_block_kernels(totals: dict) -> None:
    """Wrap the Triton block kernels so that each call adds the elements of its tensor arguments to ``totals``
    (``read`` / ``written``: each input read once, each output written once; the kernels' second passes over a
    plane read it from cache on a GPU)."""
    from haba_fast.kernels import trajectory_block as kb

    def counted(kind, fn):
        def call(*args):
            totals["calls"] += 1
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    totals["read" if i in _KERNEL_READS[kind] else "written"] += a.numel()
            fn(*args)

        return call

    kb.trajectory_block_forward = counted("forward", kb.trajectory_block_forward)
    kb.trajectory_block_backward = counted("backward", kb.trajectory_block_backward)


def measure(batch: int, width: int, repeats: int, block_kernels: str = "aten") -> dict:
    """Per step op: ATen ops, the elements their inputs hold, and (``block_kernels="triton"``: the blocks in the
    Triton kernels, under TRITON_INTERPRET=1, set before the extension loads) the kernels' calls and elements."""
    os.environ["HABA_FAST_TRAJECTORY_FUSED"] = "triton" if block_kernels == "triton" else "0"
    totals = {"calls": 0, "read": 0, "written": 0}
    if block_kernels == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--block-kernels triton runs the kernels on this CPU: set TRITON_INTERPRET=1")
        _count_block_kernels(totals)
    if not extension_available():
        raise SystemExit("the C++ extension is not built (make install)")
    torch.manual_seed(0)
    net = get_network(f"ConvNetW{width}" if width != 128 else "ConvNet", 3, 10, (32, 32))
    spec = cpp_spec(net)
    w = flatten_params(net).detach() + 0.05 * torch.randn(sum(p.numel() for p in net.parameters()))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    lam = torch.randn_like(w)
    # As the streamed engine calls them: values checked once per unroll, not per step (check_values=False).
    kept = torch.ops.haba_fast.trajectory_step_grad_keep(w, x, y, spec, False)[1]
    calls = {
        "trajectory_step_grad": lambda: torch.ops.haba_fast.trajectory_step_grad(w, x, y, spec, False),
        "trajectory_step_adjoint": lambda: torch.ops.haba_fast.trajectory_step_adjoint(w, x, y, lam, spec, True),
        # a kept step (what memory budgets that hold steps, `auto` on CUDA among them, run)
        "trajectory_step_grad_keep": lambda: torch.ops.haba_fast.trajectory_step_grad_keep(w, x, y, spec, False),
        "trajectory_step_adjoint_kept": lambda: torch.ops.haba_fast.trajectory_step_adjoint_kept(
            w, x, y, lam, list(kept), spec, True
        ),
    }
    out = {}
    for name, fn in calls.items():
        fn()  # warm-up
        before = dict(totals)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        kernels = {k: totals[k] - before[k] for k in totals}
        # top-level ATen ops (an op's own sub-ops are its implementation, not more launches), and the copies that a
        # metadata op (to, contiguous, reshape) makes when it must
        ops = collections.Counter(
            e.name for e in prof.events() if e.name.startswith("aten::") and _aten_parent(e) is None
        )
        compute = collections.Counter({k: v for k, v in ops.items() if k not in METADATA_OPS})
        compute.update(
            e.name
            for e in prof.events()
            if e.name in ("aten::_to_copy", "aten::clone")
            and _aten_parent(e) in METADATA_OPS
            and e.input_shapes
            and e.input_shapes[0]  # not a 0-dim scalar (a kernel argument on a GPU, not a copy)
        )
        # Elements the compute ops read (their tensor inputs, from the recorded shapes): the memory traffic that
        # bounds elementwise kernels on a GPU (an op's output is written once more; convolutions are counted too).
        read = sum(
            math.prod(shape)
            for e in prof.events()
            if e.name.startswith("aten::") and e.name not in METADATA_OPS and _aten_parent(e) is None
            for shape in (e.input_shapes or [])
            if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape)
        )
        times = []
        for _ in range(repeats if block_kernels != "triton" else 0):  # the interpreter's seconds mean nothing
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        out[name] = {
            "aten_ops": sum(ops.values()),
            "compute_ops": sum(compute.values()),
            "compute_input_melems": read / 1e6,
            "top_compute_ops": dict(compute.most_common(12)),
            "cpu_s_median": statistics.median(times) if times else None,
            "cpu_s": times,
        }
        if block_kernels == "triton":
            out[name].update(
                block_kernel_calls=kernels["calls"],
                block_kernel_read_melems=kernels["read"] / 1e6,
                block_kernel_written_melems=kernels["written"] / 1e6,
                total_read_melems=(read + kernels["read"]) / 1e6,
            )
    return out


def _aten_parent(event) -> str | None:
    """The name of the nearest enclosing ATen op of a profiler event, or None."""
    p = event.cpu_parent
    while p is not None:
        if p.name.startswith(("aten::", "haba_fast::trajectory_block")):  # a kernel's own ops are not launches
            return p.name
        p = p.cpu_parent
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--width", type=int, default=128, choices=[32, 64, 128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--block-kernels",
        default="aten",
        choices=["aten", "triton"],
        help="the blocks' norm/activation/pooling as ATen ops (default) or in the Triton kernels (run under the "
        "interpreter here: element counts, no seconds)",
    )
    ap.add_argument("--label", default="", help="a name for this build in the JSON (e.g. the change it carries)")
    ap.add_argument("--json", default=None, help="append the row to this JSON file (bench/results/...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.block_kernels == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # before the extension loads and registers the kernels
    row = {"label": args.label, "batch": args.batch, "width": args.width, "threads": args.threads}
    row.update(measure(args.batch, args.width, args.repeats, args.block_kernels))
    row["check_values"] = False
    row["block_kernels"] = args.block_kernels
    for name in STEP_OPS:
        r = row[name]
        line = (
            f"{args.label or 'this build'}: {name}: {r['compute_ops']} compute ops ({r['aten_ops']} top-level ATen "
            f"ops) reading {r['compute_input_melems']:.0f} M elements"
        )
        if args.block_kernels == "triton":
            line += (
                f" + {r['block_kernel_calls']} block kernel calls reading {r['block_kernel_read_melems']:.0f} M and "
                f"writing {r['block_kernel_written_melems']:.0f} M"
            )
        else:
            line += f", {r['cpu_s_median']:.3f} CPU s"
        print(line)
    if args.json:
        import json

        from haba_fast.timing import environment, write_bench_json

        rows = []
        if os.path.exists(args.json):
            rows = json.load(open(args.json))["rows"]
        row["env"] = environment()
        write_bench_json(args.json, "python " + " ".join(sys.argv), rows=rows + [row])


if __name__ == "__main__":
    main()
