"""CUDA-graph replay of the engine's step ops (haba_fast/engines/graphs.py): the bookkeeping on a CPU.

A CUDA graph needs a GPU (tests/test_gpu.py captures real ones). Here ``capture_by_rerun`` stands in for it with the
same contract (static inputs, static outputs that every replay overwrites), so the engine's graphed steps are
checked against the eager C++ steps and the naive unroll over several calls: first eager, then captured, then
replayed on new values. The engine tests use ``capture_strictly``, which also fails a step that reads a tensor other
than its static inputs (a real graph would replay that tensor's value at capture time).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from test_adjoint import _convnet, grads, make_problem, naive_unroll, rel_err
from test_distill import buffer, digits  # noqa: F401  (module fixtures reused)
from test_memory_budget import REL, _haba_problem, _syn_grads, needs_cpp
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from haba_fast.engines import get_adjoint_engine, get_engine
from haba_fast.engines.graphs import StepGraphs, capture_by_rerun


class _OnlyStaticInputs(TorchDispatchMode):
    """Fails an op that reads a tensor which is neither one of the call's static inputs nor made during the call: a
    CUDA graph would replay such a tensor's value at capture time (a step function that closed over an outside
    tensor), where the rerun stand-in silently reads the new one."""

    def __init__(self, static_inputs):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in static_inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in pytree.tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                raise AssertionError(f"{func} read a tensor that is not a static input of the captured call")
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.known.add(t.untyped_storage().data_ptr())
        return out


def capture_strictly(fn, static_inputs):
    """``capture_by_rerun`` whose runs may read nothing but the static inputs and what they make (a real graph's
    constraint on its tensors)."""

    def checked(*inputs):
        with _OnlyStaticInputs(static_inputs):
            return fn(*inputs)

    return capture_by_rerun(checked, static_inputs)


def _rerun_engine(name="exact", budget=0, **kw):
    eng = get_adjoint_engine(name, None, budget, cuda_graphs=True, **kw)
    eng.step_graphs = StepGraphs(capture_strictly, device_type=None)
    return eng


def test_the_strict_stand_in_catches_a_step_reading_an_outside_tensor():
    graphs = StepGraphs(capture_strictly, device_type=None)
    x, outside = torch.randn(3), torch.randn(3)
    graphs.run("clean", lambda x: [x * 2 + 1], [x])
    graphs.run("clean", lambda x: [x * 2 + 1], [x])  # captured: reads only x and what it made
    graphs.run("leaky", lambda x: [x + outside], [x])  # eager the first time
    with pytest.raises(RuntimeError, match="capturing leaky as a CUDA graph failed.*not a static input"):
        graphs.run("leaky", lambda x: [x + outside], [x])


# ----------------------------------------------------------------------------------------------------------------------
# StepGraphs alone.


def _affine(x, a):
    return [x * a + 1, (x - a).sum()]


def test_first_call_runs_eagerly_the_second_captures_then_replays():
    graphs = StepGraphs(capture_by_rerun, device_type=None)
    x, a = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    first = graphs.run("affine", _affine, [x, a])
    assert (graphs.captures, graphs.replays) == (0, 0)
    second = graphs.run("affine", _affine, [x + 1, a])
    assert (graphs.captures, graphs.replays) == (1, 1)
    held = [t.clone() for t in second]
    for i in range(3):  # new values through the same static inputs; returned tensors are copies, never overwritten
        xi = torch.randn(3, 4, dtype=torch.float64)
        out = graphs.run("affine", _affine, [xi, a * i])
        for got, want in zip(out, _affine(xi, a * i)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(second, held):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(first, _affine(x, a)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (graphs.captures, graphs.replays) == (1, 4)


def test_a_new_shape_dtype_or_option_is_a_new_call():
    graphs = StepGraphs(capture_by_rerun, device_type=None)
    x, a = torch.randn(3, 4), torch.randn(3, 4)
    for _ in range(2):
        graphs.run("affine", _affine, [x, a])
    graphs.run("affine", _affine, [x[:2], a[:2]])  # another shape: eager again
    graphs.run("affine", _affine, [x.double(), a.double()])  # another dtype
    graphs.run("affine", _affine, [x, a], options=(True,))  # another constant
    graphs.run("other", _affine, [x, a])  # another op
    assert (graphs.captures, graphs.replays) == (1, 1)


def test_a_change_of_math_mode_is_a_new_call():
    """TF32 on or off (set through either of torch's APIs) or cuDNN's switches choose other kernels: a new call, not
    a replay of the old graph."""
    graphs = StepGraphs(capture_by_rerun, device_type=None)
    x, a = torch.randn(3), torch.randn(3)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False):
        for _ in range(2):
            graphs.run("affine", _affine, [x, a])
        assert graphs.captures == 1
        conv = torch.backends.cudnn.conv
        before = conv.fp32_precision
        try:
            conv.fp32_precision = "ieee" if before != "ieee" else "tf32"
            graphs.run("affine", _affine, [x, a])  # eager: a new call
        finally:
            conv.fp32_precision = before
        assert (graphs.captures, graphs.replays) == (1, 1)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False):
        graphs.run("affine", _affine, [x, a])
    assert (graphs.captures, graphs.replays) == (1, 1)


_UNDO: list = []  # how to set back what _toggle_switch set outside monkeypatch


def _toggle_switch(name: str, monkeypatch) -> None:
    """Flip one of the switches ``_math_mode`` reads, or the block-kernels variable."""
    if name == "cudnn.enabled":
        monkeypatch.setattr(torch.backends.cudnn, "enabled", not torch.backends.cudnn.enabled)
    elif name == "cudnn.deterministic":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", not torch.backends.cudnn.deterministic)
    elif name == "deterministic algorithms":
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(not before)
        _UNDO.append(lambda: torch.use_deterministic_algorithms(before))
    elif name == "matmul precision":
        matmul = torch.backends.cuda.matmul
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if before != "tf32" else "ieee"
        _UNDO.append(lambda: setattr(matmul, "fp32_precision", before))
    elif name == "cuda autocast":
        torch.set_autocast_enabled("cuda", True)
        _UNDO.append(lambda: torch.set_autocast_enabled("cuda", False))
    else:
        from haba_fast.engines.graphs import BLOCK_KERNELS_ENV

        monkeypatch.setenv(BLOCK_KERNELS_ENV, "0" if os.environ.get(BLOCK_KERNELS_ENV) != "0" else "1")



@pytest.mark.parametrize(
    "switch",
    ["cudnn.enabled", "cudnn.deterministic", "deterministic algorithms", "matmul precision", "cuda autocast",
     "block kernels variable"],
)
def test_every_switch_of_the_key_makes_a_new_call(switch, monkeypatch):
    """Each switch that chooses the kernels a call runs (the math mode, and $HABA_FAST_TRAJECTORY_FUSED: which block
    implementation the C++ op runs) is part of the key: flipped, a call runs eagerly instead of replaying a graph
    of other kernels; flipped back, the old graph replays."""
    graphs = StepGraphs(capture_by_rerun, device_type=None)
    x, a = torch.randn(3), torch.randn(3)
    for _ in range(2):
        graphs.run("affine", _affine, [x, a])
    assert (graphs.captures, graphs.replays) == (1, 1)
    try:
        _toggle_switch(switch, monkeypatch)
        graphs.run("affine", _affine, [x, a])  # eager: a new call
        assert (graphs.captures, graphs.replays) == (1, 1)
    finally:
        while _UNDO:
            _UNDO.pop()()
        monkeypatch.undo()
    graphs.run("affine", _affine, [x, a])
    assert (graphs.captures, graphs.replays) == (1, 2)


def test_a_failed_capture_names_the_op_and_the_cause():
    def broken(fn, static_inputs):
        try:  # an error inside a capture surfaces as the capture's own failure, the first one as its context
            raise ValueError("a sync inside the capture")
        except ValueError:
            raise RuntimeError("operation not permitted when stream is capturing\nmore") from None

    graphs = StepGraphs(broken, device_type=None)
    x = torch.randn(2)
    graphs.run("trajectory_step_adjoint", lambda x: [x * 2], [x])
    with pytest.raises(
        RuntimeError,
        match=r"capturing trajectory_step_adjoint .*ValueError: a sync inside the capture; RuntimeError: operation "
        r"not permitted when stream is capturing\); run without --cuda-graphs",
    ):
        graphs.run("trajectory_step_adjoint", lambda x: [x * 2], [x])


def test_cuda_capture_warms_up_on_a_side_stream_then_captures_on_the_inputs_device(monkeypatch):
    """capture_cuda_graph's order of calls, with torch.cuda's stream and graph API faked (no GPU here): inside the
    inputs' device, one run on a side stream that waits for the current one, the current stream waits for it,
    then one run captured on a fresh stream into a new graph, whose replay and outputs are returned. The fakes take
    the real API's parameters (checked against torch's signatures)."""
    import inspect

    from haba_fast.engines import graphs as graphs_mod

    assert {"cuda_graph", "stream"} <= set(inspect.signature(torch.cuda.graph.__init__).parameters)
    assert hasattr(torch.cuda.CUDAGraph, "replay") and hasattr(torch.cuda.Stream, "wait_stream")
    log = []

    class Stream:
        count = 0

        def __init__(self):
            Stream.count += 1
            self.name = f"s{Stream.count}"

        def wait_stream(self, other):
            log.append(f"{self.name} waits {other.name}")

    current = [Stream()]  # s1: the caller's stream

    @contextlib.contextmanager
    def on_device(device):
        log.append(f"device {device}")
        yield
        log.append("device exit")

    @contextlib.contextmanager
    def on_stream(stream):
        saved, current[0] = current[0], stream
        yield
        current[0] = saved

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def capture(cuda_graph, stream=None):
        assert isinstance(cuda_graph, Graph)
        log.append(f"capture on {stream.name}")
        with on_stream(stream):
            yield
        log.append("capture end")

    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)

    def fn(x):
        log.append(f"run on {current[0].name}")
        return (x * 2,)

    x = torch.ones(2)
    replay, outputs = graphs_mod.capture_cuda_graph(fn, [x])
    replay()
    assert log == [
        "device cpu",
        "s2 waits s1",
        "run on s2",
        "s1 waits s2",
        "capture on s3",
        "run on s3",
        "capture end",
        "device exit",
        "replay",
    ]
    assert isinstance(outputs, list) and torch.equal(outputs[0], x * 2)


def test_cuda_capture_refuses_other_devices():
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        StepGraphs().check_device(torch.device("cpu"))
    StepGraphs(capture_by_rerun, device_type=None).check_device(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------------
# The engine's graphed steps against its eager ones and the naive unroll.


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "name, budget",
    [("exact", 0), ("exact", "unlimited"), ("exact", "mid"), ("exact", "min"), ("first-order", "unlimited")],
)
def test_graphed_steps_give_the_eager_and_naive_gradients(dtype, name, budget):
    """Stored X, three calls on new values each (eager, captured, replayed): loss, dL/dX and dL/dlr equal the eager
    C++ steps' (to rounding of the same kernels: exactly here) and, exact, the naive unroll's."""
    model = _convnet(depth=2, norm="instancenorm", dtype=dtype)
    N, batch = 5, 3
    if budget == "mid":
        probe = get_adjoint_engine(name, "cpu", "unlimited")
        grads(probe, model, *make_problem(model, N, batch, tuple(model.im_size), dtype))
        budget = int(probe.last_stats["per_step_bytes"] * 3.5)  # 2 of the 5 steps kept
    eng = _rerun_engine(name, budget)
    eager = get_adjoint_engine(name, "cpu", budget)
    for seed in range(3):
        X, Y, ws, wt = make_problem(model, N, batch, tuple(model.im_size), dtype, seed=seed)
        got = grads(eng, model, X, Y, ws, wt, lr_value=0.1)
        want = grads(eager, model, X, Y, ws, wt, lr_value=0.1)
        assert eng.last_backend == "cpu"
        for a, b in zip(got, want):
            assert rel_err(a, b) < REL[dtype], (seed, rel_err(a, b))
        if name == "exact":
            ref = grads(naive_unroll, model, X, Y, ws, wt, lr_value=0.1)
            for a, b in zip(got, ref):
                assert rel_err(a, b) < REL[dtype] * (1 if dtype == torch.float64 else 10), (seed, rel_err(a, b))
    # Which op kinds ran from graphs, and how often: with a stand-in capture the values cannot tell a graphed op
    # from an eager one, the counts can. Each op kind is seen once eagerly (its first call), captured at its second
    # and replayed from then on: replays = the op calls of the three calls - the op kinds.
    stats = eng.last_stats
    recompute, keep = {"trajectory_step_grad", "trajectory_step_adjoint"}, {"trajectory_step_grad_keep",
                                                                            "trajectory_step_adjoint_kept"}
    kinds, stored, extra_grads = {0: (recompute, 0, 0), "unlimited": (keep, N, 0), "min": (recompute, 0, 3)}.get(
        budget, (recompute | keep, 2, 0)
    )
    captured = {key[0] for key, graph in eng.step_graphs._graphs.items() if graph is not None}
    assert captured == kinds and eng.step_graphs.captures == len(kinds)
    assert stats["stored_steps"] == stored and stats.get("recomputed_weights", 0) == extra_grads
    assert eng.step_graphs.replays == 3 * (2 * N + extra_grads) - len(kinds)


@needs_cpp
@pytest.mark.parametrize("budget", [0, "unlimited"])
def test_graphed_streamed_steps_give_the_eager_gradients(budget):
    """Streamed batches (HaBa's generate + augment per step) through graphed steps, over three calls."""
    from haba_fast.objectives.mtt import trajectory_loss

    dtype = torch.float64
    syn, plan, model, ws, wt = _haba_problem(5, dtype)
    eng, eager = _rerun_engine("exact", budget), get_adjoint_engine("exact", "cpu", budget)
    for i in range(3):
        w_target = wt + 0.01 * i
        got = _syn_grads(lambda lr: trajectory_loss(eng, model, syn, plan, ws, w_target, lr), syn, dtype)
        want = _syn_grads(lambda lr: trajectory_loss(eager, model, syn, plan, ws, w_target, lr), syn, dtype)
        for j, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < REL[dtype], (i, j, rel_err(a, b))
    assert eng.step_graphs.replays >= 2 * 5


@needs_cpp
def test_graphed_streams_need_values_checked_once():
    """A graphed step cannot check values: a stream whose caller did not check them is refused."""
    syn, plan, model, ws, wt = _haba_problem(2, torch.float64)
    from haba_fast.objectives.mtt import step_inputs

    eng = _rerun_engine()
    with pytest.raises(ValueError, match="values_checked=True"):
        eng.stream(model, lambda t: step_inputs(syn, plan, t), 2, list(syn.parameters()), ws, wt, 0.1)


def _as_on_a_gpu(monkeypatch):
    """DistillConfig.validate without its --cuda-graphs device check (this machine has no GPU)."""
    from haba_fast.distill import DistillConfig

    validate = DistillConfig.validate

    def validate_as_on_a_gpu(self):
        graphs, self.cuda_graphs = self.cuda_graphs, False
        try:
            return validate(self)
        finally:
            self.cuda_graphs = graphs

    monkeypatch.setattr(DistillConfig, "validate", validate_as_on_a_gpu)


@needs_cpp
def test_distiller_iterations_through_graphed_steps(digits, buffer, monkeypatch):  # noqa: F811
    """``DistillConfig(cuda_graphs=True)`` reaches the MTT objective's engine; three HaBa iterations with its steps
    replayed (the stand-in capture) move the synthetic set as the eager engine's do."""
    from test_distill import _cfg

    from haba_fast.distill import Distiller

    _as_on_a_gpu(monkeypatch)
    runs = {}
    for graphs in (False, True):
        d = Distiller(_cfg(engine="exact", memory_budget="unlimited", cuda_graphs=graphs), digits, buffer)
        assert d.engine.cuda_graphs is graphs
        assert ("steps replayed from CUDA graphs" in d.objective.describe()) is graphs
        if graphs:
            d.engine.step_graphs = StepGraphs(capture_strictly, device_type=None)
        for _ in range(3):
            d.step()
        runs[graphs] = [p.detach().clone() for p in d.synthetic.parameters()]
    assert d.engine.step_graphs.replays > 0
    for a, b in zip(runs[True], runs[False]):
        assert rel_err(a, b) < 1e-5


def test_data_parallel_runs_refuse_cuda_graphs(digits, buffer, monkeypatch):  # noqa: F811
    from test_distill import _cfg

    from haba_fast import dist
    from haba_fast.distill import Distiller

    _as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="data-parallel run .*--trajectories-per-iteration"):
        Distiller(_cfg(engine="exact", cuda_graphs=True), digits, buffer)


