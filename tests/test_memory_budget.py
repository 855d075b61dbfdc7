"""Memory budgets and streamed batches of the adjoint engines: same gradients at every budget, as naive.

Oracle: ``naive_unroll`` of tests/test_adjoint.py (a plain create-graph unroll through ``functional_forward``).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from test_adjoint import _convnet, _MLPStudent, grads, make_problem, naive_unroll, rel_err
from test_distill import buffer, digits  # noqa: F401, F811  (module fixtures reused)
from utils import devices, extension_loaded, load_bench_script

from haba_fast._ext import has_op
from haba_fast.backend import BackendUnavailableError
from haba_fast.engines import get_adjoint_engine, get_engine
from haba_fast.engines.memory import budget_bytes, keep_last, parse_memory_budget

# Relative tolerance of "identical" gradients per dtype.
REL = {torch.float64: 1e-12, torch.float32: 1e-5}

needs_cpp = pytest.mark.skipif(not extension_loaded(), reason="the C++ extension is not built")


@pytest.fixture(params=["fused", "composite"])
def cpp_path(request, monkeypatch):
    """The C++ op's two CPU paths: its fused loops, and the ATen-only path that CUDA tensors run
    (``HABA_FAST_TRAJECTORY_FUSED=0``): both checked against the oracles on a CPU-only machine."""
    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "1" if request.param == "fused" else "0")
    return request.param


# ----------------------------------------------------------------------------------------------------------------------
# Parsing and the schedule.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        (0, 0),
        (None, 0),
        ("512MB", 512 * 2**20),
        ("8GB", 8 * 2**30),
        ("8gb", 8 * 2**30),
        ("1.5GiB", int(1.5 * 2**30)),
        ("100k", 100 * 1024),
        ("4096", 4096),
        (" 2 G ", 2 * 2**30),
        ("auto", "auto"),
        ("AUTO", "auto"),
        ("unlimited", "unlimited"),
        ("inf", "unlimited"),
    ],
)
def test_parse_memory_budget(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize(
    "bad", ["-1GB", "8XB", "GB", "", "1e9", "lots", "none", "0.5", "0.1B", -5, 0.5, float("nan"), True, [1]]
)
def test_parse_memory_budget_rejects_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory_budget(bad)


def test_budget_bytes_resolves_auto_and_unlimited(monkeypatch):
    from haba_fast.engines import memory

    assert budget_bytes("unlimited", torch.device("cpu")) is None
    assert budget_bytes("1MB", torch.device("cpu")) == 2**20
    assert 0 < budget_bytes("auto", torch.device("cpu")) <= memory.free_memory_bytes(torch.device("cpu"))
    # auto = the stated fraction of what the device has free now
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 10 * 2**30)
    assert budget_bytes("auto", torch.device("cpu")) == int(memory.AUTO_FRACTION * 10 * 2**30)
    assert 0 < memory.AUTO_FRACTION < 1


@pytest.mark.parametrize("budget, held", [("unlimited", True), ("0", False), (None, False), ("min", False),
                                          ("8GB", False), ("auto", False)])
def test_before_any_unroll_only_an_unlimited_budget_holds_the_step_buffers(budget, held):
    """Before an unroll has measured a step, a run holds its steps' blocks between steps only where no cap is to be
    kept (unlimited); 0 and min keep the smallest footprint."""
    from haba_fast.engines.memory import holds_step_buffers

    assert holds_step_buffers(budget) is held


def test_spare_bytes():
    from haba_fast.engines.memory import spare_bytes

    assert spare_bytes(dict(memory_budget_bytes=100, stored_steps=3, per_step_bytes=20)) == 20  # 100 - (3 + 1) x 20
    assert spare_bytes(dict(memory_budget_bytes=100, stored_steps=0, per_step_bytes=0)) == 100
    assert spare_bytes(dict(memory_budget_bytes=0, stored_steps=0, per_step_bytes=0)) == 0
    assert spare_bytes(dict(memory_budget_bytes=None, stored_steps=7, per_step_bytes=20)) is None  # unlimited
    assert spare_bytes({}) is None


@pytest.mark.skipif(not has_op("buffer_cache_stats"), reason="C++ extension without the buffer cache")
@pytest.mark.parametrize("budget, stored, per_step_mb, held", [
    ("100MB", 3, 20, True),   # 100 - 4 x 20 = 20 MB spare >= the 20 MB cap
    ("100MB", 4, 20, False),  # the kept steps fill it: 0 MB spare
    ("100MB", 3, 21, False),  # 16 MB spare < 20 MB
    ("21MB", 0, 1, True),     # nothing kept yet room for the cap
    ("0", 0, 0, False),       # budget 0 and min never hold
    ("min", 0, 0, False),
    ("unlimited", 7, 20, True),
    ("100MB-cuda", 3, 20, False),  # a budget of GPU memory says nothing about the host's
])
def test_a_sized_budget_holds_once_its_spare_bytes_hold_the_free_cap(monkeypatch, budget, stored, per_step_mb,
                                                                    held):
    """After an unroll, a size (or auto) holds the step buffers only if what its kept steps and the step being
    computed leave of it holds the cache's whole free cap (HABA_FAST_BUFFER_CACHE_MB): then peak RSS stays within
    budget + budget 0's peak."""
    from haba_fast.engines.memory import budget_bytes, holds_step_buffers

    monkeypatch.setenv("HABA_FAST_BUFFER_CACHE_MB", "20")
    budget, _, device = budget.partition("-")
    stats = dict(memory_device=device or "cpu", memory_budget_bytes=budget_bytes(budget, torch.device("cpu")),
                 stored_steps=stored, per_step_bytes=per_step_mb << 20)
    assert holds_step_buffers(budget, stats) is held
    assert holds_step_buffers(budget, {}) is (budget == "unlimited"), "no unroll yet: only unlimited holds"


