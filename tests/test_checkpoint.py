# ruff: noqa: F811  (the digits/buffer fixtures are imported from test_distill and requested by name)
"""Checkpoints and resume (haba_fast.checkpoint): config and input checks, --allow-changed, bitwise resume,
torn history, temp-file cleanup, a crafted pickle, read-only and full output folders."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_distill import MODEL, ToyBuffer, _cfg, buffer, digits  # noqa: F401  (fixtures)

from haba_fast import checkpoint as ck
from haba_fast import data
from haba_fast.distill import DistillConfig, Distiller, distill

QUIET = dict(progress=False, log=lambda s: None)


class Kill(Exception):
    pass


def _kill_at(iteration):
    def cb(distiller, metrics):
        if distiller.iteration == iteration:
            raise Kill()

    return cb


def assert_same_state(a, b, path="state"):
    """Recursive bitwise equality of two checkpoint states (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for k in a:
            assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_state_comparison_can_fail():
    a = {"x": torch.tensor([0.0, 1.0]), "n": 1, "l": [torch.tensor([1], dtype=torch.uint8)]}
    assert_same_state(a, {"x": torch.tensor([0.0, 1.0]), "n": 1, "l": [torch.tensor([1], dtype=torch.uint8)]})
    for b in (
        {"x": torch.tensor([-0.0, 1.0]), "n": 1, "l": a["l"]},  # equal as numbers, different bits
        {"x": a["x"], "n": 2, "l": a["l"]},
        {"x": a["x"], "n": 1, "l": [torch.tensor([2], dtype=torch.uint8)]},
        {"x": a["x"], "n": 1},
    ):
        with pytest.raises(AssertionError):
            assert_same_state(a, b)


def _history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# The state


def test_state_loads_weights_only_and_holds_every_rng(digits, buffer, tmp_path):
    distill(_cfg(iterations=1), digits, buffer, tmp_path, **QUIET)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["format"] == ck.FORMAT and state["iteration"] == 1
    assert set(state["rng"]) == {"distill", "eval"}
    for name in ("distill", "eval"):
        assert state["rng"][name].dtype == torch.uint8, name
    assert isinstance(state["config"], dict) and state["config"]["lr_img"] == 100.0
    assert state["inputs"]["buffer_content"]["num_trajectories"] == 2
    from haba_fast.factorization import load_synthetic

    meta = load_synthetic(tmp_path / "synthetic.pt").meta  # what undoes the normalization (export, pictures)
    assert (meta["mean"], meta["std"], meta["dataset"]) == (list(digits.mean), list(digits.std), "digits")


def test_result_keys_are_documented_split():
    keys = set(ck.result_keys())
    every = {f for f in DistillConfig().to_dict()}
    assert keys | ck.NON_RESULT_KEYS | ck.GUARD_KEYS == every
    assert not keys & (ck.NON_RESULT_KEYS | ck.GUARD_KEYS)
    for k in ("dataset", "zca", "syn_steps", "expert_epochs", "dsa", "engine", "lr_img", "lr_style", "lr_lr", "seed"):
        assert k in keys, k
    for k in ("device", "eval_it", "checkpoint_every", "iterations", "buffer_path"):
        assert k not in keys, k


# ---------------------------------------------------------------------------------------------------------------------
# Resume checks


@pytest.fixture(scope="module")
def one_run(digits, buffer, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_run")
    distill(_cfg(iterations=2, checkpoint_every=1), digits, buffer, out, **QUIET)
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize(
    "change,flags",
    [
        (dict(lr_img=50.0), ["--lr_img"]),
        (dict(syn_steps=3, expert_epochs=2), ["--syn_steps", "--expert_epochs"]),
        (dict(dsa=False), ["--dsa"]),
        (dict(engine="exact"), ["--engine"]),
        (dict(zca=True), ["--zca"]),
        (dict(seed=3), ["--seed"]),
    ],
)
def test_changed_result_flags_are_named(digits, buffer, one_run, tmp_path, change, flags):
    run = _copy(one_run, tmp_path)
    with pytest.raises(ValueError, match="--allow-changed") as info:
        distill(_cfg(iterations=3, **change), digits, buffer, run, resume=True, **QUIET)
    for flag in flags:
        assert flag in str(info.value)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2  # nothing was run


def test_a_run_past_the_asked_iterations_is_refused(digits, buffer, one_run, tmp_path):
    """A checkpoint past --Iteration is another run's result: a clear error, never handed back as this run's."""
    run = _copy(one_run, tmp_path)
    with pytest.raises(ValueError, match="at iteration 2, past this run's --Iteration 1"):
        distill(_cfg(iterations=1), digits, buffer, run, resume=True, **QUIET)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2  # left as it was
    res = distill(_cfg(iterations=2), digits, buffer, run, resume=True, **QUIET)  # the same length: reused
    assert res.iterations == 2 and not res.history  # nothing more was run


def test_non_result_keys_resume_silently(digits, buffer, one_run, tmp_path):
    run = _copy(one_run, tmp_path)
    cfg = _cfg(iterations=3, checkpoint_every=5, eval_it=7, device="cpu", buffer_path="/elsewhere", max_loss=1e5)
    res = distill(cfg, digits, buffer, run, resume=True, **QUIET)
    assert res.iterations == 3


def test_structural_keys_cannot_be_allowed(digits, buffer, one_run, tmp_path):
    run = _copy(one_run, tmp_path)
    with pytest.raises(ValueError, match="cannot change on resume.*n_hallucinators"):
        distill(_cfg(n_hallucinators=2), digits, buffer, run, resume=True, allow_changed=["n_style"], **QUIET)
    with pytest.raises(ValueError, match="not a distillation flag"):
        distill(_cfg(iterations=3), digits, buffer, run, resume=True, allow_changed=["bogus"], **QUIET)


def test_allow_changed_applies_the_new_lrs(digits, buffer, one_run, tmp_path):
    run = _copy(one_run, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    new = _cfg(iterations=3, lr_img=7.0, lr_style=3.0, lr_lr=2e-5)
    seen = {}

    def spy(d, m):
        seen.update(img=d.opt_img.param_groups[0]["lr"], style=d.opt_style.param_groups[0]["lr"])
        seen["lr"] = d.opt_lr.param_groups[0]["lr"]

    logs = []
    res = distill(
        new, digits, buffer, run, resume=True, allow_changed=["--lr-img", "lr_style", "lr-lr"],
        progress=False, log=logs.append, on_iteration=spy,
    )
    assert seen == dict(img=7.0, style=3.0, lr=2e-5)
    assert any("changed lr_img" in s for s in logs)
    # Oracle: the saved state loaded into a distiller built with the new config, stepped once by hand.
    d = Distiller(new, digits, buffer)
    d.load_state_dict(state)
    d.step()
    assert torch.equal(d.synthetic.bases, res.synthetic.bases)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["lr_img"] == 7.0


def test_changed_inputs_are_named(digits, buffer, one_run, tmp_path):
    run = _copy(one_run, tmp_path)
    other_buffer = ToyBuffer(buffer.snaps + 1e-3)
    with pytest.raises(ValueError, match="--buffer_path: the expert trajectories differ"):
        distill(_cfg(iterations=3), digits, other_buffer, run, resume=True, **QUIET)
    other_data = data.load("digits", subset_per_class=30, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="--dataset: the training images or labels differ"):
        distill(_cfg(iterations=3), other_data, buffer, run, resume=True, **QUIET)
    res = distill(_cfg(iterations=3), digits, other_buffer, run, resume=True, allow_changed=["buffer_path"], **QUIET)
    assert res.iterations == 3


# ---------------------------------------------------------------------------------------------------------------------
# Bitwise resume


@pytest.fixture(scope="module")
def full_run(digits, buffer, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    res = distill(_resume_cfg(), digits, buffer, out, **QUIET)
    return out, res


def _resume_cfg(**kw):
    # Evaluation every iteration (one network, one epoch): the evaluation stream is part of what must resume.
    return _cfg(iterations=5, checkpoint_every=2, num_eval=1, epoch_eval_train=1, eval_it=1, batch_train=32, **kw)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 5])
def test_killed_and_resumed_run_is_bitwise_equal(digits, buffer, full_run, tmp_path, kill_at):
    ref_dir, ref = full_run
    run = tmp_path / "run"
    cfg = _resume_cfg()
    with pytest.raises(Kill):
        distill(cfg, digits, buffer, run, on_iteration=_kill_at(kill_at), **QUIET)
    if kill_at == 5:  # the last iteration's checkpoint is written before the callback: nothing left to run
        assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 5
    torch.manual_seed(1234)  # a resumed process starts with another global RNG state
    res = distill(cfg, digits, buffer, run, resume=True, **QUIET)
    assert_same_state(
        torch.load(run / "checkpoint.pt", weights_only=True), torch.load(ref_dir / "checkpoint.pt", weights_only=True)
    )
    assert (run / "history.jsonl").read_text() == (ref_dir / "history.jsonl").read_text()
    # the evaluations after the resumed iteration are the uninterrupted run's
    resumed_from = kill_at if kill_at == 5 else (kill_at // 2) * 2
    # (no checkpoint yet, resumed_from 0: the run starts over and evaluates the initialization again)
    assert res.evaluations == [e for e in ref.evaluations if e["iteration"] > resumed_from or resumed_from == 0]
    assert [e["iteration"] for e in ref.evaluations] == [0, 1, 2, 3, 4, 5]  # from the initialization on


def test_log_lr_state_round_trip(digits, buffer):
    a = Distiller(_cfg(lr_param="log", lr_lr=1e-2), digits, buffer)
    a.step()
    state = a.state_dict()
    b = Distiller(_cfg(lr_param="log", lr_lr=1e-2, seed=5), digits, buffer)
    b.load_state_dict(state)
    assert a.step() == b.step()
    assert torch.equal(a.lr_param, b.lr_param) and torch.equal(a.syn_lr, b.syn_lr)


# ---------------------------------------------------------------------------------------------------------------------
# History, temp files, crafted files


def test_torn_history_line_is_dropped_and_rewritten(digits, buffer, full_run, tmp_path):
    ref_dir, _ = full_run
    run = tmp_path / "run"
    cfg = _resume_cfg()
    with pytest.raises(Kill):
        distill(cfg, digits, buffer, run, on_iteration=_kill_at(3), **QUIET)
    with open(run / "history.jsonl", "a") as f:
        f.write('{"iteration": 3.0, "loss": 0.12')  # a kill in the middle of a line
    logs = []
    distill(cfg, digits, buffer, run, resume=True, progress=False, log=logs.append)
    assert any("dropped 1 unreadable line" in s for s in logs)
    assert [h["iteration"] for h in _history(run)] == [0, 1, 2, 3, 4]
    assert (run / "history.jsonl").read_text() == (ref_dir / "history.jsonl").read_text()


def test_history_restart_keeps_only_earlier_iterations(tmp_path):
    h = ck.History(tmp_path / "history.jsonl")
    for i in range(4):
        h.append({"iteration": float(i), "loss": 1.0 / (i + 1)})
    (tmp_path / "history.jsonl").write_text((tmp_path / "history.jsonl").read_text() + "garbage\n")
    kept = h.restart(2, log=lambda s: None)
    assert [r["iteration"] for r in kept] == [0, 1]
    assert [json.loads(x)["iteration"] for x in (tmp_path / "history.jsonl").read_text().splitlines()] == [0, 1]
    assert h.restart(0) == [] and (tmp_path / "history.jsonl").read_text() == ""


def test_temp_files_of_a_dead_run_are_removed(digits, buffer, one_run, tmp_path):
    run = _copy(one_run, tmp_path)
    stale = [run / ".checkpoint.pt.k3j4.tmp", run / "reference" / ".images_2.pt.x9.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = run / "notes.tmp"  # not ours: no leading dot
    keep.write_text("mine")
    logs = []
    distill(_cfg(iterations=3), digits, buffer, run, resume=True, progress=False, log=logs.append)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert any("removed 2 temp file" in s for s in logs)
    assert not list(run.rglob(".*.tmp"))


class _Evil:
    """Unpickling this object creates a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_and_not_executed(digits, buffer, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"format": ck.FORMAT, "iteration": 1, "payload": _Evil(marker)}, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        distill(_cfg(), digits, buffer, run, resume=True, **QUIET)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def cli_buffer(tmp_path_factory):
    from haba_fast.experts import ExpertConfig, train_experts

    out = tmp_path_factory.mktemp("cli_buffer") / "buf"
    ds = data.load("digits", subset_per_class=5, generator=torch.Generator().manual_seed(0))
    cfg = ExpertConfig(model=MODEL, num_experts=1, epochs=2, batch_size=50, test_every=0, device="cpu")
    train_experts(ds, cfg, out, progress=False)
    return out


def _cli_argv(buf, run, *extra):
    return ["distill", "--dataset", "digits", "--model", MODEL, "--buffer_path", str(buf), "--n_style", "2",
            "--syn_steps", "2", "--expert_epochs", "1", "--max_start_epoch", "1", "--num_eval", "0",
            "--engine", "naive", "--device", "cpu", "--out", str(run), "--no-progress", *extra]  # fmt: skip


def test_crafted_checkpoint_through_the_cli(cli_buffer, tmp_path, capsys):
    from haba_fast.cli import main

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"format": ck.FORMAT, "payload": _Evil(marker)}, run / "checkpoint.pt")
    assert main(_cli_argv(cli_buffer, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "not loaded" in err and "Traceback" not in err
    assert not marker.exists()


def test_allow_changed_through_the_cli(cli_buffer, tmp_path, capsys):
    from haba_fast.cli import main

    run = tmp_path / "run"
    assert main(_cli_argv(cli_buffer, run, "--Iteration", "1")) == 0
    capsys.readouterr()
    assert main(_cli_argv(cli_buffer, run, "--Iteration", "2", "--lr-img", "5", "--resume")) == 2
    err = capsys.readouterr().err
    assert "--lr_img 100.0 -> 5.0" in err and "--allow-changed lr_img" in err
    assert main(_cli_argv(cli_buffer, run, "--Iteration", "2", "--lr-img", "5", "--allow-changed", "lr_img")) == 2
    assert "--allow-changed needs --resume" in capsys.readouterr().err
    argv = _cli_argv(cli_buffer, run, "--Iteration", "2", "--lr-img", "5", "--resume", "--allow-changed", "lr-img")
    assert main(argv) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2 and state["config"]["lr_img"] == 5.0
    assert state["opt_img"]["param_groups"][0]["lr"] == 5.0


def test_a_haba_dc_run_from_before_the_lr_style_default_moved_resumes_with_its_rate(tmp_path, capsys):
    """DC/DSA's lr_style default moved (0.1, then 0.01, then 0.002): a run begun at another rate is never continued
    at the default unasked; the error names the change, and giving the old rate resumes it."""
    from haba_fast.cli import main

    run = tmp_path / "run"
    argv = ["distill", "--dataset", "digits", "--model", MODEL, "--objective", "dc", "--ipc", "2", "--n_style", "2",
            "--outer-loop", "1", "--inner-loop", "1", "--num_eval", "0", "--device", "cpu", "--out", str(run),
            "--no-progress"]  # fmt: skip
    assert main([*argv, "--Iteration", "1", "--lr_style", "0.1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--Iteration", "2", "--resume"]) == 2
    assert "--lr_style 0.1 -> 0.002" in capsys.readouterr().err
    assert main([*argv, "--Iteration", "2", "--resume", "--lr_style", "0.1"]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2 and state["config"]["lr_style"] == 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Read-only and full output folders


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


def _fill(mnt, leave):
    """Take all but ``leave`` bytes of a tmpfs's free space."""
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 16 MiB tmpfs (root only; else skipped); unmounted afterwards."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_out_is_a_clear_error_before_work(digits, buffer, tmp_path, tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(ValueError, match="cannot write to the --out folder .*Read-only"):
        distill(_cfg(), digits, buffer, tmpfs / "run", **QUIET)


def test_read_only_out_without_root(digits, buffer, tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (the tmpfs test covers it)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write to the --out folder"):
            distill(_cfg(), digits, buffer, ro / "run", **QUIET)
    finally:
        ro.chmod(0o755)


def test_full_disk_never_corrupts_the_checkpoint(digits, buffer, tmpfs, tmp_path):
    """A real ENOSPC: a filler file takes the tmpfs's free space after iteration 2."""
    run = tmpfs / "run"
    filler = tmpfs / "filler"

    def fill(distiller, metrics):
        if distiller.iteration == 2:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (64 << 10))
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    cfg = _cfg(iterations=4, checkpoint_every=1)
    with pytest.raises(ValueError, match="could not write the checkpoint of iteration 3.*intact"):
        distill(cfg, digits, buffer, run, on_iteration=fill, **QUIET)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert not list(run.rglob(".*.tmp"))
    filler.unlink()
    res = distill(cfg, digits, buffer, run, resume=True, **QUIET)
    full = distill(cfg, digits, buffer, tmp_path / "full", **QUIET)
    assert res.iterations == 4 and torch.equal(res.synthetic.bases, full.synthetic.bases)


def test_full_disk_is_a_clear_error_before_work(digits, buffer, tmpfs):
    _fill(tmpfs, 200 << 10)  # the write probe needs 1 MiB
    with pytest.raises(ValueError, match="cannot write to the --out folder .*No space left"):
        distill(_cfg(), digits, buffer, tmpfs / "run", **QUIET)
    assert not list(tmpfs.rglob(".*.tmp"))


def test_simulated_enospc_keeps_the_previous_checkpoint(digits, buffer, tmp_path, monkeypatch):
    """Anywhere (no root needed): torch.save writes half the checkpoint, then fails as a full disk does."""
    import haba_fast.io as hio

    real_save = torch.save
    run = tmp_path / "run"

    def failing_save(obj, f, *a, **k):
        if Path(f).name.startswith(".checkpoint.pt."):
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    def arm(distiller, metrics):
        if distiller.iteration == 2:
            monkeypatch.setattr(hio.torch, "save", failing_save)

    with pytest.raises(ValueError, match="No space left on device"):
        distill(_cfg(iterations=4, checkpoint_every=1), digits, buffer, run, on_iteration=arm, **QUIET)
    monkeypatch.setattr(hio.torch, "save", real_save)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert not list(run.rglob(".*.tmp"))
    assert distill(_cfg(iterations=4, checkpoint_every=1), digits, buffer, run, resume=True, **QUIET).iterations == 4


def test_buffer_read_only_and_full(tmpfs):
    from haba_fast.experts import ExpertConfig, train_experts

    ds = data.load("digits", subset_per_class=5, generator=torch.Generator().manual_seed(0))
    cfg = ExpertConfig(model=MODEL, num_experts=1, epochs=1, batch_size=50, test_every=0, device="cpu")
    _fill(tmpfs, 200 << 10)
    with pytest.raises(ValueError, match="cannot write to the expert output folder .*No space left"):
        train_experts(ds, cfg, tmpfs / "buf", progress=False)
    (tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(ValueError, match="cannot write to the expert output folder .*Read-only"):
        train_experts(ds, cfg, tmpfs / "buf", progress=False)


def test_buffer_write_failure_keeps_finished_experts(tmp_path, monkeypatch):
    """Anywhere (no root needed): the header write after expert 1 fails as a full disk does; a rerun finishes the
    buffer, equal to an uninterrupted one."""
    import haba_fast.experts as ex

    ds = data.load("digits", subset_per_class=5, generator=torch.Generator().manual_seed(0))
    cfg = ex.ExpertConfig(model=MODEL, num_experts=2, epochs=1, batch_size=50, test_every=0, device="cpu")
    real = ex.atomic_write_text
    calls = []

    def failing(text, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(text, path)

    monkeypatch.setattr(ex, "atomic_write_text", failing)
    with pytest.raises(ValueError, match="could not write expert 1 .*No space left.*the 1 finished expert"):
        ex.train_experts(ds, cfg, tmp_path / "buf", progress=False)
    monkeypatch.setattr(ex, "atomic_write_text", real)
    assert ex.load_buffer(tmp_path / "buf").num_trajectories == 1
    ex.train_experts(ds, cfg, tmp_path / "buf", progress=False)
    ex.train_experts(ds, cfg, tmp_path / "ref", progress=False)
    for name in ("experts.json", "expert_00000.bin", "expert_00001.bin"):
        assert (tmp_path / "buf" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


@pytest.mark.parametrize("n", [2**24 + 5, 43_120_000])
def test_digest_of_a_large_dataset(n):
    """Past 2**24 elements the float32 sample positions round up beyond the end (55,000 Fashion-MNIST images,
    43,120,000 floats, crashed the resume check): the digest reads the last element instead, and still sees a
    change in the data."""
    from haba_fast.checkpoint import _digest

    t = torch.zeros(n, dtype=torch.uint8)
    a = _digest(t)
    t[-1] = 1  # the last element is one of the samples
    assert _digest(t) != a
    small = torch.arange(1000.0)  # below the sample count: every element, unchanged by the clamp
    assert _digest(small) == _digest(small.clone())


def test_a_setting_the_run_never_reads_does_not_block_its_resume():
    """A pixel DC run begun when lr_style's default was 0.01 resumes under today's 0.002: pixel sets have no
    hallucinators (distill.SCOPES). A HaBa run stops, naming the change and the checkpoint's value."""
    import dataclasses

    from haba_fast.checkpoint import check_resume
    from haba_fast.distill import DistillConfig

    pixels = DistillConfig(objective="dc", parameterization="pixels", ipc=50, lr_style=0.002)
    assert check_resume({"config": {**pixels.to_dict(), "lr_style": 0.01}}, pixels) == []
    haba = dataclasses.replace(pixels, parameterization="haba")
    with pytest.raises(ValueError) as err:
        check_resume({"config": {**haba.to_dict(), "lr_style": 0.01}}, haba)
    assert "--lr_style 0.01 -> 0.002. Resume with the checkpoint's values (--lr_style 0.01: a default may have moved" \
        in str(err.value) and "--allow-changed lr_style" in str(err.value)
    assert check_resume({"config": {**haba.to_dict(), "lr_style": 0.01}}, haba, allow_changed=["lr_style"]) == [
        "lr_style"]
