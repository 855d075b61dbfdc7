"""Multi-process runs (haba_fast.dist): 2 gloo ranks against one process.

Buffer files, one distillation iteration's gradients, evaluation results and checkpoints of a 2-process run equal
the 1-process run's (up to the float order of the sum over ranks); a dead rank ends the job with an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import dist_workers as W
import pytest
import torch
import torch.multiprocessing as mp

from haba_fast import dist


def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # no torchrun: no group
    assert dist.init_from_env("cpu") is False
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.main_weight()) == (0, 1, True, 1.0)
    t = torch.arange(3.0)
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert dist.broadcast({"a": 1}) == {"a": 1}
    assert dist.gather_objects(5) == [5] and dist.all_gather_objects(5) == [5]
    r = dist.BatchReducer(7)
    assert (r.lo, r.hi, r.weight, r.active) == (0, 7, 1.0, False)
    X, Y = torch.zeros(2, 7, 1), torch.zeros(2, 7)
    assert r.shard(X, Y)[0] is X and r.reduce(t) is t and r.share(t) is t
    dist.barrier()


def test_run_on_main_returns_or_raises_on_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.run_on_main(lambda: 7) == 7

    def fail():
        raise ValueError("folder is read-only")

    with pytest.raises(ValueError, match="read-only"):
        dist.run_on_main(fail)
    with pytest.raises(KeyError):  # an error outside ``errors`` is not caught
        dist.run_on_main(lambda: {}["missing"])


def test_init_from_env_rejects_bad_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK"):
        dist.init_from_env("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("HABA_FAST_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HABA_FAST_DIST_TIMEOUT"):
        dist.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.init_from_env("cpu") is False


def test_collectives_on_two_ranks(tmp_path):
    r0, r1 = W.run_ranks(W.collectives, 2, tmp_path)
    for r, out in enumerate((r0, r1)):
        assert out["rank"] == r and out["world"] == 2 and out["is_main"] == (r == 0)
        assert out["sum"].tolist() == [3.0] * 3
        assert out["bcast"].tolist() == [1.0, 1.0]  # from the last rank
        assert out["obj"] == {"from": 0}
        assert out["everyone"] == [0, 10]
        assert out["grad_sum"].tolist() == [3.0, 3.0] and out["q_grad"] is None
        assert out["grad_bcast"].tolist() == [5.0, 5.0]
    assert r0["gathered"] == [("rank", 0), ("rank", 1)] and r1["gathered"] is None


def test_destroy_waits_for_every_rank(tmp_path):
    # A rank that left while its peer still read the last collective aborted the peer (SIGABRT): destroy() waits.
    assert W.run_ranks(W.leave_in_turn, 2, tmp_path) == [True, True]


def test_a_rank_killed_by_a_signal_says_how_far_each_rank_got(tmp_path, capfd):
    """The harness's own report: a rank that aborts fails the run with the signal, where every thread of it was
    (faulthandler) and how far each rank got; an earlier call's result files in the folder do not count."""
    torch.save(0, tmp_path / "rank1.pt")
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT") as info:
        W.run_ranks(W.abort_rank1, 2, tmp_path)
    assert "abort_rank1 on 2 ranks: rank 0 saved its result; rank 1 did not save a result" in info.value.__notes__
    assert "Fatal Python error: Aborted" in capfd.readouterr().err


def test_cli_leaves_the_process_group_after_every_command(monkeypatch):
    """The CLI under torchrun leaves the group before exiting: waiting for every rank when the command finished
    (destroy's barrier, tested above), at once when it failed (a peer may never arrive)."""
    import argparse

    import torch.distributed  # noqa: F401  (a command that joined a group has imported it)

    from haba_fast import cli

    calls = []
    monkeypatch.setattr(dist, "destroy", lambda wait=True: calls.append(wait))

    def parser_running(func):
        p = argparse.ArgumentParser()
        p.set_defaults(func=func, command="x")
        return lambda: p

    def fail(exc):
        def func(args):
            raise exc
        return func

    monkeypatch.setattr(cli, "build_parser", parser_running(lambda args: 0))
    assert cli.main([]) == 0 and calls == [True]
    monkeypatch.setattr(cli, "build_parser", parser_running(fail(ValueError("bad input"))))
    assert cli.main([]) == 2 and calls == [True, False]
    monkeypatch.setattr(cli, "build_parser", parser_running(fail(RuntimeError("a bug"))))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([])
    assert calls == [True, False, False]