def test_keep_last():
    assert keep_last(7, 10, None) == 7
    assert keep_last(7, 10, 0) == 0
    assert keep_last(7, 10, 35) == 2  # one step held back for the step being computed
    assert keep_last(7, 10, 20) == 1
    assert keep_last(7, 10, 10**6) == 7
    with pytest.warns(RuntimeWarning, match="holds no step"):
        assert keep_last(7, 10, 19) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Engine gradients at every budget (torch backend: the one that stores steps).


def _run(engine, model, X, Y, ws, wt):
    out = grads(engine, model, X, Y, ws, wt, lr_value=0.1)
    return out, dict(engine.last_stats)


# The C++ engine's models (several shapes: its fused CPU loops and its composite path, layernorm / maxpooling).
CPP_MODELS = {
    "instancenorm": dict(depth=2, norm="instancenorm"),
    "groupnorm-sigmoid-odd": dict(depth=2, norm="groupnorm", act="sigmoid", im=11, width=8),
    "layernorm-maxpool": dict(depth=2, norm="layernorm", pool="maxpooling"),
    "nonorm-nopool-3": dict(depth=3, norm="none", pool="none", act="leakyrelu", im=7, width=4),
}


def _check_every_budget(name, backend, dtype, model, N, batch):
    """Budgets holding 1..N steps (and unlimited) give budget 0's gradients; exact ones also the naive unroll's."""
    X, Y, ws, wt = make_problem(model, N, batch, tuple(model.im_size), dtype)
    base, stats0 = _run(get_adjoint_engine(name, backend, 0), model, X, Y, ws, wt)
    assert stats0["stored_steps"] == 0 and stats0["recomputed_steps"] == N
    out, stats = _run(get_adjoint_engine(name, backend, "unlimited"), model, X, Y, ws, wt)
    per_step = stats["per_step_bytes"]
    assert per_step > 0 and stats["stored_steps"] == N and stats["recomputed_steps"] == 0
    runs = [(N, out)]
    for k in range(1, N + 1):
        eng = get_adjoint_engine(name, backend, per_step * (k + 1) + per_step // 2)
        out, st = _run(eng, model, X, Y, ws, wt)
        assert eng.last_backend == backend
        assert st["stored_steps"] == k and st["recomputed_steps"] == N - k
        runs.append((k, out))
    for k, out in runs:
        for a, b in zip(out, base):
            assert rel_err(a, b) < REL[dtype], (k, rel_err(a, b))
    if name == "exact":
        ref = grads(naive_unroll, model, X, Y, ws, wt, lr_value=0.1)
        for k, out in [(0, base)] + runs:
            for a, b in zip(out, ref):
                assert rel_err(a, b) < REL[dtype] * (1 if dtype == torch.float64 else 10), (k, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["exact", "first-order"])
def test_every_budget_gives_the_budget_zero_gradients(dtype, name):
    model = _convnet(depth=2, norm="instancenorm", dtype=dtype)
    _check_every_budget(name, "torch", dtype, model, 5, 3)  # odd N


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(CPP_MODELS))
def test_cpp_every_budget_gives_the_budget_zero_and_naive_gradients(dtype, shape, cpp_path):
    """The C++ op's kept steps: 1..N stored (odd N), unlimited, against budget 0 and the naive unroll; fused and
    ATen-only paths."""
    model = _convnet(dtype=dtype, **CPP_MODELS[shape])
    _check_every_budget("exact", "cpu", dtype, model, 5 if shape == "instancenorm" else 3, 3)


@needs_cpp
def test_cpp_first_order_budget():
    model = _convnet(depth=2, norm="groupnorm")
    _check_every_budget("first-order", "cpu", torch.float64, model, 3, 2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpp)])
def test_budget_below_one_step_falls_back_to_zero_with_a_warning(backend):
    model = _convnet()
    X, Y, ws, wt = make_problem(model, 3, 2, tuple(model.im_size), torch.float64)
    base = grads(get_adjoint_engine("exact", backend), model, X, Y, ws, wt)
    eng = get_adjoint_engine("exact", backend, 100)
    Xr = X.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=X.dtype, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="holds no step"):
        loss = eng(model, Xr, Y, ws, wt, lr)
    loss.backward()
    assert eng.last_stats["stored_steps"] == 0 and eng.last_stats["recomputed_steps"] == 3
    for a, b in zip((loss.detach(), Xr.grad, lr.grad), base):
        assert rel_err(a, b) < 1e-12


def test_budget_on_any_module():
    model = _MLPStudent().double()
    X, Y, ws, wt = make_problem(model, 4, 3, (5, 5), torch.float64)
    ref = grads(naive_unroll, model, X, Y, ws, wt)
    for b in (0, "unlimited"):
        eng = get_adjoint_engine("exact", None, b)
        out = grads(eng, model, X, Y, ws, wt)
        assert eng.last_backend == "torch"
        for a, r in zip(out, ref):
            assert rel_err(a, r) < 1e-12


def _peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before: the CUDA allocator's statistics,
    or on a CPU the profiler's allocation records (each op's net allocation, in order)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n_steps", [1, 4, 7])
def test_kept_torch_steps_hold_no_more_than_the_naive_unroll(device, n_steps):
    """Every step kept (the torch backend: create-graph graphs, as naive's) peaks no higher than naive: the kept
    graphs save the trajectory's own w_t, not copies of it (a copy per step was N x P bytes over naive)."""
    model = _convnet(depth=2, width=16, im=8).to(device)
    X, Y, ws, wt = (t.to(device) for t in make_problem(model, n_steps, 4, (8, 8), torch.float64))

    def call(engine):
        def fn():
            Xr = X.clone().requires_grad_(True)
            lr = torch.tensor(0.1, dtype=X.dtype, device=device, requires_grad=True)
            engine(model, Xr, Y, ws, wt, lr).backward()

        return fn

    exact = get_adjoint_engine("exact", "torch", "unlimited")
    naive_peak = _peak_bytes(call(get_engine("naive")), device)
    exact_peak = _peak_bytes(call(exact), device)
    assert exact.last_stats["stored_steps"] == n_steps
    assert naive_peak > 0 and exact_peak <= naive_peak, (exact_peak, naive_peak)


