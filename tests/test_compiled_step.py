"""The compiled torch step (``compile_step=True``): torch.func forward-over-reverse under torch.compile.

Oracles: the torch step (autograd's double backward) per step, and the naive create-graph unroll per engine call,
values and gradients, float64 to 1e-12 and float32 to 1e-5. Most tests compile with ``aot_eager`` (dynamo and
AOTAutograd trace the same graphs as inductor, without generating code: seconds instead of tens of seconds); one
test runs inductor's generated code end to end.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_adjoint import _convnet, _MLPStudent, grads, make_problem, naive_unroll, rel_err
from test_distill import buffer, digits  # noqa: F401, F811  (module fixtures reused)
from test_memory_budget import _haba_problem, _syn_grads

from haba_fast.engines import adjoint, get_adjoint_engine, get_engine

REL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles its own steps: dynamo's caches start empty (its recompile limit, 8 by default, counts every
    new input shape, dtype and architecture in the process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def traced_only(monkeypatch):
    """Compile with aot_eager (the traced graphs, no generated code)."""
    monkeypatch.setattr(adjoint, "COMPILE_BACKEND", "aot_eager")


MODELS = {
    "instancenorm-relu-avgpool": lambda dtype: _convnet(depth=2, width=4, im=7, dtype=dtype),
    "groupnorm-sigmoid-odd": lambda dtype: _convnet(
        depth=2, norm="groupnorm", act="sigmoid", im=9, width=8, dtype=dtype
    ),
    "layernorm-maxpool": lambda dtype: _convnet(depth=2, norm="layernorm", pool="maxpooling", width=4, dtype=dtype),
    "batchnorm-leakyrelu-3": lambda dtype: _convnet(
        depth=3, norm="batchnorm", act="leakyrelu", im=8, width=4, dtype=dtype
    ),
    "mlp": lambda dtype: _MLPStudent().to(dtype),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_step_equals_the_torch_step(name, dtype):
    """g, <g, lam>, H_ww lam and H_xw lam of one step against autograd's double backward (the torch step)."""
    model = MODELS[name](dtype)
    im = (5, 5) if name == "mlp" else tuple(model.im_size)
    X, Y, ws, _ = make_problem(model, 1, 3, im, dtype)
    lam = torch.randn(ws.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref, comp = adjoint._TorchStep(model), adjoint._CompiledStep(model, "aot_eager")
    assert rel_err(comp.grad(ws, X[0], Y[0]), ref.grad(ws, X[0], Y[0])) < REL[dtype]
    want = ref.adjoint(None, ws, X[0], Y[0], lam, True, True)
    got = comp.adjoint(None, ws, X[0], Y[0], lam, True, True)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < REL[dtype] * 10
    g_dot_lam, hw, hx = comp.adjoint(None, ws, X[0], Y[0], lam, False, False)
    assert hw is None and hx is None and torch.equal(g_dot_lam, got[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["exact", "first-order"])
def test_compiled_engine_at_every_budget_it_takes(traced_only, name, dtype):
    """Budget 0, ``min`` (recomputed weight segments) and offloaded weights: the torch step's gradients, and for
    exact the naive unroll's; odd N."""
    model = _convnet(depth=2, width=4, im=7, dtype=dtype)
    X, Y, ws, wt = make_problem(model, 5, 3, (7, 7), dtype)
    base = grads(get_adjoint_engine(name, "torch", 0), model, X, Y, ws, wt, lr_value=0.1)
    for budget, offload in ((0, False), ("min", False), (0, True)):
        eng = get_adjoint_engine(name, None, budget, offload_weights=offload, compile_step=True)
        out = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
        assert eng.last_backend == "torch" and eng.last_stats["stored_steps"] == 0
        for a, b in zip(out, base):
            assert rel_err(a, b) < REL[dtype] * 10, (budget, offload)
    if name == "exact":
        ref = grads(naive_unroll, model, X, Y, ws, wt, lr_value=0.1)
        for a, b in zip(out, ref):
            assert rel_err(a, b) < REL[dtype] * 10


@pytest.mark.parametrize("budget", [0, "min"])
def test_compiled_engine_streams_a_haba_plan(traced_only, budget):
    """Streamed batches (generate + augment per step, pushed into the bases and hallucinators): the bases', the
    hallucinators' and lr's gradients equal the naive unroll's on the stacked batches."""
    from haba_fast.objectives.mtt import trajectory_loss

    syn, plan, model, ws, wt = _haba_problem(4, torch.float64)
    eng = get_adjoint_engine("exact", None, budget, compile_step=True)
    got = _syn_grads(lambda lr: trajectory_loss(eng, model, syn, plan, ws, wt, lr), syn, torch.float64)
    want = _syn_grads(lambda lr: trajectory_loss(get_engine("naive"), model, syn, plan, ws, wt, lr), syn, torch.float64)
    assert eng.last_backend == "torch"
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-11


def test_a_compiled_step_is_kept_for_its_model(traced_only):
    """The engine reuses its compiled step while the model stays the same (a run's student), and makes a new one
    for another model."""
    model = _convnet(depth=1, width=4, im=6)
    other = _convnet(depth=1, width=4, im=6, seed=1)
    eng = get_adjoint_engine("exact", compile_step=True)
    seen = []
    for m in (model, model, other):
        X, Y, ws, wt = make_problem(m, 2, 2, (6, 6), torch.float64)
        ref = grads(naive_unroll, m, X, Y, ws, wt)
        for a, b in zip(grads(eng, m, X, Y, ws, wt), ref):
            assert rel_err(a, b) < 1e-12
        seen.append(eng._compiled)
    assert seen[0] is seen[1] and seen[2] is not seen[1] and seen[2].model is other


def test_compile_step_refuses_what_it_cannot_honour(monkeypatch):
    with pytest.raises(ValueError, match="compile_step recomputes every step"):
        get_adjoint_engine("exact", memory_budget="unlimited", compile_step=True)
    with pytest.raises(ValueError, match="compile_step recomputes every step"):
        get_adjoint_engine("exact", memory_budget="2GB", compile_step=True)
    with pytest.raises(ValueError, match="cannot run with backend 'cpu'"):
        get_adjoint_engine("exact", "cpu", compile_step=True)
    model = _convnet(depth=1, width=4, im=6)
    X, Y, ws, wt = make_problem(model, 2, 2, (6, 6), torch.float64)
    monkeypatch.setenv("HABA_FAST_BACKEND", "cpu")  # the environment names it: refused at the call
    with pytest.raises(ValueError, match="cannot run with backend 'cpu'"):
        grads(get_adjoint_engine("exact", compile_step=True), model, X, Y, ws, wt)
    assert "compile_step=True" in repr(get_adjoint_engine("exact", compile_step=True))
    assert "compile_step" not in repr(get_adjoint_engine("exact"))


def test_bench_iteration_compile_step_row(traced_only):
    """``haba-fast bench iteration --compile-step``: the engine it builds, and the report's label and target line."""
    import argparse

    from haba_fast.benchmarks import iteration

    p = argparse.ArgumentParser()
    iteration.add_arguments(p)
    args = p.parse_args(["--compile-step", "--ipc", "2", "--syn-steps", "2", "--batch-syn", "4", "--width", "32"])
    d = iteration.build_distiller(args)
    assert d.engine.compile_step and d.engine.memory_budget == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.step()
    assert d.engine.last_backend == "torch"
    row = {"engine": "exact", "compile_step": True, "backend_requested": None}
    assert iteration._label(row) == "exact (compiled step)"
    naive = p.parse_args(["--engine", "naive", "--compile-step"])
    with pytest.raises(ValueError, match="naive takes none"):
        iteration.run(naive)


def test_inductor_generated_code_equals_the_naive_unroll():
    """The default compiler (inductor, C++ code on a CPU; Triton kernels on CUDA) end to end, float64."""
    model = _convnet(depth=1, width=4, im=6)
    X, Y, ws, wt = make_problem(model, 3, 2, (6, 6), torch.float64)
    eng = get_adjoint_engine("exact", compile_step=True)
    out = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
    ref = grads(naive_unroll, model, X, Y, ws, wt, lr_value=0.1)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-12


def test_a_compile_failure_is_a_clear_error():
    """Each new input shape is a recompile (dynamic=False); past dynamo's recompile limit the step raises a
    RuntimeError that names the option to drop, not dynamo's internals."""
    model = _convnet(depth=1, width=4, im=6)
    X, Y, ws, _ = make_problem(model, 1, 4, (6, 6), torch.float64)
    step, ref = adjoint._CompiledStep(model, "aot_eager"), adjoint._TorchStep(model)
    config = torch._dynamo.config  # its own patch() restores the limit (monkeypatch would delete it on undo)
    name = "recompile_limit" if "recompile_limit" in dir(config) else "cache_size_limit"
    with config.patch(**{name: 2}):
        for b in (1, 2):
            assert rel_err(step.grad(ws, X[0][:b], Y[0][:b]), ref.grad(ws, X[0][:b], Y[0][:b])) < 1e-12
        with pytest.raises(RuntimeError, match="compile_step: dynamo's recompile limit is reached .* compile_step"):
            step.grad(ws, X[0][:3], Y[0][:3])
    assert getattr(config, name) == 8


def test_distill_plumbing():
    """``haba-fast distill --compile-step`` / ``DistillConfig.compile_step``: reaches the engine, is refused where
    it cannot apply, and is a result key on resume (the compiled step rounds differently from the C++ op)."""
    import argparse

    from haba_fast.checkpoint import NON_RESULT_KEYS
    from haba_fast.commands.distill import add_arguments, config_from_args
    from haba_fast.distill import DistillConfig

    with pytest.raises(ValueError, match="no step to compile"):
        get_engine("naive", compile_step=True)
    assert get_engine("exact", memory_budget="min", compile_step=True).compile_step
    assert DistillConfig().compile_step is False
    DistillConfig(compile_step=True).validate()
    DistillConfig(compile_step=True, memory_budget="min", offload_weights=False).validate()
    with pytest.raises(ValueError, match="--compile-step recomputes every step"):
        DistillConfig(compile_step=True, memory_budget="2GB").validate()
    for bad in (dict(objective="dm"), dict(engine="naive")):
        with pytest.raises(ValueError, match="--compile-step applies to --objective mtt"):
            DistillConfig(compile_step=True, **bad).validate()
    assert "compile_step" not in NON_RESULT_KEYS
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--compile-step"])).compile_step is True
    assert config_from_args(parser.parse_args(["--compile_step"])).compile_step is True
    assert config_from_args(parser.parse_args([])).compile_step is False


def test_distiller_step_with_the_compiled_step(traced_only, digits, buffer):  # noqa: F811
    """A HaBa Distiller with --compile-step: the engine it builds, its description, one iteration's matching loss
    and gradients (lr, bases, hallucinators) against the naive unroll on the same plan, and a whole step."""
    from test_distill import _cfg

    from haba_fast.distill import Distiller
    from haba_fast.objectives.mtt import trajectory_loss

    d = Distiller(_cfg(engine="exact", compile_step=True), digits, buffer)
    assert d.engine.compile_step and "step compiled with torch.compile" in d.objective.describe()
    _, _, w_start, w_target = d.sample_trajectory()
    plan = d.sample_plan()
    syn = d.synthetic
    params = [d.syn_lr, syn.bases] + list(syn.hallucinator_parameters())
    results = []
    for engine in (get_engine("naive"), d.engine):
        loss = trajectory_loss(engine, d.student, syn, plan, w_start, w_target, d.syn_lr)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l_ref, g_ref), (l_out, g_out) = results
    assert d.engine.last_backend == "torch" and rel_err(l_out, l_ref) < 1e-5
    for a, b in zip(g_out, g_ref):
        assert rel_err(a, b) < 1e-4  # float32 end to end
    before = syn.bases.detach().clone()
    d.step()
    assert float((syn.bases.detach() - before).abs().max()) > 0
