"""``offload_weights``: the adjoint engines keep the weight trajectory in a temporary file (CPU) or pinned host
memory (CUDA) instead of in memory. The bytes come back as written, so every gradient is the in-memory engine's bit
for bit; the engine holds two w_t at a time.

Oracles: the same engine with the trajectory in memory (bitwise), and ``naive_unroll`` of tests/test_adjoint.py.
The CUDA path (pinned host memory) is tested in tests/test_gpu.py.
"""

from __future__ import annotations

import argparse
import os
import warnings

import pytest
import torch
from test_adjoint import _convnet, grads, make_problem, naive_unroll, rel_err
from test_distill import buffer, digits  # noqa: F401, F811  (module fixtures reused)
from test_memory_budget import REL, _haba_problem, _syn_grads
from utils import extension_loaded

from haba_fast.engines import adjoint, get_adjoint_engine, get_engine
from haba_fast.engines.offload import OffloadedRows, filesystem_type

needs_cpp = pytest.mark.skipif(not extension_loaded(), reason="the C++ extension is not built")
BACKENDS = ["torch", pytest.param("cpu", marks=needs_cpp)]


# ----------------------------------------------------------------------------------------------------------------------
# The store.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("numel", [1, 7, 1031])
def test_rows_come_back_bit_for_bit(tmp_path, dtype, numel):
    g = torch.Generator().manual_seed(numel)
    rows = [(torch.randn(numel, generator=g) * 1e3).to(dtype) for _ in range(5)]
    rows[2][0] = float("nan") if dtype.is_floating_point else 3  # any bit pattern, NaN included
    store = OffloadedRows(5, numel, dtype, torch.device("cpu"), directory=str(tmp_path))
    assert store.nbytes == 5 * numel * rows[0].element_size()
    for i in (3, 0, 4, 1, 2):  # any order
        store.write(i, rows[i])
    for i in (2, 4, 0, 3, 1, 2):
        got = store.read(i)
        assert got.dtype == dtype and got.shape == (numel,)
        assert torch.equal(got.view(torch.uint8), rows[i].view(torch.uint8))
    store.write(1, rows[4])  # a row may be rewritten
    assert torch.equal(store.read(1).view(torch.uint8), rows[4].view(torch.uint8))
    assert os.listdir(tmp_path) == []  # the file is unlinked at creation: nothing to leave behind
    store.close()


def test_bad_rows_raise(tmp_path):
    store = OffloadedRows(3, 4, torch.float32, torch.device("cpu"), directory=str(tmp_path))
    with pytest.raises(IndexError, match="row 3 out of range"):
        store.write(3, torch.zeros(4))
    with pytest.raises(IndexError, match="row -1"):
        store.read(-1)
    with pytest.raises(ValueError, match="expected 4 torch.float32 elements, got 5"):
        store.write(0, torch.zeros(5))
    with pytest.raises(ValueError, match="got 4 torch.float64"):
        store.write(0, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(OSError, match="row 2 .* got 0 of 16 bytes"):
        store.read(2)  # never written: an error, not zeros
    with pytest.raises(ValueError, match="n_rows >= 1"):
        OffloadedRows(0, 4, torch.float32, torch.device("cpu"))


def test_a_folder_that_cannot_hold_the_file_is_named(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(OSError, match="cannot create the offloaded weight trajectory's file in .*no/such.*TMPDIR"):
        OffloadedRows(2, 4, torch.float32, torch.device("cpu"), directory=str(missing))


def test_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    store = OffloadedRows(2, 4, torch.float32, torch.device("cpu"), directory=str(tmp_path))

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="writing the offloaded weight trajectory to a temporary file in .*No space"):
        store.write(0, torch.zeros(4))


def test_filesystem_type_takes_the_longest_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\ntmpfs /scratch tmpfs rw 0 0\nfoo /scratch/my\\040disk xfs rw 0 0\nbad line\n"
    )
    assert filesystem_type("/home/x", str(mounts)) == "ext4"
    assert filesystem_type("/scratch", str(mounts)) == "tmpfs"
    assert filesystem_type("/scratch/a/b", str(mounts)) == "tmpfs"
    assert filesystem_type("/scratch/my disk/f", str(mounts)) == "xfs"
    assert filesystem_type("/scratchy", str(mounts)) == "ext4"  # a prefix of the name is not a mount point
    assert filesystem_type("/x", str(tmp_path / "none")) is None


