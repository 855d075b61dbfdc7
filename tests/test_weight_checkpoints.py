"""``--memory-budget min``: the exact engine checkpoints the weight trajectory (every s-th w_t) and recomputes each
segment's w_t in the backward sweep: the same w_t bit for bit, the same gradients as budget 0 and the naive
unroll, and at most ~2 sqrt(N) + 2 weight vectors held at once.

Oracles: budget 0 (every w_t stored) and ``naive_unroll`` of tests/test_adjoint.py (a create-graph unroll).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_adjoint import _convnet, _MLPStudent, grads, make_problem, naive_unroll, rel_err
from test_memory_budget import CPP_MODELS, REL, _haba_problem, _syn_grads
from utils import extension_loaded

from haba_fast.engines import adjoint, get_adjoint_engine, get_engine
from haba_fast.engines.memory import MINIMAL, budget_bytes, checkpoint_every, parse_memory_budget

needs_cpp = pytest.mark.skipif(not extension_loaded(), reason="the C++ extension is not built")
BACKENDS = ["torch", pytest.param("cpu", marks=needs_cpp)]


def test_parse_and_schedule():
    for text in ("min", "MIN", " minimal "):
        assert parse_memory_budget(text) == MINIMAL
    assert budget_bytes("min", torch.device("cpu")) == 0  # keeps no step
    assert [checkpoint_every(n) for n in (1, 2, 4, 5, 9, 10, 80, 81, 82)] == [1, 2, 2, 3, 3, 4, 9, 9, 10]
    for n in range(1, 200):
        assert checkpoint_every(n) == math.ceil(math.sqrt(n))
    with pytest.raises(ValueError, match="n_steps"):
        checkpoint_every(0)


def _min_bound(n, s):
    """Most w_t a checkpointed run may hold: ceil(N/s) checkpoints, s - 1 inner segment vectors, w_N, one in flight."""
    return -(-n // s) + s + 1


def _record_backward_weights(monkeypatch, step_cls):
    """Record the w_t each backward step receives (a copy, keyed by t, in call order)."""
    seen = []
    orig = step_cls.adjoint

    def spy(self, kept, w, x, y, lam, want_hw, want_hx):
        seen.append(w.detach().clone())
        return orig(self, kept, w, x, y, lam, want_hw, want_hx)

    monkeypatch.setattr(step_cls, "adjoint", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recomputed_weights_are_the_stored_ones_bitwise(monkeypatch, backend, dtype):
    """The backward sweep gets every w_t equal bit for bit to the ones the whole stored trajectory holds."""
    step_cls = adjoint._CppStep if backend == "cpu" else adjoint._TorchStep
    model = _convnet(depth=2, norm="instancenorm", dtype=dtype)
    N = 7
    X, Y, ws, wt = make_problem(model, N, 3, tuple(model.im_size), dtype)
    step = step_cls(adjoint.cpp_spec(model)) if backend == "cpu" else step_cls(model)
    seen = _record_backward_weights(monkeypatch, step_cls)
    out = {}
    for checkpoint in (False, True):  # the engine's per-step unroll at budget 0, all w_t stored or checkpointed
        Xr = X.clone().requires_grad_(True)
        lr = torch.tensor(0.1, dtype=dtype, requires_grad=True)
        run = adjoint._Run(adjoint._TensorBatches(Xr, Y), step, ws, wt, False, 0, checkpoint)
        loss = adjoint._unroll(run, lr, (Xr,))
        loss.backward()
        out[checkpoint] = (loss.detach(), Xr.grad, lr.grad, dict(run.stats))
    assert len(seen) == 2 * N
    for t, (a, b) in enumerate(zip(seen[:N], seen[N:])):
        assert torch.equal(a, b), N - 1 - t
    for a, b in zip(out[True][:3], out[False][:3]):
        assert torch.equal(a, b)
    assert out[False][3]["stored_weights"] == N + 1 and out[True][3]["stored_weights"] <= _min_bound(N, 3)
    assert out[True][3]["recomputed_weights"] == N - 3  # checkpoints w_0, w_3, w_6


def _check_min(name, backend, dtype, model, N, batch, every=None):
    """``min`` (segment length ``every``, default ceil(sqrt(N))) against budget 0 and, exact, the naive unroll."""
    X, Y, ws, wt = make_problem(model, N, batch, tuple(model.im_size), dtype)
    base = grads(get_adjoint_engine(name, backend, 0), model, X, Y, ws, wt, lr_value=0.1)
    eng = get_adjoint_engine(name, backend, "min")
    if every is not None:  # an explicit segment length: the engine's run, built by hand
        orig = adjoint._Run.__init__

        def init(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            self.checkpoint_every = every

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(adjoint._Run, "__init__", init)
            got = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
    else:
        got = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
    s = every or checkpoint_every(N)
    st = eng.last_stats
    assert eng.last_backend == backend
    assert st["checkpoint_every"] == s and st["stored_steps"] == 0 and st["recomputed_steps"] == N
    assert st["recomputed_weights"] == N - (-(-N // s))  # every w_t but the checkpoints, once
    assert st["stored_weights"] <= _min_bound(N, s)
    for a, b in zip(got, base):
        assert rel_err(a, b) < REL[dtype], rel_err(a, b)
    if name == "exact":
        ref = grads(naive_unroll, model, X, Y, ws, wt, lr_value=0.1)
        for a, b in zip(got, ref):
            assert rel_err(a, b) < REL[dtype] * (1 if dtype == torch.float64 else 10), rel_err(a, b)
    return st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 2, 5, 10])
def test_min_gives_the_budget_zero_and_naive_gradients(backend, dtype, N):
    model = _convnet(depth=2, norm="instancenorm", dtype=dtype)
    _check_min("exact", backend, dtype, model, N, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N, every", [(5, 1), (3, 7), (7, 3), (6, 2), (1, 4)])
def test_min_any_segment_length(backend, N, every):
    """Segments of 1 (every w_t a checkpoint), N smaller than the segment, odd N with a short last segment."""
    model = _convnet(depth=2, norm="groupnorm")
    st = _check_min("exact", backend, torch.float64, model, N, 2, every=every)
    if every == 1:
        assert st["recomputed_weights"] == 0


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(CPP_MODELS))
def test_cpp_min_on_every_model_shape(dtype, shape):
    model = _convnet(dtype=dtype, **CPP_MODELS[shape])
    _check_min("exact", "cpu", dtype, model, 5, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_order_min(backend):
    model = _convnet(depth=2, norm="groupnorm")
    _check_min("first-order", backend, torch.float64, model, 4, 2)


def test_min_on_any_module():
    model = _MLPStudent().double()
    X, Y, ws, wt = make_problem(model, 6, 3, (5, 5), torch.float64)
    ref = grads(naive_unroll, model, X, Y, ws, wt)
    eng = get_adjoint_engine("exact", None, "min")
    out = grads(eng, model, X, Y, ws, wt)
    assert eng.last_backend == "torch" and eng.last_stats["stored_weights"] <= _min_bound(6, 3)
    for a, r in zip(out, ref):
        assert rel_err(a, r) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_held_grow_as_sqrt_n(backend):
    """The most w_t held at once: <= ceil(N/s) + s + 1 (~2 sqrt(N)), against N + 1 at budget 0."""
    model = _convnet(depth=1, norm="none", width=4, im=5)
    held = {}
    for N in (1, 4, 9, 16, 17, 36, 64):
        X, Y, ws, wt = make_problem(model, N, 1, tuple(model.im_size), torch.float64)
        eng = get_adjoint_engine("exact", backend, "min")
        grads(eng, model, X, Y, ws, wt)
        held[N] = eng.last_stats["stored_weights"]
        assert held[N] <= _min_bound(N, checkpoint_every(N)) <= 2 * math.isqrt(N) + 3, (N, held[N])
        eng0 = get_adjoint_engine("exact", backend, 0)
        grads(eng0, model, X, Y, ws, wt)
        assert eng0.last_stats["stored_weights"] == N + 1
    assert held[64] <= 19 and held[64] < held[16] * 3  # 64 steps: ~17 vectors, not 65


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_min_equals_naive(dtype, backend):
    """HaBa's streamed batches (generate + augment per step, rebuilt for the recomputed segments too)."""
    from haba_fast.objectives.mtt import build_inputs, trajectory_loss

    N = 5
    syn, plan, model, ws, wt = _haba_problem(N, dtype)
    naive = get_engine("naive")

    def stacked(lr):
        X, Y = build_inputs(syn, plan)
        return naive(model, X, Y, ws, wt, lr)

    ref = _syn_grads(stacked, syn, dtype)
    eng0 = get_adjoint_engine("exact", backend, 0)
    base = _syn_grads(lambda lr: trajectory_loss(eng0, model, syn, plan, ws, wt, lr), syn, dtype)
    eng = get_adjoint_engine("exact", backend, "min")
    got = _syn_grads(lambda lr: trajectory_loss(eng, model, syn, plan, ws, wt, lr), syn, dtype)
    assert eng.last_backend == backend and eng.last_stats["recomputed_weights"] == N - 2
    for i, (a, b, r) in enumerate(zip(got, base, ref)):
        assert rel_err(a, b) < REL[dtype], (i, rel_err(a, b))
        assert rel_err(a, r) < REL[dtype] * (1 if dtype == torch.float64 else 10), (i, rel_err(a, r))