def test_batch_reducer_needs_a_sample_per_rank(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    with pytest.raises(ValueError, match="batch_syn"):
        dist.BatchReducer(3)


def test_engine_gradients_equal_one_process(tmp_path):
    """naive, exact and first-order (Python adjoint) on 2 ranks: the loss on every rank, dL/dX and dL/dlr summed over
    ranks equal one process's (float64 < 1e-10, float32 < 1e-5, relative to the largest value)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # first-order's approximation warning
        (ref,) = W.run_ranks(W.engine_grads_all, 1, tmp_path / "one")
    parts = W.run_ranks(W.engine_grads_all, 2, tmp_path / "two")
    for case in W.ENGINE_CASES:
        tol = 1e-10 if case[1] == torch.float64 else 1e-5
        r, (p0, p1) = ref[case], (parts[0][case], parts[1][case])
        assert p0["rows"] == (0, 3) and p1["rows"] == (3, 7)
        for p in (p0, p1):  # the same loss on every rank (every rank stepped the same w_t)
            assert abs(float(p["loss"] - r["loss"])) <= tol * max(1.0, abs(float(r["loss"]))), case
        assert p0["dX"][:, 3:].abs().max() == 0 and p1["dX"][:, :3].abs().max() == 0  # each rank: its rows
        assert (p0["dX"] + p1["dX"] - r["dX"]).abs().max() <= tol * r["dX"].abs().max(), case
        dlr = p0["dlr"] + p1["dlr"]
        assert abs(float(dlr - r["dlr"])) <= tol * max(1.0, abs(float(r["dlr"]))), case
        assert r["dX"].abs().max() > 0 and r["dlr"] != 0  # the gradients compared are not trivially zero


def test_distiller_step_equals_one_process(tmp_path):
    """One float32 iteration (exact engine, Python adjoint), HaBa and Pixels data-parallel, and HaBa with 2 expert
    segments per iteration (trajectory-parallel on 2 ranks): the updated synthetic set, lr and adversary of 2 ranks
    equal one process's, and the ranks are bitwise in step."""
    (refs,) = W.run_ranks(W.distiller_steps, 1, tmp_path / "one")
    twos = W.run_ranks(W.distiller_steps, 2, tmp_path / "two")
    assert refs["haba_m2"]["metrics"]["segments"] == 2.0
    assert abs(refs["haba_m2"]["metrics"]["loss"] - refs["haba"]["metrics"]["loss"]) > 1e-6  # another algorithm
    for key, ref in refs.items():
        r0, r1 = twos[0][key], twos[1][key]
        for name, p in ref["params"].items():
            torch.testing.assert_close(r0["params"][name], p, rtol=1e-5, atol=1e-5)
            assert torch.equal(r0["params"][name], r1["params"][name]), name
        torch.testing.assert_close(r0["syn_lr"], ref["syn_lr"], rtol=1e-5, atol=1e-9)
        assert torch.equal(r0["syn_lr"], r1["syn_lr"])
        assert abs(r0["metrics"]["loss"] - ref["metrics"]["loss"]) < 1e-5
        for a, b, c in zip(ref["adversary"], r0["adversary"], r1["adversary"]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            assert torch.equal(b, c)


def test_segments_loss_is_the_mean_of_the_naive_losses_of_its_draws():
    """--trajectories-per-iteration M on one process, against an oracle: replay the objective's generators (its own
    generator, the trajectory walk and the index stream, restored to their state before the call), draw the M
    (trajectory, plan) pairs in the objective's order (per segment: the trajectory, then the plan), and average the
    naive engine's loss over them. The objective (exact engine, streamed) gives that mean's value and its gradients
    of lr, the bases and every hallucinator parameter (float64, relative < 1e-10), and the first segment's
    adversarial draws. The snapshots reach the naive engine in float64, as the exact engine uses them (the naive
    engine forms ||w_start - w*||^2 in the snapshots' float32, 4e-9 away)."""
    import copy

    from test_adjoint import rel_err

    from haba_fast.distill import Distiller
    from haba_fast.engines import NaiveEngine
    from haba_fast.objectives.mtt import build_inputs

    M = 3
    ds = W.digits()
    d = Distiller(W.distill_config(parameterization="haba", trajectories_per_iteration=M), ds, W.toy_buffer(ds))
    obj, syn = d.objective, d.synthetic.double()
    lr = d.syn_lr.detach().double().requires_grad_(True)
    params = [lr, syn.bases, *syn.hallucinator_parameters()]
    before = (obj.generator.get_state(), copy.deepcopy(obj.trajectories.state_dict()),
              copy.deepcopy(obj.stream.state_dict()))
    out = obj.loss(syn, lr)
    got = torch.autograd.grad(out.loss, params)

    obj.generator.set_state(before[0])
    obj.trajectories.load_state_dict(before[1])
    obj.stream.load_state_dict(before[2])
    draws = [(obj.sample_trajectory(), obj.sample_plan()) for _ in range(M)]
    assert len({(traj, start) for (traj, start, _, _), _ in draws}) > 1  # the segments are not one draw repeated
    terms = []
    for (_, _, w_start, w_target), plan in draws:
        X, Y = build_inputs(syn, plan)
        terms.append(NaiveEngine()(obj.student, X, Y, w_start.double(), w_target.double(), lr))
    ref = torch.stack(terms).mean()
    want = torch.autograd.grad(ref, params)
    assert out.metrics["segments"] == M and len(want) == len(params) > 2
    assert rel_err(out.loss.detach(), ref.detach()) < 1e-10
    for name, a, b in zip(["lr", "bases"] + [f"hallucinator {i}" for i in range(len(params) - 2)], got, want):
        assert b.abs().max() > 0, name
        assert rel_err(a, b) < 1e-10, f"{name}: {rel_err(a, b):.3g}"
    first = draws[0][1]
    assert torch.equal(out.club.base_idx, first.club.base_idx) and torch.equal(out.club.hall_pair, first.club.hall_pair)
    assert out.adversary is first.adversary or torch.equal(out.adversary.base_idx, first.adversary.base_idx)


def test_eval_gathers_every_result(tmp_path):
    (ref,) = W.run_ranks(W.evaluate_runs, 1, tmp_path / "one")
    r0, r1 = W.run_ranks(W.evaluate_runs, 2, tmp_path / "two")
    assert r0["accuracies"] == ref["accuracies"] == r1["accuracies"]
    assert len(r0["local_calls"]) == 3 and len(r1["local_calls"]) == 3  # runs 0, 2, 4 and 1, 3, 5
    assert sorted(r0["local_calls"] + r1["local_calls"]) == sorted(ref["local_calls"])


@pytest.mark.parametrize("failure", ["exit", "stall"])
def test_a_dead_rank_ends_the_job_with_an_error(tmp_path, failure):
    """Rank 1 dies (exit) or stops answering (stall) before a collective: the job ends with an error (torchrun stops
    the others; a stalled peer makes rank 0's collective time out after $HABA_FAST_DIST_TIMEOUT) instead of a hang."""
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent(f"""
        import os, time, torch
        from haba_fast import dist
        dist.init_from_env("cpu")
        if dist.rank() == 1:
            if "{failure}" == "exit":
                os._exit(3)
            time.sleep(600)
        dist.all_reduce_sum_(torch.ones(4))
        dist.barrier()
        print("rank 0 finished")
    """))
    env = dict(os.environ, HABA_FAST_DIST_TIMEOUT="5", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(W.free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)  # a hang fails here
    assert proc.returncode != 0
    assert "rank 0 finished" not in proc.stdout
    assert "ChildFailedError" in proc.stderr  # torchrun's report of the failed rank
    if failure == "stall":
        assert "Timed out" in proc.stderr  # rank 0's collective gave up after the timeout


def test_a_finished_job_leaves_cleanly_under_torchrun(tmp_path):
    """The normal exit under torchrun: every rank leaves through destroy() (barrier, then the store's wait) and the
    job exits 0; a second destroy() is a no-op."""
    script = tmp_path / "ok.py"
    script.write_text(
        "import pathlib, sys, torch\nfrom haba_fast import dist\nassert dist.init_from_env('cpu')\nr = dist.rank()\n"
        "dist.all_reduce_sum_(torch.ones(4))\ndist.destroy()\ndist.destroy()\n"
        "(pathlib.Path(sys.argv[1]) / f'left{r}').touch()\n"
    )
    env = dict(os.environ, HABA_FAST_DIST_TIMEOUT="30", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(W.free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "left0").exists() and (tmp_path / "left1").exists()


def test_buffer_files_equal_one_process(tmp_path):
    """2 ranks resume a 1-process run up to 5 experts (rounds of 2, the last one partial): same trajectories, same
    files, same grouping into replay_buffer files, as one process training all 5. The haba layout resumes from 1
    expert (rounds start at an odd index); the reference layout from 2 (a finished run flushes its remainder into
    a file, so a full first file of save_interval 2 keeps the grouping)."""
    from haba_fast.experts import load_buffer

    W.run_ranks(W.train_buffers, 1, tmp_path, {"haba": 5, "reference": 5}, "one")
    W.run_ranks(W.train_buffers, 1, tmp_path, {"haba": 1, "reference": 2}, "two")
    W.run_ranks(W.train_buffers, 2, tmp_path, {"haba": 5, "reference": 5}, "two")
    for fmt in ("haba", "reference"):
        one, two = load_buffer(tmp_path / f"{fmt}_one"), load_buffer(tmp_path / f"{fmt}_two")
        assert two.num_trajectories == one.num_trajectories == 5
        assert two.file_groups() == one.file_groups()
        for t in range(5):
            assert torch.equal(two.trajectory(t), one.trajectory(t)), (fmt, t)
        names = [sorted(p.name for p in (tmp_path / f"{fmt}_{s}").iterdir()) for s in ("one", "two")]
        assert names[0] == names[1]


def test_a_slow_rank_keeps_its_temp_files(tmp_path):
    """Rank 0 removes a killed run's temp files when expert training starts; a slower rank 1 must not lose a file
    it is writing at that moment (it probed the folder side by side and failed with ENOENT before)."""
    from haba_fast.experts import load_buffer

    W.run_ranks(W.train_buffers_slow_rank1, 2, tmp_path, {"haba": 2}, "slow")
    assert load_buffer(tmp_path / "haba_slow").num_trajectories == 2


@pytest.mark.slow
def test_distill_run_writes_on_rank_0_and_resumes(tmp_path):
    """2 ranks: rank 0 writes the checkpoint and history, both ranks log the same iterations as one process; a resume
    on another number of processes is a clear error, on the same number it continues."""
    import json

    from haba_fast.distill import distill

    (ref,) = W.run_ranks(W.distill_run, 1, tmp_path, "one", 3, False)
    r0, r1 = W.run_ranks(W.distill_run, 2, tmp_path, "two", 2, False)
    assert r0["out_dir"] is not None and r1["out_dir"] is None
    assert [m["loss"] for m in r0["history"]] == [m["loss"] for m in r1["history"]]
    for a, b in zip(r0["history"], ref["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["syn_lr"] - b["syn_lr"]) < 1e-9
    lines = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0.0, 1.0]
    ds = W.digits()
    cfg = W.distill_config(parameterization="haba", checkpoint_every=1, iterations=3)
    with pytest.raises(ValueError, match="2 process"):
        distill(cfg, ds, W.toy_buffer(ds), tmp_path / "two", resume=True, progress=False, log=lambda s: None)
    r0, _ = W.run_ranks(W.distill_run, 2, tmp_path, "two", 3, True)
    (last,) = r0["history"]
    assert last["iteration"] == 2.0 and abs(last["loss"] - ref["history"][2]["loss"]) < 1e-5


def test_leave_together_returns_when_every_rank_has_arrived():
    """destroy()'s last wait goes through the store: each of 2 callers (threads, one in-process store) returns only
    once both have arrived, round after round; a caller alone times out with the store's error."""
    import datetime
    import threading
    import time

    import torch.distributed as tdist

    store = tdist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=10))
    returned = []

    def rank(name, delay, key):
        time.sleep(delay)
        dist._leave_together(store, 2, key)
        returned.append((name, time.monotonic()))

    for round_ in range(2):
        start = time.monotonic()
        key = f"round{round_}"
        threads = [threading.Thread(target=rank, args=(n, d, key)) for n, d in (("early", 0.0), ("late", 0.5))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert sorted(n for n, _ in returned) == ["early", "late"], f"round {round_}"
        assert all(t - start >= 0.5 for _, t in returned), "the early rank returned before the late one arrived"
        returned.clear()
    store.set_timeout(datetime.timedelta(seconds=0.5))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?i)timeout"):  # the store's own error (DistStoreError "Wait timeout")
        dist._leave_together(store, 2, "alone")
    assert time.monotonic() - start >= 0.5  # it waited for the peer, for the store's timeout
