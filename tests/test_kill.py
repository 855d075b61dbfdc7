"""SIGKILL `haba-fast buffer` and `haba-fast distill` at random moments (inside checkpoint writes too), resume each
time, and compare the end result with an uninterrupted run's, bitwise (CPU, one thread).

``$HABA_FAST_IO_TEST_DELAY`` makes every atomic write sleep between writing its temp file and renaming it, so a
kill lands inside a write often; the "write" kills wait for a temp file to exist and kill right then.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import assert_same_state

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ConvNetW32"
WRITE_DELAY = "0.05"  # seconds inside every atomic write


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # the same thread count in every process: bitwise-equal CPU reductions
    env["HABA_FAST_IO_TEST_DELAY"] = WRITE_DELAY
    return env


def _cli(args):
    return [sys.executable, "-m", "haba_fast.cli", *args]


def buffer_args(out, experts, epochs):
    return [
        "buffer", "--dataset", "digits", "--model", MODEL, "--num_experts", str(experts), "--train_epochs",
        str(epochs), "--subset-per-class", "20", "--batch_train", "64", "--test-every", "0", "--device", "cpu",
        "--quiet", "--out", str(out),
    ]  # fmt: skip


def distill_args(out, buf, iterations):
    return [
        "distill", "--dataset", "digits", "--model", MODEL, "--buffer_path", str(buf), "--ipc", "1", "--n_style",
        "2", "--syn_steps", "3", "--expert_epochs", "1", "--max_start_epoch", "2", "--Iteration", str(iterations),
        "--checkpoint-every", "1", "--num_eval", "1", "--epoch_eval_train", "1", "--eval_it", "3",
        "--batch_train", "64", "--engine", "naive", "--device", "cpu", "--no-progress", "--resume",
        "--out", str(out),
    ]  # fmt: skip


def _run(args, log):
    with open(log, "ab") as f:
        r = subprocess.run(_cli(args), env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert r.returncode == 0, Path(log).read_text()[-3000:]


class _Forked:
    """A ``haba-fast`` run in a forked child of this process (no interpreter start-up: the fast test's launcher)."""

    def __init__(self, args, log):
        import multiprocessing

        self.proc = multiprocessing.get_context("fork").Process(target=_child_main, args=(list(args), str(log)))
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.exitcode

    @property
    def returncode(self):
        return self.proc.exitcode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self):
        self.proc.join()
        return self.proc.exitcode


def _child_main(args, log):
    f = open(log, "ab", buffering=0)
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    os.environ["HABA_FAST_IO_TEST_DELAY"] = WRITE_DELAY
    from haba_fast.cli import main

    code = 1
    try:
        code = main(args)
    finally:
        sys.stdout.flush()
        os._exit(code)


def _popen(args, log):
    with open(log, "ab") as f:
        return subprocess.Popen(_cli(args), env=_env(), stdout=f, stderr=subprocess.STDOUT)


def _temp_files(out):
    return list(Path(out).rglob(".*.tmp"))


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def kill_loop(
    args, out, progress_file, kills, rng, log, modes=("early", "write", "random"), launch=_popen, final=None,
    start_file=None, max_writes=8,
):
    """Start ``args`` again and again, SIGKILL it ``kills`` times, then let it finish.

    Modes (cycled): "early": a random moment of the start-up (within 0.3 s after ``start_file`` changed, or
    within 3 s of the launch without one: loading, cleanup, the history rewrite, the first step); "write":
    inside the n-th atomic write of the launch (n random in 1..max_writes: a temp file exists at the kill); "random":
    after it made progress (``progress_file`` changed), a random moment within the next half second.

    Returns:
        (kills survived, kills that hit an atomic write: a temp file was there when it died).
    """
    survived = in_write = 0
    i = 0
    while survived < kills:
        mode = modes[i % len(modes)]
        i += 1
        before = _mtime(progress_file)
        p = launch(args, log)
        try:
            if mode == "early":
                if start_file is None:
                    time.sleep(rng.uniform(0.0, 3.0))
                else:
                    started = _mtime(start_file)
                    while p.poll() is None and _mtime(start_file) == started:
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0.0, 0.3))
            elif mode == "write":
                # inside the n-th atomic write of this launch (history rewrite, synthetic files, checkpoint.pt,
                # an expert's .bin, experts.json, ...)
                n, seen = rng.randint(1, max_writes), set()
                deadline = time.monotonic() + 60
                while p.poll() is None and time.monotonic() < deadline:
                    now = {t.name for t in _temp_files(out)}
                    seen |= now
                    if now and len(seen) >= n:
                        break
                    time.sleep(0.002)
            else:
                while p.poll() is None and _mtime(progress_file) == before:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))
            if p.poll() is not None:
                assert p.returncode == 0, Path(log).read_text()[-3000:]
                break  # it finished first: no more work to interrupt
            p.send_signal(signal.SIGKILL)
            p.wait()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        survived += 1
        in_write += bool(_temp_files(out))
    p = (final or launch)(args, log)  # to the end
    assert p.wait() == 0, Path(log).read_text()[-3000:]
    assert not _temp_files(out), _temp_files(out)
    return survived, in_write


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def compare_buffers(a, b):
    """Names of the files that differ between two expert buffers (haba format)."""
    names = sorted(p.name for p in Path(a).iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in Path(b).iterdir() if not p.name.startswith(".")), (a, b)
    return [n for n in names if (Path(a) / n).read_bytes() != (Path(b) / n).read_bytes()]