def test_a_tmpfs_folder_warns(tmp_path, monkeypatch):
    from haba_fast.engines import offload

    monkeypatch.setattr(offload, "filesystem_type", lambda path: "tmpfs")
    monkeypatch.setattr(offload, "_warned_tmpfs", set())
    with pytest.warns(RuntimeWarning, match="is a tmpfs: the offloaded weight trajectory stays in RAM"):
        OffloadedRows(2, 4, torch.float32, torch.device("cpu"), directory=str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# The engines: bitwise the in-memory trajectory's gradients, and the naive unroll's.


def _unroll_grads(step, X, Y, ws, wt, budget, offload, dtype):
    Xr = X.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=dtype, requires_grad=True)
    run = adjoint._Run(adjoint._TensorBatches(Xr, Y), step, ws, wt, False, budget, False, offload)
    loss = adjoint._unroll(run, lr, (Xr,))
    loss.backward()
    return (loss.detach(), Xr.grad, lr.grad), run.stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("budget", [0, "two", None])
@pytest.mark.parametrize("N", [1, 4, 7])
def test_offloaded_unroll_is_the_in_memory_one_bitwise(backend, dtype, budget, N):
    """The per-step unroll at budget 0, two kept steps and unlimited (None), trajectory in memory or offloaded."""
    model = _convnet(depth=2, norm="instancenorm", dtype=dtype)
    X, Y, ws, wt = make_problem(model, N, 3, tuple(model.im_size), dtype)
    step = adjoint._CppStep(adjoint.cpp_spec(model)) if backend == "cpu" else adjoint._TorchStep(model)
    if budget == "two":
        _, stats = _unroll_grads(step, X, Y, ws, wt, None, False, dtype)
        budget = int(stats["per_step_bytes"] * 3.5)  # 2 steps + the one held back
    base, base_stats = _unroll_grads(step, X, Y, ws, wt, budget, False, dtype)
    got, stats = _unroll_grads(step, X, Y, ws, wt, budget, True, dtype)
    for a, b in zip(got, base):
        assert torch.equal(a, b)
    assert base_stats["stored_weights"] == N + 1 and stats["stored_weights"] == 2
    assert stats["offloaded_weights"] == N and stats["offloaded_bytes"] == N * ws.numel() * ws.element_size()
    assert stats["stored_steps"] == base_stats["stored_steps"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["exact", "first-order"])
def test_offloaded_engine_equals_budget_zero_and_naive(backend, dtype, name):
    model = _convnet(depth=2, norm="instancenorm", dtype=dtype)
    X, Y, ws, wt = make_problem(model, 5, 3, tuple(model.im_size), dtype)
    base = grads(get_adjoint_engine(name, backend, 0), model, X, Y, ws, wt)
    eng = get_adjoint_engine(name, backend, 0, offload_weights=True)
    got = grads(eng, model, X, Y, ws, wt)
    assert eng.last_backend == backend and eng.last_stats["stored_weights"] == 2
    for a, b in zip(got, base):
        assert rel_err(a, b) < REL[dtype], rel_err(a, b)
    if name == "exact":
        ref = grads(naive_unroll, model, X, Y, ws, wt)
        for a, b in zip(got, ref):
            assert rel_err(a, b) < REL[dtype] * (1 if dtype == torch.float64 else 10), rel_err(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [0, "unlimited"])