def test_a_kept_torch_step_saves_the_trajectorys_weights():
    """The kept graph's weight leaf shares w_t's storage (the trajectory never writes a w_t after making it)."""
    from haba_fast.engines.adjoint import _AllWeights, _TorchStep

    model = _convnet(depth=2, width=4, im=7)
    X, Y, ws, wt = make_problem(model, 3, 2, (7, 7), torch.float64)

    class _Holder:
        w_start, stats = ws, {}

    lr = torch.tensor(0.1, dtype=torch.float64)
    traj = _AllWeights(_Holder(), 3, lr)
    step = _TorchStep(model)
    gs = []
    for t in range(3):
        w = traj.current(t)
        g, (wl, _, _) = step.keep(w, X[t], Y[t])
        assert wl.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        traj.advance(t, g)
        gs.append(g)
    assert len({traj.at(t).untyped_storage().data_ptr() for t in range(4)}) == 4
    for t in range(3):
        assert torch.equal(traj.at(t + 1), traj.at(t) - lr * gs[t])
    with pytest.raises(RuntimeError, match="forward sweep is at step 3"):
        traj.advance(1, g)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpp)])
@pytest.mark.parametrize("budget", [0, "unlimited"])
@pytest.mark.parametrize("which", ["w_start", "w_target"])
def test_a_snapshot_changed_in_place_before_backward_is_an_error(which, budget, backend):
    """The backward sweep reads the caller's w_start (as w_0) and w_target again; changing either in place after the
    forward pass is a clear error, as autograd makes it for the tensors naive's graph saves (streamed batches: the
    per-step path on both backends)."""
    from haba_fast.objectives.mtt import trajectory_loss

    syn, plan, model, ws, wt = _haba_problem(3, torch.float64)
    snaps = {"w_start": ws.clone(), "w_target": wt.clone()}
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    eng = get_adjoint_engine("exact", backend, budget)
    loss = trajectory_loss(eng, model, syn, plan, snaps["w_start"], snaps["w_target"], lr)
    snaps[which].add_(1.0)  # the caller reuses its buffer before the backward pass
    with pytest.raises(RuntimeError, match="w_start or w_target was modified in place"):
        loss.backward()


# ----------------------------------------------------------------------------------------------------------------------
# The backend dispatch.


@needs_cpp
def test_dispatch_names_and_budget_routing():
    model = _convnet()
    X, Y, ws, wt = make_problem(model, 2, 2, tuple(model.im_size), torch.float64)
    eng = get_adjoint_engine("exact", "auto")
    grads(eng, model, X, Y, ws, wt)
    assert eng.last_backend == "cpu" and eng.last_stats["recomputed_steps"] == 2
    eng = get_adjoint_engine("exact", None, "unlimited")  # CPU tensors: the C++ op, which keeps the steps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the budget is spent
        eng(model, X.clone().requires_grad_(True), Y, ws, wt, torch.tensor(0.1, dtype=torch.float64)).backward()
    assert eng.last_backend == "cpu" and eng.last_stats["stored_steps"] == 2
    assert eng.last_stats["recomputed_steps"] == 0
    eng = get_adjoint_engine("exact", "torch", "unlimited")
    grads(eng, model, X, Y, ws, wt)
    assert eng.last_backend == "torch" and eng.last_stats["stored_steps"] == 2
    cpp = _MLPStudent().double()  # a model the C++ op cannot run: auto takes torch, which spends the budget
    Xm, Ym, wsm, wtm = make_problem(cpp, 2, 2, (5, 5), torch.float64)
    eng = get_adjoint_engine("exact", None, "unlimited")
    grads(eng, cpp, Xm, Ym, wsm, wtm)
    assert eng.last_backend == "torch" and eng.last_stats["stored_steps"] == 2


def test_forced_cpu_backend_on_a_module_it_cannot_run_raises():
    model = _MLPStudent().double()
    X, Y, ws, wt = make_problem(model, 2, 2, (5, 5), torch.float64)
    with pytest.raises(BackendUnavailableError, match="not a ConvNet"):
        get_adjoint_engine("exact", "cpu")(model, X, Y, ws, wt, torch.tensor(0.1, dtype=torch.float64))


def test_naive_takes_no_budget_and_bad_names_raise():
    with pytest.raises(ValueError, match="takes no memory budget"):
        get_engine("naive", memory_budget="1GB")
    assert get_engine("naive", memory_budget=0).name == "naive"
    assert get_engine("exact", memory_budget="2GB").memory_budget == 2 * 2**30
    with pytest.raises(ValueError, match="memory budget"):
        get_engine("exact", memory_budget="2 apples")
    with pytest.raises(ValueError, match="unknown backend"):
        get_adjoint_engine("exact", backend="gpu")


# ----------------------------------------------------------------------------------------------------------------------
# Streamed batches: engine.stream(make_inputs) == engine(X) with X built in one call, for HaBa.


def _haba_problem(N, dtype, strategy="color_crop_cutout_flip_scale_rotate"):
    from haba_fast.factorization import HaBa
    from haba_fast.models import flatten_params
    from haba_fast.plan import IndexStream, sample_plan

    g = torch.Generator().manual_seed(3)
    syn = HaBa(4, 2, 3, (9, 9), n_hallucinators=3, generator=g).to(dtype)
    plan = sample_plan(IndexStream(8, 4), N, 3, (9, 9), strategy=strategy, generator=g)
    model = _convnet(channel=3, k=4, im=9, dtype=dtype)
    ws = flatten_params(model).to(dtype)
    wt = ws + 0.1 * torch.randn(ws.shape, generator=g, dtype=dtype)
    return syn, plan, model, ws, wt