def test_cuda_graphs_refuses_what_it_cannot_replay(monkeypatch):
    with pytest.raises(ValueError, match="backend cpu"):
        get_adjoint_engine("exact", "torch", cuda_graphs=True)
    with pytest.raises(ValueError, match="choose one"):
        get_adjoint_engine("exact", None, 0, compile_step=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="naive.*--cuda-graphs"):
        get_engine("naive", cuda_graphs=True)
    eng = get_adjoint_engine("exact", None, 0, cuda_graphs=True)
    assert "cuda_graphs=True" in repr(eng)
    model = _convnet()
    X, Y, ws, wt = make_problem(model, 2, 2, tuple(model.im_size), torch.float64)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        grads(eng, model, X, Y, ws, wt)
    monkeypatch.setenv("HABA_FAST_BACKEND", "torch")  # the environment may not name another backend either
    with pytest.raises(ValueError, match="cannot run with backend 'torch'"):
        grads(eng, model, X, Y, ws, wt)


@needs_cpp
def test_cuda_graphs_needs_a_model_the_cpp_op_runs():
    from test_adjoint import _MLPStudent

    from haba_fast.backend import BackendUnavailableError

    model = _MLPStudent().double()
    X, Y, ws, wt = make_problem(model, 2, 2, (5, 5), torch.float64)
    with pytest.raises(BackendUnavailableError, match="_MLPStudent is not a ConvNet the C\\+\\+ engine implements"):
        grads(_rerun_engine(), model, X, Y, ws, wt)


