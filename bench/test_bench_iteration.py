"""pytest-benchmark suite: the trajectory engines on small configurations (full numbers: bench/run_iteration.sh).

Engine-only rows time one engine call forward + backward (N unrolled steps of a ConvNet-32 on B CIFAR-shaped
samples); the full-step rows time ``Distiller.step()`` (the whole HaBa iteration incl. the adversarial term).
Run: ``pytest bench/test_bench_iteration.py --benchmark-json out.json``. The benchmark's correctness checks (losses
equal across engines, the --inputs and --block-kernels variants, the report) are in
tests/test_bench_iteration_check.py, which the test suite runs.
"""

from __future__ import annotations

import math
import warnings

import pytest

from haba_fast.benchmarks import iteration

ENGINES = ["naive", "exact", "first-order"]


def _args(**kw):
    """A small CPU row: ConvNet-32, bpc 2, batch 20, 4 steps."""
    small = dict(ipc=2, n_hallucinators=3, syn_steps=4, batch_syn=20, width=32, depth=3, device="cpu")
    return iteration.arguments(**{**small, **kw})


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_only(benchmark, engine):
    fn, _ = iteration.engine_only_fn(_args(engine=engine))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    assert math.isfinite(loss) and loss > 0  # finite, positive matching loss


@pytest.mark.parametrize("engine", ["naive", "exact"])
def test_full_step(benchmark, engine):
    distiller = iteration.build_distiller(_args(engine=engine))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = benchmark.pedantic(distiller.step, rounds=2, warmup_rounds=1)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