def _syn_grads(fn, syn, dtype):
    syn.zero_grad(set_to_none=True)
    lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fn(lr)
    loss.backward()
    return [loss.detach(), lr.grad] + [p.grad.clone() for p in syn.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "backend, budget",
    [("torch", 0), ("torch", "unlimited"), ("torch", "mid"), ("cpu", 0), ("cpu", "unlimited"), ("cpu", "mid")],
)
def test_streamed_equals_stacked_and_naive(dtype, backend, budget):
    from haba_fast.objectives.mtt import build_inputs, trajectory_loss

    if backend == "cpu" and not extension_loaded():
        pytest.skip("the C++ extension is not built")
    N = 5
    syn, plan, model, ws, wt = _haba_problem(N, dtype)
    naive = get_engine("naive")

    def stacked(lr):
        X, Y = build_inputs(syn, plan)
        return naive(model, X, Y, ws, wt, lr)

    ref = _syn_grads(stacked, syn, dtype)
    if budget == "mid":  # measure one step, then a budget holding 2 of the 5 steps
        probe = get_adjoint_engine("exact", backend, "unlimited")
        _syn_grads(lambda lr: trajectory_loss(probe, model, syn, plan, ws, wt, lr), syn, dtype)
        budget = int(probe.last_stats["per_step_bytes"] * 3.5)
    eng = get_adjoint_engine("exact", backend, budget)
    got = _syn_grads(lambda lr: trajectory_loss(eng, model, syn, plan, ws, wt, lr), syn, dtype)
    assert eng.last_backend == backend
    if budget == "unlimited":
        assert eng.last_stats["recomputed_steps"] == 0
    elif budget != 0:
        assert eng.last_stats["stored_steps"] == 2
    tol = REL[dtype] * (1 if dtype == torch.float64 else 10)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) < tol, (i, rel_err(a, b))


def test_streamed_checks_make_inputs():
    syn, plan, model, ws, wt = _haba_problem(2, torch.float64)
    eng = get_adjoint_engine("exact", "torch")
    with pytest.raises(ValueError, match="n_steps"):
        eng.stream(model, lambda t: None, 0, list(syn.parameters()), ws, wt, 0.1)
    bad = lambda t: (torch.zeros(3, 3, 9, 9, dtype=torch.float64), torch.zeros(3, dtype=torch.long))  # noqa: E731
    with pytest.raises(ValueError, match="make_inputs"):
        eng.stream(model, lambda t: (bad(t)[0][None], bad(t)[1]), 2, list(syn.parameters()), ws, wt, 0.1)