# ----------------------------------------------------------------------------------------------------------------------
# The flag: Distiller config, CLI, bench.


def test_distill_config_and_flag():
    import argparse

    from haba_fast.checkpoint import NON_RESULT_KEYS
    from haba_fast.commands.distill import add_arguments, config_from_args
    from haba_fast.distill import DistillConfig

    assert DistillConfig().cuda_graphs is False
    with pytest.raises(ValueError, match="needs --device cuda"):
        DistillConfig(cuda_graphs=True, device="cpu").validate()
    with pytest.raises(ValueError, match="--cuda-graphs applies to --objective mtt"):
        DistillConfig(cuda_graphs=True, engine="naive", device="cpu").validate()
    with pytest.raises(ValueError, match="choose one"):
        DistillConfig(cuda_graphs=True, compile_step=True, device="cpu").validate()
    assert "cuda_graphs" in NON_RESULT_KEYS  # a resumed run may switch it: the same kernels
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if torch.cuda.is_available():  # --device auto takes the GPU
        assert config_from_args(parser.parse_args(["--cuda-graphs"])).cuda_graphs is True
    else:
        with pytest.raises(ValueError, match="needs --device cuda"):
            config_from_args(parser.parse_args(["--cuda-graphs"]))
    assert config_from_args(parser.parse_args([])).cuda_graphs is False