def test_streamed_offloaded_equals_in_memory_and_naive(dtype, backend, budget):
    """HaBa's streamed batches (generate + augment per step): bitwise the in-memory engine, and naive's."""
    from haba_fast.objectives.mtt import build_inputs, trajectory_loss

    N = 5
    syn, plan, model, ws, wt = _haba_problem(N, dtype)

    def stacked(lr):
        X, Y = build_inputs(syn, plan)
        return get_engine("naive")(model, X, Y, ws, wt, lr)

    ref = _syn_grads(stacked, syn, dtype)
    eng0 = get_adjoint_engine("exact", backend, budget)
    base = _syn_grads(lambda lr: trajectory_loss(eng0, model, syn, plan, ws, wt, lr), syn, dtype)
    eng = get_adjoint_engine("exact", backend, budget, offload_weights=True)
    got = _syn_grads(lambda lr: trajectory_loss(eng, model, syn, plan, ws, wt, lr), syn, dtype)
    assert eng.last_backend == backend and eng.last_stats["offloaded_weights"] == N
    for i, (a, b, r) in enumerate(zip(got, base, ref)):
        assert torch.equal(a, b), i
        assert rel_err(a, r) < REL[dtype] * (1 if dtype == torch.float64 else 10), (i, rel_err(a, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [0, "unlimited"])
def test_offloaded_backward_twice(backend, budget):
    """retain_graph: a second backward reads the trajectory back again (the kept steps are consumed by the first,
    so it recomputes them): both give the in-memory engine's gradients."""
    model = _convnet(depth=1, norm="none", width=4, im=5)
    X, Y, ws, wt = make_problem(model, 5, 2, tuple(model.im_size), torch.float64)
    out = {}
    for offload in (False, True):
        Xr = X.clone().requires_grad_(True)
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        loss = get_adjoint_engine("exact", backend, budget, offload_weights=offload)(model, Xr, Y, ws, wt, lr)
        first = torch.autograd.grad(loss, (Xr, lr), retain_graph=True)
        out[offload] = first, torch.autograd.grad(loss, (Xr, lr))
    for a, b in zip(*out[True]):
        assert torch.equal(a, b)
    # in memory at budget 0 a stored X runs the whole-unroll op (cpu backend): equal up to rounding
    for a, b in zip(out[True][0] + out[True][1], out[False][0] + out[False][1]):
        assert rel_err(a, b) < REL[torch.float64]


def test_a_strided_w_start_gives_the_in_memory_bits():
    """A non-contiguous w_start is laid out as the in-memory trajectory's w_0 (same strides, same bits)."""
    model = _convnet(depth=1, norm="none", width=4, im=5)
    X, Y, ws, wt = make_problem(model, 4, 2, tuple(model.im_size), torch.float64)
    strided = torch.stack([ws, ws], 1)[:, 0]
    assert not strided.is_contiguous()
    base = grads(get_adjoint_engine("exact", "torch", 0), model, X, Y, strided, wt)
    got = grads(get_adjoint_engine("exact", "torch", 0, offload_weights=True), model, X, Y, strided, wt)
    for a, b in zip(got, base):
        assert torch.equal(a, b)


def test_offloaded_kept_torch_steps_count_their_weights():
    """Offloaded, a kept torch step's graph holds its w_t on the device (the trajectory no longer does): one stored
    step is P values more than in memory, where w_t is the trajectory's."""
    model = _convnet(depth=1, norm="none", width=4, im=5)
    X, Y, ws, wt = make_problem(model, 3, 2, tuple(model.im_size), torch.float64)
    per_step = {}
    for offload in (False, True):
        eng = get_adjoint_engine("exact", "torch", "unlimited", offload_weights=offload)
        grads(eng, model, X, Y, ws, wt)
        per_step[offload] = eng.last_stats["per_step_bytes"]
    assert per_step[True] - per_step[False] == ws.numel() * ws.element_size()


def test_offloaded_trajectory_goes_to_tmpdir(tmp_path, monkeypatch):
    """The file is created in $TMPDIR (tempfile's folder), and the forward sweep writes every w_t but w_N there."""
    import tempfile

    from haba_fast.engines import offload

    made = []
    orig = offload.OffloadedRows.__init__

    def spy(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(offload.OffloadedRows, "__init__", spy)
    model = _convnet(depth=1, norm="none", width=4, im=5)
    X, Y, ws, wt = make_problem(model, 3, 2, tuple(model.im_size), torch.float64)
    grads(get_adjoint_engine("exact", "torch", 0, offload_weights=True), model, X, Y, ws, wt)
    assert len(made) == 1 and made[0].where == f"a temporary file in {tmp_path}" and made[0].n_rows == 3
    assert torch.equal(made[0].read(0), ws)


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing.


def test_offload_plumbing():
    from haba_fast.checkpoint import NON_RESULT_KEYS
    from haba_fast.commands.distill import add_arguments, config_from_args
    from haba_fast.distill import DistillConfig

    with pytest.raises(ValueError, match="cannot offload"):
        get_engine("naive", offload_weights=True)
    with pytest.raises(ValueError, match="min already holds"):
        get_engine("exact", memory_budget="min", offload_weights=True)
    eng = get_engine("exact", memory_budget="2GB", offload_weights=True)
    assert eng.offload_weights and "offload_weights=True" in repr(eng)
    assert not get_engine("exact").offload_weights
    assert DistillConfig().offload_weights is False
    DistillConfig(offload_weights=True).validate()
    DistillConfig(offload_weights=True, memory_budget="unlimited").validate()
    with pytest.raises(ValueError, match="min already holds"):
        DistillConfig(offload_weights=True, memory_budget="min").validate()
    for bad in (dict(objective="dm"), dict(engine="naive")):
        with pytest.raises(ValueError, match="--offload-weights applies to --objective mtt"):
            DistillConfig(offload_weights=True, **bad).validate()
    assert "offload_weights" in NON_RESULT_KEYS  # a resumed run may switch it: the same bytes
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--offload-weights"])).offload_weights is True
    assert config_from_args(parser.parse_args(["--offload_weights"])).offload_weights is True
    assert config_from_args(parser.parse_args([])).offload_weights is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_distiller_step_offloaded_is_the_same_step(digits, buffer, backend):  # noqa: F811
    """One HaBa iteration with the trajectory offloaded: the synthetic set's gradients bit for bit."""
    from test_distill import _cfg

    from haba_fast.distill import Distiller

    out = {}
    for offload in (False, True):
        d = Distiller(_cfg(engine="exact", offload_weights=offload), digits, buffer)
        assert d.engine.offload_weights is offload
        d.engine.backend = backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d.step()
        assert d.engine.last_stats["stored_weights"] == (2 if offload else 5)
        described = d.objective.describe()
        assert ("weight trajectory offloaded to a temporary file in" in described) is offload
        out[offload] = [p.grad.clone() for p in d.synthetic.parameters()]
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)


def test_budget_report_offload_rows(tmp_path):
    """bench/run_memory_budget.sh's report: offloaded rows get their own syn_steps section, with the CPU time
    against the in-memory rows of the same commit, and stay out of the budget-0 sections."""
    from haba_fast.benchmarks.iteration import write_budget_report

    def row(steps, rss, cpu, offload, commit="new"):
        return dict(
            ipc=10,
            syn_steps=steps,
            batch_syn=100,
            memory_budget="0",
            memory_budget_mb=0,
            engine_backend="cpu",
            s_per_iter=cpu,
            cpu_s_per_iter=cpu,
            peak_rss_mb=rss,
            stored_weights=2 if offload else steps + 1,
            offload_weights=offload,
            offloaded_mb=steps * 1.22 if offload else 0.0,
            env={"commit": commit},
        )

    rows = [row(10, 900, 30.0, True), row(10, 902, 30.0, True), row(80, 905, 220.0, True)]
    rows += [row(10, 912, 29.0, False), row(80, 998, 200.0, False), row(80, 990, 100.0, False, commit="old")]
    rows += [row(20, 5000, 1.0, True)]  # an offloaded (a)-shaped row: not a budget-0 row of section (a)
    write_budget_report(rows, str(tmp_path / "memory_budget.json"))
    text = (tmp_path / "MEMORY_BUDGET.md").read_text()
    head = "## Memory flat in syn_steps (budget 0, weight trajectory offloaded to a file (`--offload-weights`)"
    assert head in text
    offloaded = text[text.index(head) :]
    assert "(medians of 1 and 2 runs): **1.004x** (target <= 1.05x) -> met" in offloaded
    cpu = "CPU time at syn_steps {}, offloaded / in memory (same commit; medians of {} and 1 runs): {}"
    assert cpu.format(10, 2, "1.034x") in offloaded and cpu.format(80, 1, "1.100x") in offloaded
    assert "98 MB at 80 steps" in offloaded
    in_memory = text[text.index("## Memory flat in syn_steps (budget 0, bpc 10") : text.index(head)]
    assert "(medians of 2 and 1 runs): **1.090x**" in in_memory  # 994 / 912: the offloaded rows left out
    assert "5000" not in text[: text.index("## Memory flat")]
