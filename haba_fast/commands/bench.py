"""``haba-fast bench <what>``: benchmarks that print one JSON line per result.

``iteration`` (full HaBa step per engine) lives in ``haba_fast.benchmarks.iteration``; ``genaug``
(generate + augment, fwd+bwd per DSA family and backend) in ``haba_fast.benchmarks.genaug``; ``objective``
(one iteration per objective x parameterization) in ``haba_fast.benchmarks.objective``. Each
module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "iteration": (
        "haba_fast.benchmarks.iteration",
        "one full HaBa distillation iteration per engine: s_per_iter, peak_rss_mb",
    ),
    "genaug": ("haba_fast.benchmarks.genaug", "generate + augment forward+backward per DSA family and backend"),
    "objective": (
        "haba_fast.benchmarks.objective",
        "one distillation iteration per objective (mtt, dc, dsa, dm) x parameterization: s_per_iter",
    ),
}


def register(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (JSON lines)", description=__doc__)
    bench_sub = parser.add_subparsers(dest="bench_what", metavar="WHAT")
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a benchmark not built yet must not break the whole CLI
            p.set_defaults(func=_unavailable(name, exc))
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _unavailable(name, exc):
    def run(args):
        raise ValueError(f"benchmark {name!r} is unavailable: {exc}")

    return run