def test_bench_iteration_cuda_graphs_row():
    """``haba-fast bench iteration --cuda-graphs``: refused on a CPU and for naive; the report's label and its target
    line."""
    import argparse

    from haba_fast.benchmarks import iteration

    p = argparse.ArgumentParser()
    iteration.add_arguments(p)
    small = ["--ipc", "2", "--syn-steps", "2", "--batch-syn", "4", "--width", "32", "--device", "cpu"]
    with pytest.raises(ValueError, match="needs --device cuda"):
        iteration.build_distiller(p.parse_args(["--cuda-graphs", *small]))
    with pytest.raises(ValueError, match="naive takes none"):
        iteration.run(p.parse_args(["--engine", "naive", "--cuda-graphs", *small]))
    row = {"engine": "exact", "cuda_graphs": True, "memory_budget": "auto", "block_kernels": "triton"}
    assert iteration._label(row) == "exact (budget auto, CUDA graphs, triton blocks)"
    assert iteration._is_variant(row)
    common = {"engine": "exact", "ipc": 10, "syn_steps": 20, "batch_syn": 100, "peak_cuda_mb": 100.0}
    rows = [
        dict(common, engine="naive", s_per_iter=1.0, peak_cuda_mb=200.0),
        dict(common, cuda_graphs=True, s_per_iter=0.3),
    ]
    (line,) = iteration._auto_budget_checks(rows, "peak_cuda_mb", "peak CUDA memory")
    assert "exact (CUDA graphs) / naive time = **0.30** (target <= 0.4) -> met" in line
    assert "peak CUDA memory 100 vs 200 MB (target: no larger) -> met" in line
    rows[0]["peak_cuda_reserved_mb"], rows[1]["peak_cuda_reserved_mb"] = 220.0, 260.0  # the pools, reserved
    (line,) = iteration._auto_budget_checks(rows, "peak_cuda_mb", "peak CUDA memory")
    assert "peak CUDA memory reserved 260 vs 220 MB (target: no larger) -> NOT met" in line
    rows[1].update(cuda_graph_captures=3, cuda_graph_replays=150, env={"gpu": "G"}, peak_rss_mb=900.0)
    rows[0].update(peak_rss_mb=800.0)
    table = iteration._section(rows, "GPU")
    assert "| exact (CUDA graphs) | 10 | 20 | 100 | 0.300 |" in table
    assert "peak RSS 900 MB; 260 MB reserved; 3 graphs, 150 replays (warm-up included)" in table