def compare_runs(a, b):
    """Names of the result files that differ between two distillation folders."""
    bad = []
    for name in ("checkpoint.pt", "synthetic.pt", "synthetic_best.pt", "synthetic_last.pt"):
        try:
            assert_same_state(_load(Path(a) / name), _load(Path(b) / name), name)
        except AssertionError:
            bad.append(name)
    if (Path(a) / "history.jsonl").read_bytes() != (Path(b) / "history.jsonl").read_bytes():
        bad.append("history.jsonl")
    return bad


def _report(what, kills, in_write, mismatches):
    print(f"{what}: kills survived {kills} ({in_write} inside an atomic write), mismatches {len(mismatches)}"
          + (f": {mismatches}" if mismatches else ""))


@pytest.mark.slow
def test_twenty_kills_buffer_and_distill(tmp_path):
    """The uninterrupted runs and the last (completing) launch of each killed run are real CLI processes; the
    killed launches are forked children running the CLI's ``main`` (the same code without an interpreter start-up,
    which would take most of the time on a busy 2-core machine)."""
    rng = random.Random(0)
    log = tmp_path / "log.txt"
    ref_buf, buf = tmp_path / "ref_buf", tmp_path / "buf"
    # enough experts that the buffer run outlasts 6 kills (an early kill waits up to 3 s)
    experts, epochs, iterations = 24, 2, 10
    _run(buffer_args(ref_buf, experts, epochs), log)
    # two writes per expert (its .bin, then experts.json): at most 3 writes in, so the kills outlast the experts
    # "early" kills wait for the launch's first recorded expert (not up to 3 s, in which many experts can finish)
    k1, w1 = kill_loop(buffer_args(buf, experts, epochs), buf, buf / "experts.json", 6, rng, log, launch=_Forked,
                       final=_popen, max_writes=3, start_file=buf / "experts.json")
    m1 = compare_buffers(ref_buf, buf)
    _report("buffer", k1, w1, m1)

    # Both distillations read the same buffer folder (its path is part of the saved config).
    ref_run, run = tmp_path / "ref_run", tmp_path / "run"
    _run(distill_args(ref_run, buf, iterations), log)
    k2, w2 = kill_loop(
        distill_args(run, buf, iterations), run, run / "checkpoint.pt", 14, rng, log, launch=_Forked, final=_popen,
        start_file=run / "history.jsonl",
    )
    m2 = compare_runs(ref_run, run)
    _report("distill", k2, w2, m2)
    print(f"total: kills survived {k1 + k2} ({w1 + w2} inside a write), mismatches found {len(m1) + len(m2)}")
    assert (k1, k2) == (6, 14) and not m1 and not m2
    assert w1 + w2 >= 1  # the write hook works: some kills hit a write


def test_two_kills_distill(tmp_path):
    """The fast version: the buffer and the uninterrupted run in-process, the killed run through the CLI's ``main``
    in forked children (SIGKILLed the same way; no interpreter start-up per launch)."""
    from haba_fast import data
    from haba_fast.cli import build_parser
    from haba_fast.commands.distill import config_from_args
    from haba_fast.distill import distill
    from haba_fast.experts import ExpertConfig, load_buffer, train_experts

    buf = tmp_path / "buf"
    ds = data.load("digits", subset_per_class=20, generator=torch.Generator().manual_seed(0))
    train_experts(ds, ExpertConfig(model=MODEL, num_experts=1, epochs=2, batch_size=64, test_every=0, device="cpu"),
                  buf, progress=False)
    iterations = 6
    run, ref_run = tmp_path / "run", tmp_path / "ref_run"
    args = build_parser().parse_args(distill_args(ref_run, buf, iterations))
    distill(config_from_args(args), data.load("digits"), load_buffer(buf), ref_run, progress=False, log=lambda s: None)

    k, w = kill_loop(distill_args(run, buf, iterations), run, run / "checkpoint.pt", 2, random.Random(1),
                     tmp_path / "log.txt", modes=("write", "random"), launch=_Forked)
    m = compare_runs(ref_run, run)
    _report("distill", k, w, m)
    assert k == 2 and not m