def _count_calls(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_streamed_plan_is_checked_once_per_iteration_not_per_step(backend, monkeypatch):
    """trajectory_loss checks the step plan's indices and augmentation parameters once, on the host
    (mtt.check_plan), and builds every step's batch under ops.values_checked(): the checks that read a value back
    from the device (a sync per call on CUDA) run as often at 6 steps as at 2; the C++ op's steps skip their value
    checks. Outside the context the ops still check every call."""
    from haba_fast import ops
    from haba_fast.engines.adjoint import _CppStep
    from haba_fast.objectives.mtt import step_inputs, trajectory_loss

    if backend == "cpu" and not extension_loaded():
        pytest.skip("the C++ extension is not built")
    steps_made: list = []
    real_init = _CppStep.__init__

    def recording_init(self, spec, check_values=True):
        steps_made.append(check_values)
        real_init(self, spec, check_values)

    monkeypatch.setattr(_CppStep, "__init__", recording_init)
    counts = {}
    for N in (2, 6):
        bounds = _count_calls(monkeypatch, ops, "check_index_bounds")
        finite = _count_calls(monkeypatch, ops, "check_augment_params")
        syn, plan, model, ws, wt = _haba_problem(N, torch.float64)
        _syn_grads(lambda lr: trajectory_loss(get_adjoint_engine("exact", backend), model, syn, plan, ws, wt, lr),
                   syn, torch.float64)
        counts[N] = (len(bounds), len(finite))
        monkeypatch.undo()
        monkeypatch.setattr(_CppStep, "__init__", recording_init)
    assert counts[2] == counts[6] and counts[2][0] >= 1 and counts[2][1] >= 1, counts
    assert steps_made == ([False, False] if backend == "cpu" else [])
    bounds = _count_calls(monkeypatch, ops, "check_index_bounds")
    finite = _count_calls(monkeypatch, ops, "check_augment_params")
    step_inputs(syn, plan.to("cpu"), 0)  # outside the context: generate and augment check their values
    assert len(bounds) == 1 and len(finite) >= 1


def test_streamed_backward_on_another_thread_checks_nothing_per_step(monkeypatch):
    """The backward sweep rebuilds each batch wherever autograd runs it (on CUDA, its device thread):
    _StreamedBatches sets ops.values_checked() at each call, so a backward on another thread still reads nothing
    back per step."""
    import threading

    from haba_fast import ops
    from haba_fast.objectives.mtt import trajectory_loss

    syn, plan, model, ws, wt = _haba_problem(3, torch.float64)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = trajectory_loss(get_adjoint_engine("exact", "torch"), model, syn, plan, ws, wt, lr)
    bounds = _count_calls(monkeypatch, ops, "check_index_bounds")
    finite = _count_calls(monkeypatch, ops, "check_augment_params")
    errors = []

    def backward():
        try:
            loss.backward()
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert not errors, errors
    assert lr.grad is not None and syn.bases.grad is not None
    assert bounds == [] and finite == []


def test_check_plan_names_what_is_wrong():
    from haba_fast.objectives.mtt import check_plan

    syn, plan, model, ws, wt = _haba_problem(2, torch.float64)
    check_plan(syn, plan, model.num_classes)  # a sampled plan passes
    bad = dataclasses.replace(plan, base_idx=plan.base_idx.clone())
    bad.base_idx[1, 0] = syn.num_bases
    with pytest.raises(ValueError, match=r"step plan: base_idx values must lie in \[0, 8\)"):
        check_plan(syn, bad, model.num_classes)
    bad = dataclasses.replace(plan, hall_idx=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"hall_idx values must lie in \[0, 3\)"):
        check_plan(syn, bad, model.num_classes)
    aug = copy.deepcopy(plan.aug)
    first = aug[0][0] if isinstance(aug[0], list) else aug[0]
    key = next(k for k, v in first.values.items() if v.is_floating_point())
    first.values[key][0] = float("nan")
    with pytest.raises(ValueError, match="step plan: parameters .* contain NaN or Inf"):
        check_plan(syn, dataclasses.replace(plan, aug=aug), model.num_classes)
    # Pixels: rows are images; the plan's hallucinators are never read
    from haba_fast.factorization import Pixels

    pixels = Pixels(4, 2, 3, (9, 9), generator=torch.Generator().manual_seed(0))
    check_plan(pixels, dataclasses.replace(plan, hall_idx=torch.tensor([0, 5])), model.num_classes)
    with pytest.raises(ValueError, match=r"step plan: base_idx values must lie in \[0, 8\)"):
        check_plan(pixels, dataclasses.replace(plan, base_idx=plan.base_idx + 8), model.num_classes)
    with pytest.raises(ValueError, match=r"labels lie in \[0, 3\] but the student has 1 classes"):
        check_plan(syn, plan, 1)


@needs_cpp
def test_cpp_step_ops_skip_value_checks_only_when_asked():
    """trajectory_step_grad / _keep with check_values=False run on a non-finite batch (the caller checked once); by
    default they refuse it."""
    from haba_fast.engines.adjoint import cpp_spec

    model = _convnet(depth=2, norm="groupnorm")
    X, Y, ws, _ = make_problem(model, 1, 4, tuple(model.im_size), torch.float64)
    x = X[0].clone()
    x[0, 0, 0, 0] = float("nan")
    spec = cpp_spec(model)
    for op in (torch.ops.haba_fast.trajectory_step_grad, torch.ops.haba_fast.trajectory_step_grad_keep):
        with pytest.raises(RuntimeError, match="X contains NaN or Inf"):
            op(ws, x, Y[0], spec)
        out = op(ws, x, Y[0], spec, False)
        g = out if isinstance(out, torch.Tensor) else out[0]
        assert not torch.isfinite(g).all()
        clean = op(ws, X[0], Y[0], spec, False)
        ref = op(ws, X[0], Y[0], spec)
        assert torch.equal(clean if isinstance(clean, torch.Tensor) else clean[0],
                           ref if isinstance(ref, torch.Tensor) else ref[0])


# ----------------------------------------------------------------------------------------------------------------------
# The C++ per-step ops equal trajectory_step_hvp.


@needs_cpp
@pytest.mark.parametrize("want_hw", [True, False])
def test_cpp_step_ops_match_step_hvp(want_hw):
    from haba_fast.engines.adjoint import cpp_spec

    model = _convnet(depth=2, norm="groupnorm")
    X, Y, ws, _ = make_problem(model, 1, 4, tuple(model.im_size), torch.float64)
    lam = torch.randn(ws.shape, dtype=torch.float64)
    spec = cpp_spec(model)
    g, hw, hx = torch.ops.haba_fast.trajectory_step_hvp(ws, X[0], Y[0], lam, spec)
    g2 = torch.ops.haba_fast.trajectory_step_grad(ws, X[0], Y[0], spec)
    gl, hw2, hx2 = torch.ops.haba_fast.trajectory_step_adjoint(ws, X[0], Y[0], lam, spec, want_hw)
    assert rel_err(g2, g) < 1e-12 and rel_err(hx2, hx) < 1e-12
    assert abs(float(gl) - float(torch.dot(g, lam))) < 1e-10 * float(g.norm() * lam.norm())
    if want_hw:
        assert rel_err(hw2, hw) < 1e-12
    else:
        assert hw2.numel() == 0
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.haba_fast.trajectory_step_grad(ws, X, Y[0], spec)
    with pytest.raises(RuntimeError, match="lam must be like w"):
        torch.ops.haba_fast.trajectory_step_adjoint(ws, X[0], Y[0], lam[:-1], spec, want_hw)
    # Same shape, another dtype: the message names both dtypes (it used to show two equal shapes only).
    with pytest.raises(RuntimeError, match=r"trajectory_step_hvp: lam must be like w \(\[\d+\] Double on cpu\), got "
                                           r"\[\d+\] Float on cpu"):
        torch.ops.haba_fast.trajectory_step_hvp(ws, X[0], Y[0], lam.float(), spec)


@needs_cpp
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(CPP_MODELS))
def test_cpp_kept_step_ops_match_the_recomputing_ones(dtype, shape, device, cpp_path):
    """trajectory_step_grad_keep / trajectory_step_adjoint_kept == trajectory_step_grad / trajectory_step_adjoint,
    on the fused and the ATen-only path (and on CUDA tensors, where a GPU is present)."""
    from haba_fast.engines.adjoint import cpp_spec

    model = _convnet(dtype=dtype, **CPP_MODELS[shape])
    X, Y, ws, _ = (t.to(device) for t in make_problem(model, 1, 3, tuple(model.im_size), dtype))
    lam = torch.randn(ws.shape, dtype=dtype).to(device)
    spec = cpp_spec(model)
    ops = torch.ops.haba_fast
    g, kept = ops.trajectory_step_grad_keep(ws, X[0], Y[0], spec)
    assert len(kept) == 3 * spec[3] and kept[2].numel() == 0  # block 0's input gradient is never needed
    assert rel_err(g, ops.trajectory_step_grad(ws, X[0], Y[0], spec)) < REL[dtype]
    for want_hw in (True, False):
        ref = ops.trajectory_step_adjoint(ws, X[0], Y[0], lam, spec, want_hw)
        got = ops.trajectory_step_adjoint_kept(ws, X[0], Y[0], lam, kept, spec, want_hw)
        for a, b in zip(got, ref):
            assert a.shape == b.shape and (a.numel() == 0 or rel_err(a, b) < REL[dtype])
    with pytest.raises(RuntimeError, match="kept must be"):
        ops.trajectory_step_adjoint_kept(ws, X[0], Y[0], lam, kept[:-1], spec, True)
    with pytest.raises(RuntimeError, match="do not match"):  # another batch size's list
        ops.trajectory_step_adjoint_kept(ws, X[0, :2], Y[0, :2], lam, kept, spec, True)
    with pytest.raises(RuntimeError, match="dtype and device"):
        other = torch.float32 if dtype == torch.float64 else torch.float64
        ops.trajectory_step_adjoint_kept(ws, X[0], Y[0], lam, [t.to(other) for t in kept], spec, True)


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: DistillConfig.memory_budget and `haba-fast distill --memory-budget`.


