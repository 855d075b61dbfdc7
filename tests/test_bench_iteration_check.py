"""``haba-fast bench iteration``'s correctness, outside the timing (bench/test_bench_iteration.py times it): every
engine's loss on the same problem, the --inputs and --block-kernels variants against the default iteration, and the
report's GPU section."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from test_adjoint import first_order_oracle, naive_unroll, rel_err

from haba_fast import ops
from haba_fast.benchmarks import iteration


def _args(**kw):
    """A small CPU row: ConvNet-32, bpc 2, batch 20, 4 steps."""
    small = dict(ipc=2, n_hallucinators=3, syn_steps=4, batch_syn=20, width=32, depth=3, device="cpu")
    return iteration.arguments(**{**small, **kw})


@pytest.mark.parametrize("engine", ["exact", "first-order"])
def test_engine_only_rows_time_the_naive_unrolls_loss(engine):
    """The engine-only row's call (same seed, same problem) gives the naive unroll's matching loss."""
    losses = []
    for name in ("naive", engine):
        fn, _ = iteration.engine_only_fn(_args(engine=name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses.append(fn())
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def _closure(fn) -> dict:
    """The variables ``fn`` (an engine_only_fn closure) captured: its fixed inputs X, Y, w0, wt, lr and net."""
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__)))


# Float32 against the float64 oracle on a ReLU network: a pre-activation within float32's rounding of 0 can land on
# the other side of the kink, and the gradient then belongs to the other linear piece. Measured at 1 thread on this
# row: dL/dX 3e-3 off on the C++ op's fused loops, 5e-7 on 2 threads or the composite path. A ConvNet-32 unroll on
# random 32x32 inputs (4 steps, batch 20): at seed 0 a float64 pre-activation at 9e-8 and 7.7e-3 off on the fused
# loops at 1 thread only; at seed 4 6.4e-4 off on every path and thread count; with sigmoid, 7e-7. So float32 is held to
# 2e-2 here (a missing term or a wrong scale is far larger); the engines' exactness is checked in float64 elsewhere
# (tests/test_cpp_engine.py, tests/test_adjoint.py: 1e-12).
F32_KINK_TOL = 2e-2


@pytest.mark.parametrize("backend", ["torch", pytest.param(None, id="default")])
@pytest.mark.parametrize("engine", ["exact", "first-order"])
def test_engine_only_rows_gradients_match_the_float64_oracle(engine, backend):
    """The engine-only row's dL/dX and dL/dlr (float32) are the float64 oracle's (tests/test_adjoint.py:
    naive_unroll; first-order: first_order_oracle, whose loss is naive's too), on the Python adjoint
    (``--backend torch``) and the row's default backend (the C++ op)."""
    fn, _ = iteration.engine_only_fn(_args(engine=engine, backend=backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fn()
    v = _closure(fn)  # the call left its gradients on the closure's X and lr
    X, lr = v["X"].detach().double().requires_grad_(True), v["lr"].detach().double().requires_grad_(True)
    oracle = first_order_oracle if engine == "first-order" else naive_unroll
    ref = oracle(v["net"], X, v["Y"], v["w0"].double(), v["wt"].double(), lr)
    dX, dlr = torch.autograd.grad(ref, [X, lr])
    assert loss == pytest.approx(float(ref), rel=1e-5)
    assert rel_err(v["X"].grad.double(), dX) < F32_KINK_TOL, f"dL/dX: {rel_err(v['X'].grad.double(), dX):.3g}"
    assert rel_err(v["lr"].grad.double(), dlr) < F32_KINK_TOL, f"dL/dlr: {rel_err(v['lr'].grad.double(), dlr):.3g}"


def test_full_step_rows_give_the_naive_iterations_loss():
    """One full HaBa iteration built by the bench (same seed): exact's loss is naive's."""
    losses = []
    for name in ("naive", "exact"):
        distiller = iteration.build_distiller(_args(engine=name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses.append(distiller.step()["loss"])
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_gpu_section_reports_peak_cuda_memory(tmp_path):
    """A CUDA row's memory column is its peak CUDA memory (with the card's name); a failed row says so."""
    env = {"machine": "m", "cpus": 16, "torch_threads": 16, "torch": "x", "commit": "c", "gpu": "Fake H100"}

    def row(engine, ipc, steps, batch, cuda_mb):
        return {"bench": "iteration", "engine": engine, "ipc": ipc, "syn_steps": steps, "batch_syn": batch,
                "device": "cuda", "s_per_iter": 0.1, "cpu_s_per_iter": 0.1, "times": [0.1, 0.1, 0.1],
                "peak_rss_mb": 5000.0, "peak_cuda_mb": cuda_mb, "env": env}

    rows = [row("exact", 10, 10, 100, 1000.0), row("exact", 10, 40, 100, 1100.0), row("naive", 10, 10, 100, 3000.0),
            row("exact", 50, 30, 500, 2048.0),
            {"bench": "iteration", "engine": "naive", "ipc": 50, "syn_steps": 30, "batch_syn": 500, "failed": True}]
    iteration.write_report(rows, str(tmp_path / "iteration_cuda.json"))
    doc = (tmp_path / "ITERATION.md").read_text()
    assert "## GPU" in doc and "## CPU" not in doc and "Fake H100" in doc
    assert "peak CUDA memory (MB)" in doc and "| 1100 |" in doc and "peak RSS 5000 MB" in doc
    assert "exact peak CUDA memory at syn_steps 40 / at 10: **1.10x**" in doc
    assert "exact completes, peak CUDA memory **2.00 GB**" in doc and "naive did NOT complete" in doc


@pytest.mark.parametrize("inputs", ["stacked", "streamed-step-checks"])
def test_inputs_variants_give_the_streamed_iterations_loss_and_gradients(inputs, monkeypatch):
    """``--inputs``: the same iteration (same seed, same plan) with all N batches built in one call, or streamed with
    the per-step device checks, gives the streamed default's loss and gradients; stacked never calls ``stream``, the
    step-checks variant streams with ``values_checked=False``."""
    import torch

    from haba_fast.engines.adjoint import AdjointEngine

    seen = []
    real_stream = AdjointEngine.stream

    def recording_stream(self, *args, values_checked=False, **kwargs):
        seen.append(values_checked)
        return real_stream(self, *args, values_checked=values_checked, **kwargs)

    monkeypatch.setattr(AdjointEngine, "stream", recording_stream)

    def one_iteration(**kw):
        distiller = iteration.build_distiller(_args(engine="exact", syn_steps=3, **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = distiller.step()
        return metrics["loss"], [p.detach().clone() for p in distiller.synthetic.parameters()]

    loss, params = one_iteration()
    assert seen == [True]
    seen.clear()
    loss_v, params_v = one_iteration(inputs=inputs)
    assert seen == ([] if inputs == "stacked" else [False])
    assert loss_v == pytest.approx(loss, rel=1e-5)
    for a, b in zip(params_v, params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_inputs_variant_wrapper_delegates_to_the_engine():
    import copy

    from haba_fast.engines import get_adjoint_engine

    engine = get_adjoint_engine("exact", "torch")
    stacked = iteration._InputsVariant(engine, "stacked")
    checks = iteration._InputsVariant(engine, "streamed-step-checks")
    assert not hasattr(stacked, "stream") and callable(checks.stream)
    stacked.memory_budget = "auto"  # set on the engine, not on the wrapper
    assert engine.memory_budget == "auto" and stacked.memory_budget == "auto"
    assert "with --inputs stacked" in repr(stacked) and "ExactEngine" in repr(stacked)
    assert copy.copy(checks)._inputs == "streamed-step-checks"


def test_inputs_variants_are_refused_where_they_mean_nothing():
    with pytest.raises(ValueError, match="naive takes none"):
        iteration.run(_args(engine="naive", inputs="stacked"))
    with pytest.raises(ValueError, match="--engine-only has fixed inputs"):
        iteration.run(_args(engine="exact", inputs="stacked", engine_only=True))


def test_block_kernels_sets_the_ops_variable_and_labels_the_row(monkeypatch, tmp_path):
    """``--block-kernels``: the C++ op's variable for the run, the row's ``block_kernels``, its own row and target
    line in the report (a variant, never the engine's own row); refused with naive."""
    monkeypatch.delenv(ops.BLOCK_KERNELS_ENV, raising=False)
    assert ops.block_kernels_in_use() == "default"
    for name, value in ops.BLOCK_KERNELS.items():
        monkeypatch.setenv(ops.BLOCK_KERNELS_ENV, value)
        assert ops.block_kernels_in_use() == name
    monkeypatch.delenv(ops.BLOCK_KERNELS_ENV)
    with pytest.raises(ValueError, match="naive runs autograd"):
        iteration.run(_args(engine="naive", block_kernels="aten"))
    seen = []
    monkeypatch.setattr(iteration, "_run", lambda args: seen.append(ops.block_kernels_in_use()) or 0)
    assert iteration.run(_args(engine="exact", block_kernels="aten")) == 0
    assert seen == ["aten"] and ops.BLOCK_KERNELS_ENV not in os.environ  # set for the call, then restored
    monkeypatch.setenv(ops.BLOCK_KERNELS_ENV, "triton")
    iteration.run(_args(engine="exact", block_kernels="default"))
    assert seen == ["aten", "default"] and os.environ[ops.BLOCK_KERNELS_ENV] == "triton"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not one of"):
        with ops.block_kernels("cuda"):
            pass

    env = {"machine": "m", "cpus": 16, "torch_threads": 16, "torch": "x", "commit": "c", "gpu": "Fake H200"}

    def row(engine, cuda_mb, s, **kw):
        return {"bench": "iteration", "engine": engine, "ipc": 50, "syn_steps": 30, "batch_syn": 500,
                "device": "cuda", "s_per_iter": s, "cpu_s_per_iter": s, "times": [s] * 3, "peak_rss_mb": 5000.0,
                "peak_cuda_mb": cuda_mb, "env": env, **kw}  # fmt: skip

    rows = [row("naive", 40000.0, 1.0), row("exact", 5000.0, 1.2), row("exact", 4000.0, 0.5, block_kernels="triton")]
    assert [iteration._is_variant(r) for r in rows] == [False, False, True]
    assert iteration._label(rows[2]) == "exact (triton blocks)"
    assert iteration._find(rows, "exact", 50, 30, 500) is rows[1]
    iteration.write_report(rows, str(tmp_path / "iteration_cuda.json"))
    doc = (tmp_path / "ITERATION.md").read_text()
    assert "exact (triton blocks) / naive time = **0.50** (target <= 0.8) -> met" in doc