# ----------------------------------------------------------------------------------------------------------------------
# What a capture needs of the ops: no value read back on the host.


def _host_reads(fn) -> list[list[str]]:
    """The ancestry (innermost first) of every value read back to the host (``aten::_local_scalar_dense``, what
    ``.item()`` runs) and every data-dependent op (``nonzero``, ``is_nonzero``, ``equal``) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    reads = []
    for event in prof.events():
        if event.name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"):
            chain, parent = [event.name], event.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            reads.append(chain)
    return reads


@needs_cpp
@pytest.mark.parametrize(
    "shape",
    [
        dict(depth=2, norm="instancenorm"),
        dict(depth=2, norm="groupnorm", act="sigmoid", im=11, width=8),
        dict(depth=2, norm="layernorm", pool="maxpooling"),
        dict(depth=3, norm="none", pool="none", act="leakyrelu", im=7, width=4),
    ],
    ids=["instancenorm", "groupnorm", "layernorm-maxpool", "nonorm"],
)
def test_the_step_ops_read_nothing_back_without_value_checks(shape, monkeypatch):
    """The four step ops on the ATen path (``HABA_FAST_TRAJECTORY_FUSED=0``, what CUDA tensors run by default) with
    ``check_values=False`` read no value back, which a CUDA-graph capture forbids; the only reads are at::one_hot's
    range checks, which ATen runs on CPU tensors only. With the value checks on, the op does read back."""
    from haba_fast.engines.adjoint import cpp_spec

    monkeypatch.setenv("HABA_FAST_TRAJECTORY_FUSED", "0")
    model = _convnet(**shape)
    X, Y, ws, _ = make_problem(model, 1, 4, tuple(model.im_size), torch.float64)
    spec, x, y, lam = cpp_spec(model), X[0], Y[0], torch.randn_like(ws)
    ops = torch.ops.haba_fast

    def steps():
        ops.trajectory_step_grad(ws, x, y, spec, False)
        _, kept = ops.trajectory_step_grad_keep(ws, x, y, spec, False)
        ops.trajectory_step_adjoint(ws, x, y, lam, spec, True)
        ops.trajectory_step_adjoint_kept(ws, x, y, lam, kept, spec, True)

    reads = _host_reads(steps)
    assert reads and all("aten::one_hot" in chain for chain in reads), [c for c in reads if "aten::one_hot" not in c]
    checked = _host_reads(lambda: ops.trajectory_step_grad(ws, x, y, spec, True))
    assert any("aten::one_hot" not in chain for chain in checked)  # the checks' reads: the test sees them