def test_distill_config_and_flag():
    import argparse

    from haba_fast.checkpoint import NON_RESULT_KEYS
    from haba_fast.commands.distill import _FLAGS, add_arguments, config_from_args
    from haba_fast.distill import DistillConfig

    assert DistillConfig().memory_budget == "0"
    DistillConfig(memory_budget="2GB").validate()
    with pytest.raises(ValueError, match="memory budget"):
        DistillConfig(memory_budget="two gigs").validate()
    with pytest.raises(ValueError, match="applies to --objective mtt"):
        DistillConfig(memory_budget="1GB", engine="naive").validate()
    with pytest.raises(ValueError, match="applies to --objective mtt"):
        DistillConfig(memory_budget="1GB", objective="dm").validate()
    assert "memory_budget" in [f[0] for f in _FLAGS]
    assert "memory_budget" in NON_RESULT_KEYS  # a resumed run may change it: same gradients
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--memory-budget", "512MB"]))
    assert cfg.memory_budget == "512MB"
    assert config_from_args(parser.parse_args([])).memory_budget == "0"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpp)])
def test_distiller_step_spends_the_budget(digits, buffer, backend):  # noqa: F811
    """One HaBa iteration: unlimited budget stores every step, same update as budget 0."""
    from test_distill import _cfg

    from haba_fast.distill import Distiller

    out = {}
    for budget in ("0", "unlimited"):
        d = Distiller(_cfg(engine="exact", memory_budget=budget), digits, buffer)
        assert d.engine.memory_budget == parse_memory_budget(budget)
        assert ("engine exact, memory budget unlimited" in d.objective.describe()) is (budget == "unlimited")
        d.engine.backend = backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d.step()
        stats = d.engine.last_stats
        assert (
            stats["stored_steps"] == (0 if budget == "0" else 4)
            and stats["recomputed_steps"] == 4 - stats["stored_steps"]
        )
        assert d.engine.last_backend == backend
        out[budget] = [p.grad.clone() for p in d.synthetic.parameters()]
    for a, b in zip(out["0"], out["unlimited"]):
        assert rel_err(a, b) < 1e-5


def _budget_row(budget, cpu, rss, steps=20, wall=None, **kw):
    """One row of bench/run_memory_budget.sh's JSON at bpc 10 / batch 100 (wall time 2x CPU unless given)."""
    mb = {"0": 0, "2GB": 2048, "unlimited": None}[budget]
    return dict(ipc=10, syn_steps=steps, batch_syn=100, memory_budget=budget, memory_budget_mb=mb,
                engine_backend="cpu", s_per_iter=2 * cpu if wall is None else wall, cpu_s_per_iter=cpu,
                peak_rss_mb=rss, **kw)


def test_budget_report_verdicts_skip_superseded_rows(tmp_path):
    """bench/run_memory_budget.sh's report: verdicts from the current rows (CPU time), medians for syn_steps."""
    from haba_fast.benchmarks.iteration import write_budget_report

    row = _budget_row
    rows = [
        row("0", 50.0, 1000, superseded=True),
        row("unlimited", 90.0, 7000, superseded=True),
        row("0", 40.0, 1000),
        row("2GB", 33.0, 2900),
        row("unlimited", 29.0, 3100),
        row("0", 30.0, 900, steps=10, superseded=True),
    ] + [row("0", 30.0, rss, steps=10) for rss in (910, 912, 990)] + [row("0", 200.0, 950, steps=80)] * 2
    write_budget_report(rows, str(tmp_path / "memory_budget.json"))
    text = (tmp_path / "MEMORY_BUDGET.md").read_text()
    assert "largest budget run (unlimited) / budget 0 (medians of 1 and 1 runs): CPU **0.725x**, wall 0.725x" in text
    assert "peak RSS 2900 MB <= budget + budget 0's peak (3048 MB) -> met" in text
    assert "(medians of 2 and 3 runs): **1.042x** (target <= 1.05x) -> met" in text
    assert "spread of the runs: 80 MB at 10 steps" in text


def test_budget_report_steady_state_section(tmp_path):
    """The steady-state section (rows with warm-up): first-iteration CPU seconds, page faults in thousands, the
    *held* note, and the verdicts from the timed iterations."""
    from haba_fast.benchmarks.iteration import write_budget_report

    def row(budget, cpu, first, faults, **kw):
        return _budget_row(budget, cpu, 1000, wall=cpu, threads=1, warmup=1, warmup_cpu_s=[first],
                           minor_faults_per_iter=faults, **kw)

    rows = [row("0", 20.0, 22.0, 4400, buffer_cache_held=True),
            row("unlimited", 16.0, 33.0, 2200, buffer_cache_held=True),
            row("unlimited", 30.0, 40.0, None, superseded=True, note="older")]
    write_budget_report(rows, str(tmp_path / "memory_budget.json"))
    text = (tmp_path / "MEMORY_BUDGET.md").read_text()
    assert "| 0 | cpu | 1 | None | None | - | 20.0 | 20.0 | 22.0 | 4 | 1000 | - | *held* |" in text, text
    assert "| 30.0 | 30.0 | 40.0 | - | 1000 | - | *superseded*: older |" in text
    assert "(medians of 1 and 1 runs): CPU **0.800x**" in text
    assert "first iterations (nothing retained yet): CPU 1.50x" in text