def test_min_plumbing():
    """Naive refuses it; the distill config, CLI flag and bench flag take it; auto keeps the C++ op on CPU."""
    import argparse

    from haba_fast.commands.distill import add_arguments, config_from_args
    from haba_fast.distill import DistillConfig

    with pytest.raises(ValueError, match="takes no memory budget"):
        get_engine("naive", memory_budget="min")
    assert get_engine("exact", memory_budget="minimal").memory_budget == MINIMAL
    DistillConfig(memory_budget="min").validate()
    with pytest.raises(ValueError, match="applies to --objective mtt"):
        DistillConfig(memory_budget="min", objective="dm").validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--memory-budget", "min"])).memory_budget == "min"
    if extension_loaded():
        model = _convnet()
        X, Y, ws, wt = make_problem(model, 3, 2, tuple(model.im_size), torch.float64)
        eng = get_adjoint_engine("exact", None, "min")
        grads(eng, model, X, Y, ws, wt)
        assert eng.last_backend == "cpu" and eng.last_stats["stored_weights"] <= _min_bound(3, 2)


def test_budget_report_min_rows(tmp_path):
    """bench/run_memory_budget.sh's report: min rows get their own syn_steps section and a CPU verdict, and stay
    out of the largest-budget and cap verdicts."""
    from haba_fast.benchmarks.iteration import write_budget_report

    def row(budget, cpu, rss, steps=20, held=None):
        return dict(ipc=10, syn_steps=steps, batch_syn=100, memory_budget=budget, memory_budget_mb=0,
                    engine_backend="cpu", s_per_iter=2 * cpu, cpu_s_per_iter=cpu, peak_rss_mb=rss,
                    stored_weights=held)

    rows = [row("0", 40.0, 1000, held=21), row("min", 50.0, 990, held=10), row("unlimited", 30.0, 3000)]
    rows += [dict(row("0", 50.0, 1000, held=21), paired_with="min")]  # min's reference, not unlimited's
    rows += [row("min", 30.0, rss, steps=10, held=6) for rss in (900, 904)] + [row("min", 250.0, 920, 80, 19)]
    write_budget_report(rows, str(tmp_path / "memory_budget.json"))
    text = (tmp_path / "MEMORY_BUDGET.md").read_text()
    assert "budget min (checkpointed weight trajectory) / budget 0 (medians of 1 and 1 runs): CPU **1.00x**" in text
    assert "largest budget run (unlimited) / budget 0 (medians of 1 and 1 runs): CPU **0.750x**" in text
    assert "budget min: peak RSS" not in text
    assert "## Memory flat in syn_steps (budget min: checkpointed weight trajectory, bpc 10, batch 100)" in text
    assert "(medians of 1 and 2 runs): **1.020x** (target <= 1.05x) -> met" in text
    assert "holds at most 6 w_t at 10 steps and 19 at 80" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_backward_twice(backend):
    """retain_graph: a second backward recomputes the segments again and gives the same gradients."""
    model = _convnet(depth=1, norm="none", width=4, im=5)
    X, Y, ws, wt = make_problem(model, 5, 2, tuple(model.im_size), torch.float64)
    Xr = X.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = get_adjoint_engine("exact", backend, "min")(model, Xr, Y, ws, wt, lr)
    first = torch.autograd.grad(loss, (Xr, lr), retain_graph=True)
    second = torch.autograd.grad(loss, (Xr, lr))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