def test_budget_report_pairs_rows_of_one_commit(tmp_path):
    """Beside the pooled ratio, the report gives the ratio within each commit that has rows on both sides (a commit
    with one side only, or rows without a commit, give none)."""
    from haba_fast.benchmarks.iteration import write_budget_report

    def row(budget, cpu, commit):
        env = {"commit": commit} if commit else {}
        return _budget_row(budget, cpu, 1000, threads=1, warmup=1, warmup_cpu_s=[cpu], env=env)

    rows = [row("0", 20.0, "aaa"), row("unlimited", 15.0, "aaa"), row("0", 10.0, "bbb"), row("0", 30.0, "ccc"),
            row("unlimited", 27.0, "ccc"), row("unlimited", 24.0, "ccc"), row("unlimited", 12.0, "ddd"),
            row("0", 18.0, None), row("unlimited", 9.0, None)]
    write_budget_report(rows, str(tmp_path / "memory_budget.json"))
    text = (tmp_path / "MEMORY_BUDGET.md").read_text()
    assert "(medians of 5 and 4 runs): CPU **0.789x**" in text  # 15 / 19: every commit pooled
    assert "CPU medians): 0.75x (aaa), 0.85x (ccc)\n" in text


def test_iteration_report_keeps_budget_rows_apart_and_checks_the_gpu_targets(tmp_path):
    """bench/run_iteration.sh's report on a GPU: ``exact --memory-budget auto`` rows stay separate from budget 0's
    (not merged), and the issue's targets against naive are checked at (a) and (b) in time and CUDA memory."""
    from haba_fast.benchmarks.iteration import write_report

    def row(engine, ipc, steps, batch, s, mem, budget=None, failed=False):
        r = dict(bench="iteration", engine=engine, ipc=ipc, syn_steps=steps, batch_syn=batch, s_per_iter=s,
                 times=[s], cpu_s_per_iter=s, peak_rss_mb=900.0, peak_cuda_mb=mem, env={"gpu": "H200"})
        if budget is not None:
            r["memory_budget"] = budget
        if failed:
            r = dict(bench="iteration", engine=engine, ipc=ipc, syn_steps=steps, batch_syn=batch, failed=True)
        return r

    rows = [
        row("exact", 10, 20, 100, 0.50, 300.0, "0"),
        row("naive", 10, 20, 100, 1.00, 2000.0),
        row("exact", 10, 20, 100, 0.35, 1500.0, "auto"),
        row("exact", 50, 30, 500, 1.10, 900.0),
        row("naive", 50, 30, 500, 1.00, 9000.0),
        row("exact", 50, 30, 500, 0.90, 9500.0, "auto"),
    ]
    write_report(rows, str(tmp_path / "iteration_cuda.json"))
    text = (tmp_path / "ITERATION.md").read_text()
    assert "| exact (budget auto) | 10 | 20 | 100 | 0.350 |" in text and "| exact | 10 | 20 | 100 | 0.500 |" in text
    assert ("(a) bpc 10, batch 100, syn_steps 20: exact (budget auto) / naive time = **0.35** (target <= 0.4) -> met;"
            " peak CUDA memory 1500 vs 2000 MB (target: no larger) -> met") in text
    assert ("(b) bpc 50, batch 500, syn_steps 30: exact (budget auto) / naive time = **0.90** (target <= 0.8) -> "
            "NOT met; peak CUDA memory 9500 vs 9000 MB (target: no larger) -> NOT met") in text
    # budget 0's big row is still the one the 6 GB line reports
    assert "exact completes, peak CUDA memory **0.88 GB**" in text

    rows[4] = row("naive", 50, 30, 500, 0, 0, failed=True)
    write_report(rows, str(tmp_path / "iteration_cuda.json"))
    assert "exact (budget auto) completes; naive did not (out of memory or error)" in (
        tmp_path / "ITERATION.md").read_text()


def test_iteration_report_keeps_a_forced_backend_apart(tmp_path):
    """bench/run_iteration.sh on CUDA runs exact at budget auto twice: the engine's choice (the C++ op's kept steps)
    and a forced ``--backend`` (there ``torch``: kept autograd graphs). The report gives each its own table row and
    target line."""
    from haba_fast.benchmarks.iteration import write_report

    def row(engine, s, mem, budget=None, backend=None):
        r = dict(bench="iteration", engine=engine, ipc=10, syn_steps=20, batch_syn=100, s_per_iter=s, times=[s],
                 cpu_s_per_iter=s, peak_rss_mb=900.0, peak_cuda_mb=mem, env={"gpu": "H200"},
                 backend_requested=backend)
        if budget is not None:
            r["memory_budget"] = budget
        return r

    rows = [row("naive", 1.00, 2000.0), row("exact", 0.50, 3000.0, "auto"),
            row("exact", 0.30, 1500.0, "auto", backend="cpu"), row("exact", 0.45, 1400.0, "auto", backend="auto")]
    write_report(rows, str(tmp_path / "iteration_cuda.json"))
    text = (tmp_path / "ITERATION.md").read_text()
    assert "| exact (budget auto, backend cpu) | 10 | 20 | 100 | 0.300 |" in text
    assert "| exact (budget auto) | 10 | 20 | 100 | 0.475 |" in text  # --backend auto is the engine's choice: merged
    assert ("(a) bpc 10, batch 100, syn_steps 20: exact (budget auto, backend cpu) / naive time = **0.30** (target "
            "<= 0.4) -> met; peak CUDA memory 1500 vs 2000 MB (target: no larger) -> met") in text
    assert "(a) bpc 10, batch 100, syn_steps 20: exact (budget auto) / naive time = **0.47** (target <= 0.4)" in text


def test_iteration_report_keeps_inputs_variants_beside_the_engines_rows(tmp_path):
    """``--inputs`` rows (stacked, streamed-step-checks) get their own table rows and are never the exact engine's
    row in the ratios."""
    from haba_fast.benchmarks.iteration import write_report

    base = dict(bench="iteration", ipc=50, syn_steps=30, batch_syn=500, cpu_s_per_iter=1.0, peak_rss_mb=900.0,
                env={"gpu": "H200"})
    rows = [dict(base, engine="exact", s_per_iter=0.2, times=[0.2], peak_cuda_mb=700.0, inputs="stacked"),
            dict(base, engine="exact", s_per_iter=0.9, times=[0.9], peak_cuda_mb=600.0, inputs="streamed"),
            dict(base, engine="exact", s_per_iter=0.95, times=[0.95], peak_cuda_mb=600.0,
                 inputs="streamed-step-checks")]
    write_report(rows, str(tmp_path / "iteration_cuda.json"))
    text = (tmp_path / "ITERATION.md").read_text()
    assert "| exact (stacked inputs) | 50 | 30 | 500 | 0.200 |" in text
    assert "| exact (streamed-step-checks inputs) | 50 | 30 | 500 | 0.950 |" in text
    assert "| exact | 50 | 30 | 500 | 0.900 |" in text
    assert "exact completes, peak CUDA memory **0.59 GB**" in text  # the streamed row's 600 MB, not stacked's


def test_iteration_report_gives_the_compiled_steps_first_iteration(tmp_path):
    """A compiled-step row's first (warm-up) iteration includes the compile: its note gives those seconds, and the row
    gets its own target line against naive."""
    from haba_fast.benchmarks.iteration import write_report

    base = dict(bench="iteration", ipc=50, syn_steps=30, batch_syn=500, cpu_s_per_iter=1.0, peak_rss_mb=900.0,
                env={"gpu": "H200"})
    rows = [dict(base, engine="naive", s_per_iter=1.0, times=[1.0], peak_cuda_mb=9000.0),
            dict(base, engine="exact", s_per_iter=0.7, times=[0.7], peak_cuda_mb=700.0, compile_step=True,
                 warmup=1, warmup_s=[61.25])]
    write_report(rows, str(tmp_path / "iteration_cuda.json"))
    text = (tmp_path / "ITERATION.md").read_text()
    assert "| exact (compiled step) | 50 | 30 | 500 | 0.700 |" in text
    assert "first iteration 61.2 s (the compile) |" in text
    assert ("(b) bpc 50, batch 500, syn_steps 30: exact (compiled step) / naive time = **0.70** (target <= 0.8) -> "
            "met") in text


def test_trajectory_compression_bench_formulas():
    """bench/trajectory_compression.py: its byte entropy against a counted oracle, and its RSS model against the
    measured budget-0 ratio (1.094x at syn_steps 80 over 10 when every w_t is stored at 32 bits)."""
    mod = load_bench_script("trajectory_compression")
    assert mod.byte_entropy(torch.zeros(1000, dtype=torch.uint8)) == 0.0
    assert mod.byte_entropy(torch.arange(256, dtype=torch.uint8).repeat(4)) == pytest.approx(8.0)
    half = torch.tensor([0, 1] * 50, dtype=torch.uint8)
    assert mod.byte_entropy(half) == pytest.approx(1.0)
    assert mod.rss_ratio(32.0) == pytest.approx(998 / 912, abs=2e-3)
    assert mod.rss_ratio(0.0) == pytest.approx(1.0)
    assert mod.rss_ratio(16.0) < mod.rss_ratio(24.0) < mod.rss_ratio(32.0)


def test_kept_step_split_bench():
    """bench/kept_step_split.py: its summary against hand-computed ratios, and each arm's sweeps (tiny shapes) call
    the ops it names once per step."""
    mod = load_bench_script("kept_step_split")
    rows = [
        {"arm": "budget0", "ops": {"grad": {"cpu_s": 2.0}, "adjoint": {"cpu_s": 8.0}}, "engine_cpu_s": 10.0},
        {"arm": "budget0", "ops": {"grad": {"cpu_s": 4.0}, "adjoint": {"cpu_s": 9.0}}, "engine_cpu_s": 13.0},
        {"arm": "budget0", "ops": {"grad": {"cpu_s": 3.0}, "adjoint": {"cpu_s": 7.0}}, "engine_cpu_s": 11.0},
        {"arm": "kept", "ops": {"grad_keep": {"cpu_s": 3.3}, "adjoint_kept": {"cpu_s": 6.0}}, "engine_cpu_s": 9.3},
    ]
    s = mod.summarize(rows)
    assert s["kept_over_budget0"] == pytest.approx(9.3 / 11.0)
    assert s["grad_keep_over_grad"] == pytest.approx(1.1) and s["adjoint_kept_over_adjoint"] == pytest.approx(0.75)
    assert s["kept_if_conv_bound"] == pytest.approx((3.0 + 8.0 * 6 / 8) / 11.0)
    assert s["conv_floor"] == pytest.approx(9 / 11)
    from haba_fast._ext import extension_available

    if not extension_available():
        pytest.skip("the C++ extension is not built")
    threads = torch.get_num_threads()
    try:
        for arm, ops in (("budget0", {"grad", "adjoint"}), ("kept", {"grad_keep", "adjoint_kept"})):
            r = mod.child(arm, steps=3, batch=4)
            assert set(r["ops"]) == ops and all(v["calls"] == 3 for v in r["ops"].values())
            assert r["engine_cpu_s"] == pytest.approx(sum(v["cpu_s"] for v in r["ops"].values()))
            held = mod.child(arm, steps=3, batch=4, repeats=2, hold=True)  # two sweep pairs; the last one timed
            assert len(held["per_repeat"]) == 2 and held["ops"] == held["per_repeat"][-1] and held["hold"]
            assert all(v["calls"] == 3 for p in held["per_repeat"] for v in p.values())
    finally:
        torch.set_num_threads(threads)


def test_first_touch_bench_times_every_block():
    """bench/first_touch.py: one CPU-time entry per block of a pass, each block written (the first touch)."""
    mod = load_bench_script("first_touch")
    seconds = mod.touch_pass(1 << 20, 3)
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
